"""Multi-process training: ``torchrun --nproc_per_node 2`` (gloo on CPU) trains a tiny click model
and a tiny ADClick-Seg model for a few iterations through the CLI; each checkpoint is written once,
by rank 0, records the two processes, and loads in one process and answers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adclick_core.inference.clicks import Click
from adclick_core.utils.data import MVTecFolder
from adclick_core.training.distributed import Distributed
from adclick_core.inference.predictor import ClickPredictor, SegPredictor

REPO = Path(__file__).resolve().parents[1]
MTD = REPO / "tests" / "data" / "mtd_sample"
TORCHRUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Six references and four cracks of the MTD sample, as an MVTec folder."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "train" / "good").mkdir(parents=True)
    for p in sorted((MTD / "train" / "good").iterdir())[:6]:
        shutil.copy(p, root / "train" / "good" / p.name)
    for kind in ("test", "ground_truth"):
        (root / kind / "crack").mkdir(parents=True)
    for p in sorted((MTD / "test" / "crack").iterdir())[:4]:
        shutil.copy(p, root / "test" / "crack" / p.name)
        shutil.copy(MTD / "ground_truth" / "crack" / f"{p.stem}_mask.png", root / "ground_truth" / "crack")
    return root


def torchrun(*args: str) -> None:
    torchrun_bin = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun_bin) if torchrun_bin.exists() else "torchrun", "--standalone", "--nproc_per_node", "2",
           "-m", "adclick_core", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count('"processes": 2') == 1, r.stdout  # rank 0 reports, once


def test_two_processes_train_a_click_model_that_loads_and_answers(tmp_path, tiny):
    out = tmp_path / "click.pt"
    torchrun("train-click", "--data", str(tiny), "--bank", str(tmp_path / "bank.safetensors"),
             "--embed-dim", "32", "--depth", "2", "--iterations", "6", "--batch-size", "4", "--out", str(out))
    ckpt = torch.load(out, weights_only=True, map_location="cpu")
    assert ckpt["train_summary"]["iterations_done"] == 6
    bank = MVTecFolder(tiny).reference_bank(ClickPredictor.from_checkpoint(out, device="cpu").extractor,
                                            tmp_path / "bank.safetensors")
    pred = ClickPredictor.from_checkpoint(out, bank=bank, device="cpu")
    image = next((tiny / "test" / "crack").iterdir())
    state = pred.set_image(image)
    h, w = state.original_hw
    prob = pred.predict(state, [Click(w / 2, h / 2, True)])
    assert prob.shape == (h, w) and np.isfinite(prob).all() and 0 <= prob.min() <= prob.max() <= 1


def test_two_processes_train_a_seg_model_that_loads_and_answers(tmp_path, tiny):
    out = tmp_path / "seg.pt"
    torchrun("train-seg", "--data", str(tiny), "--mode", "masks", "--no-language", "--iterations", "4",
             "--bank", str(tmp_path / "bank.safetensors"), "--out", str(out))
    ckpt = torch.load(out, weights_only=True, map_location="cpu")
    assert ckpt["train_summary"]["processes"] == 2
    seg = SegPredictor.from_checkpoint(out, device="cpu")
    bank = MVTecFolder(tiny).reference_bank(seg.extractor, tmp_path / "bank.safetensors")
    amap, score = seg.with_bank(bank).predict(next((tiny / "test" / "crack").iterdir()))
    assert amap.ndim == 2 and np.isfinite(amap).all() and 0 <= score <= 1


def test_without_torchrun_training_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Distributed.from_env("cpu")
    assert (d.rank, d.world_size, d.is_main, d.active) == (0, 1, True, False)
    assert d.share(8) == 8
    model = torch.nn.Linear(2, 2)
    assert d.wrap(model) is model
    assert Distributed(rank=1, world_size=2).share(8) == 4 and Distributed(rank=1, world_size=3).share(8) == 3
