"""The CUDA path against the CPU path: same features, residuals, click answers and Seg maps, and
training that runs on the GPU and writes checkpoints the CPU loads.

These need a CUDA GPU and are skipped (with that reason) where there is none, as on CI; they were
run on a lent H100 (see the README's "GPU" section for the command).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adclick_core.features.backbone import BackboneConfig, build_extractor
from adclick_core.inference.clicks import Click
from adclick_core.inference.predictor import ClickPredictor, SegPredictor
from adclick_core.features.reference import ReferenceBank
from adclick_core.features.residuals import ResidualConfig, compute_residuals
from adclick_core.training.seg import SegItem, SegTrainConfig, train_seg
from adclick_core.training.click import ClickTrainConfig, build_synthetic_pool, train_click
from adclick_core.models import ADClickConfig
from tests.images import defective, texture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKBONE = BackboneConfig(input_size=64)
RESIDUAL = ResidualConfig(k=3, radius=2.0)


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a = torch.as_tensor(a).double().cpu()
    b = torch.as_tensor(b).double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def pair():
    """The same random-init extractor on both devices, and a bank built by each."""
    torch.manual_seed(0)
    cpu = build_extractor(BACKBONE, random_init=True, device="cpu")
    torch.manual_seed(0)
    gpu = build_extractor(BACKBONE, random_init=True, device="cuda")
    normals = [texture(i) for i in range(6)]
    names = [f"n{i}" for i in range(6)]
    bank_cpu = ReferenceBank.build(cpu, normals, names=names, progress=False)
    bank_gpu = ReferenceBank.build(gpu, normals, names=names, progress=False)
    return cpu, gpu, bank_cpu, bank_gpu, normals


def test_extractor_runs_on_the_gpu_and_matches_the_cpu(pair):
    cpu, gpu, *_ = pair
    img = texture(42)
    fc = cpu(cpu.preprocess([img]))
    fg = gpu(gpu.preprocess([img]))
    assert fg.grid.device.type == "cuda"
    # cuDNN may use TF32 for convolutions: ~1e-3 relative, far below any real difference.
    assert rel_err(fg.grid, fc.grid) < 1e-2
    assert rel_err(fg.fine, fc.fine) < 1e-2
    assert rel_err(fg.descriptor, fc.descriptor) < 1e-2


def test_bank_built_on_the_gpu_saves_and_loads_on_the_cpu(pair, tmp_path):
    _, _, bank_cpu, bank_gpu, _ = pair
    assert bank_gpu.device.type == "cuda"
    path = bank_gpu.save(tmp_path / "bank.safetensors")
    loaded = ReferenceBank.load(path, device="cpu")
    assert loaded.device.type == "cpu"
    assert loaded.names == bank_cpu.names
    assert loaded.fingerprint == bank_gpu.fingerprint


@pytest.mark.parametrize("matching", ["window", "soft"])
def test_residuals_on_the_gpu_match_the_cpu(pair, matching):
    cpu, gpu, bank_cpu, bank_gpu, _ = pair
    cfg = ResidualConfig(k=3, radius=2.0, matching=matching)
    img, _ = defective(3)
    fc = cpu(cpu.preprocess([img]))
    fg = gpu(gpu.preprocess([img]))
    rc = compute_residuals(fc.grid, fc.descriptor, bank_cpu, cfg)
    rg = compute_residuals(fg.grid, fg.descriptor, bank_gpu, cfg)
    assert rg.residual.device.type == "cuda"
    assert rel_err(rg.residual, rc.residual) < 2e-2
    assert rel_err(rg.distance, rc.distance) < 2e-2


def test_shipped_click_model_answers_the_same_on_both_devices():
    """Real weights (EfficientNet-Lite0 + the shipped checkpoint) on a textured image with a defect."""
    normals = [texture(i, (160, 200)) for i in range(8)]
    img, mask = defective(5, (160, 200))
    answers = {}
    for dev in ("cpu", "cuda"):
        pred = ClickPredictor.from_checkpoint(None, device=dev)
        bank = ReferenceBank.build(pred.extractor, normals, names=[f"n{i}" for i in range(8)], progress=False)
        pred = pred.with_bank(bank)
        state = pred.set_image(img)
        assert state.residual.device.type == dev
        ys, xs = np.nonzero(mask)
        clicks = [Click(float(xs.mean()), float(ys.mean()), True)]
        answers[dev] = pred.predict(state, clicks)
    assert answers["cuda"].shape == img.shape[:2]
    assert np.abs(answers["cuda"] - answers["cpu"]).max() < 0.05
    a, b = answers["cuda"] > 0.5, answers["cpu"] > 0.5
    assert (a & b).sum() / max(1, (a | b).sum()) > 0.95


def test_click_training_on_the_gpu_writes_a_cpu_loadable_checkpoint(pair, tmp_path):
    _, gpu, bank_cpu, bank_gpu, normals = pair
    pool = build_synthetic_pool(gpu, bank_gpu, normals, RESIDUAL, per_image=2, seed=0, progress=False,
                                bank_index=list(range(6)))
    cfg = ClickTrainConfig(iterations=20, batch_size=8, lr=3e-3, warmup=3, ema_decay=0.9, seed=0,
                           model=ADClickConfig(in_channels=gpu.feature_dim, embed_dim=16, depth=2, num_heads=2,
                                               window_size=4, grid_size=gpu.grid_size, input_size=64,
                                               fine_channels=gpu.fine_channels, head_channels=8, drop_path=0.0))
    meta = {"backbone": BACKBONE.to_dict(), "residual_config": RESIDUAL.to_dict(),
            "bank_fingerprint": bank_gpu.fingerprint}
    out = tmp_path / "click.pt"
    model, summary = train_click(pool, cfg, out=out, meta=meta, device="cuda", progress=False, checkpoint_every=0)
    assert next(model.parameters()).device.type == "cuda"
    assert summary["iterations"] == 20 and np.isfinite(summary["loss_last_50"])
    torch.manual_seed(0)
    # bank_cpu, not bank_gpu.to("cpu"): ReferenceBank.to moves in place, like nn.Module.to, and
    # the fixture's GPU bank must stay on the GPU for the other tests.
    pred = ClickPredictor.from_checkpoint(out, bank_cpu, device="cpu", random_init_backbone=True)
    img, mask = defective(7)
    ys, xs = np.nonzero(mask)
    prob = pred.predict(pred.set_image(img), [Click(float(xs.mean()), float(ys.mean()), True)])
    assert prob.shape == (64, 64) and np.isfinite(prob).all()


def test_seg_training_and_prediction_on_the_gpu_match_the_cpu(pair, tmp_path):
    _, gpu, bank_cpu, bank_gpu, _ = pair
    items = []
    for i in range(4):
        img, mask = defective(20 + i)
        items.append(SegItem(image=img, mask=mask, defect_type="crack"))
    cfg = SegTrainConfig(iterations=10, batch_size=4, lr=3e-3, warmup=2, ema_decay=0.9, seed=0, language=False,
                         model=ADClickConfig(head="token", embed_dim=16, depth=2, num_heads=2, window_size=4,
                                             drop_path=0.0))
    out = tmp_path / "seg.pt"
    model, summary = train_seg(items, gpu, bank_gpu, cfg, RESIDUAL, defect_types=["crack"], out=out,
                               progress=False, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    img, _ = defective(30)
    maps = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)  # the random-init backbone the bank was built with
        bank = bank_cpu if dev == "cpu" else bank_gpu
        pred = SegPredictor.from_checkpoint(out, bank, device=dev, random_init_backbone=True)
        maps[dev] = pred.predict(img)
    assert maps["cuda"][0].shape == (64, 64)
    assert np.abs(maps["cuda"][0] - maps["cpu"][0]).max() < 0.05
    assert abs(maps["cuda"][1] - maps["cpu"][1]) < 0.05
