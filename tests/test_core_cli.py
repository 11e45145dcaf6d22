"""``python -m adclick_core``: help for every command, and a real build-bank run (packaged weights)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adclick_core.cli import build_parser, main
from adclick_core.features.reference import ReferenceBank
from tests.images import write_mvtec

ROOT = Path(__file__).resolve().parents[1]


def _subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return sorted(action.choices)
    return []


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # One intra-op thread: the CI machine has two cores, often shared with a training job.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "adclick_core", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_top_level_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    subs = _subcommands()
    assert {"build-bank", "train-click", "eval-click", "bench"} <= set(subs)
    for name in subs:
        assert name in proc.stdout


# Each ``python -m adclick_core <command> --help`` costs a torch import (~2 s of CPU); one child process
# runs them all through runpy, exactly as ``-m`` does, and reports exit code and output per command.
_HELP_SCRIPT = r"""
import contextlib, io, json, runpy, sys
out = {}
for cmd in json.loads(sys.argv[1]):
    sys.argv = ["adclick_core", cmd, "--help"]
    buf = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_module("adclick_core", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
    out[cmd] = [code, buf.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def subcommand_help() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, json.dumps(_subcommands())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help(command, subcommand_help):
    code, text = subcommand_help[command]
    assert code in (0, None)
    assert text.startswith("usage: python -m adclick_core " + command)
    assert "--device" in text


def test_one_subcommand_help_as_real_process():
    proc = run_cli("build-bank", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--input-size" in proc.stdout


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_build_bank(tmp_path):
    src = tmp_path / "good"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = (rng.random((40 + 8 * i, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(src / f"img_{i}.png")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "banks" / "bank.safetensors"
    proc = run_cli("build-bank", str(src), "--out", str(out), "--input-size", "64", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["images"] == 3
    assert Path(result["bank"]) == out
    assert result["backbone"]["input_size"] == 64
    assert result["backbone"]["name"] == "efficientnet_lite0"
    bank = ReferenceBank.load(out)
    assert len(bank) == 3
    assert bank.names == ["img_0.png", "img_1.png", "img_2.png"]
    assert bank.fingerprint == result["fingerprint"]
    assert bank.backbone.input_size == 64
    assert bank.features.shape == (3, 256, 8, 8)
    # Real (pretrained) features: three different images give three different feature maps.
    flat = bank.features.float().flatten(1)
    assert (flat.std(dim=1) > 0).all()
    assert not np.allclose(flat[0].numpy(), flat[1].numpy())


def test_build_bank_empty_folder_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    code = main(["build-bank", str(empty), "--out", str(tmp_path / "b.safetensors"), "--input-size", "64",
                 "--device", "cpu"])
    assert code == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "no images found" in captured.err
    assert captured.out == ""
    assert not (tmp_path / "b.safetensors").exists()


def test_config_overrides_are_typed_like_the_defaults():
    from adclick_core.cli import config_overrides
    from adclick_core.training.seg import SegTrainConfig

    out = config_overrides(SegTrainConfig, ["lr=2e-4", "iterations=50", "language=off", "calibration_at=0.5"])
    assert out == {"lr": 2e-4, "iterations": 50, "language": False, "calibration_at": 0.5}
    assert type(out["iterations"]) is int
    SegTrainConfig(**out)  # accepted by the config
    for bad in (["no_such_field=1"], ["lr"], ["model=x"], ["iterations=many"]):
        with pytest.raises(SystemExit, match="--set"):
            config_overrides(SegTrainConfig, bad)


def _tiny_mvtec(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(1)
    return write_mvtec(root, [(rng.random((48, 48, 3)) * 255).astype(np.uint8) for _ in range(n)], {})


def test_train_click_records_its_anomaly_mix(tmp_path):
    from adclick_core.utils.checkpoint import load_checkpoint

    data = _tiny_mvtec(tmp_path / "data")
    out = tmp_path / "click.pt"
    proc = run_cli("train-click", "--data", str(data), "--out", str(out), "--input-size", "64", "--device", "cpu",
                   "--iterations", "2", "--batch-size", "2", "--per-image", "1", "--embed-dim", "32", "--depth", "1",
                   "--edge-share", "0.5", "--finish-share", "1", "--uneven-share", "0.3",
                   "--strip-share", "0.4", "--faint-share", "0.25", "--max-extra-clicks", "5", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pool_size"] == 4
    ckpt = load_checkpoint(out, "adclick_click")
    assert ckpt["trained_on"]["synthesizer"] == {"p_edge": 0.5, "p_uneven": 0.3, "p_finish": 1.0, "p_photometric": 0.0,
                                                  "p_strip": 0.4, "p_faint": 0.25}
    assert ckpt["train_config"]["max_extra_clicks"] == 5


def test_train_click_rejects_an_impossible_anomaly_mix(tmp_path, capsys):
    out = tmp_path / "click.pt"
    code = main(["train-click", "--data", str(tmp_path), "--out", str(out), "--uneven-share", "0.9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "synthetic anomaly mix" in err and "summing to at most 1" in err
    assert not out.exists()


def test_train_click_rejects_a_negative_click_count(tmp_path, capsys):
    out = tmp_path / "click.pt"
    code = main(["train-click", "--data", str(tmp_path), "--out", str(out), "--max-extra-clicks", "-1"])
    assert code == 2
    assert "--max-extra-clicks must be >= 0" in capsys.readouterr().err
    assert not out.exists()


def test_train_click_mixes_products_and_texture_families(tmp_path):
    from adclick_core.utils.checkpoint import load_checkpoint

    first, second = _tiny_mvtec(tmp_path / "a"), _tiny_mvtec(tmp_path / "b", n=3)
    out = tmp_path / "click.pt"
    proc = run_cli("train-click", "--data", str(first), "--data", str(second), "--textures", "2",
                   "--texture-images", "3", "--out", str(out), "--input-size", "64", "--device", "cpu",
                   "--iterations", "2", "--batch-size", "2", "--per-image", "1", "--embed-dim", "32", "--depth", "1",
                   "--k", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["sources"] == 4
    assert summary["pool_size"] == 4 + 3 + 2 * 3  # one anomaly per image of every source
    trained_on = load_checkpoint(out, "adclick_click")["trained_on"]
    assert [s["normal_images"] for s in trained_on["sources"]] == [4, 3]
    assert trained_on["textures"] == {"families": 2, "images_per_family": 3, "kinds": ["brushed", "grain"]}


def test_train_click_wants_one_bank_per_data_folder(tmp_path, capsys):
    first, second = _tiny_mvtec(tmp_path / "a"), _tiny_mvtec(tmp_path / "b")
    code = main(["train-click", "--data", str(first), "--data", str(second), "--bank", str(tmp_path / "x.safetensors"),
                 "--out", str(tmp_path / "click.pt")])
    assert code == 2
    assert "one --bank per --data" in capsys.readouterr().err


def _tiny_click(data: Path, out: Path, seed: int) -> Path:
    proc = run_cli("train-click", "--data", str(data), "--out", str(out), "--input-size", "64", "--device", "cpu",
                   "--iterations", "2", "--batch-size", "2", "--per-image", "1", "--embed-dim", "32", "--depth", "1",
                   "--seed", str(seed), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def test_train_click_continues_from_an_ensemble_member(tmp_path):
    from adclick_core.utils.checkpoint import load_checkpoint

    data = _tiny_mvtec(tmp_path / "data")
    members = [_tiny_click(data, tmp_path / f"m{i}.pt", seed=i) for i in range(2)]
    ensemble = tmp_path / "ens.pt"
    assert run_cli("combine-click", *map(str, members), "--out", str(ensemble), timeout=300).returncode == 0
    out = tmp_path / "cont.pt"
    # lr 0: the continued model must still be member 1 itself (architecture and weights taken over;
    # only the input scale is measured again, on the new pool)
    proc = run_cli("train-click", "--data", str(data), "--out", str(out), "--init", str(ensemble),
                   "--init-member", "1", "--device", "cpu", "--iterations", "2", "--batch-size", "2",
                   "--per-image", "1", "--lr", "0", timeout=300)
    assert proc.returncode == 0, proc.stderr
    cont, start = load_checkpoint(out, "adclick_click"), load_checkpoint(members[1], "adclick_click")
    assert cont["init"] == {"checkpoint": str(ensemble), "member": 1}
    assert cont["model_config"] == start["model_config"] and cont["backbone"] == start["backbone"]
    assert cont["state_dict"].keys() == start["state_dict"].keys()
    for name, value in start["state_dict"].items():
        if not name.endswith("input_scale"):
            assert torch.equal(cont["state_dict"][name], value), name
    again = tmp_path / "again.pt"  # an ensemble of the continued model keeps where it started from
    assert run_cli("combine-click", str(out), str(members[0]), "--out", str(again), timeout=300).returncode == 0
    assert load_checkpoint(again, "adclick_click")["trained_on"]["members"][0]["init"] == cont["init"]
    other = load_checkpoint(members[0], "adclick_click")["state_dict"]
    assert any(not torch.equal(other[n], v) for n, v in start["state_dict"].items())  # the members differ
    # --replace-member: the whole ensemble back, the trained member in place, the other one untouched
    whole = tmp_path / "whole.pt"
    proc = run_cli("train-click", "--data", str(data), "--out", str(whole), "--init", str(ensemble),
                   "--init-member", "1", "--replace-member", "--device", "cpu", "--iterations", "2",
                   "--batch-size", "2", "--per-image", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(whole, "adclick_click")
    assert ckpt["ensemble_members"] == 2 and ckpt["trained_on"]["members"][1]["checkpoint"] == "member 1 continued"
    for name, value in other.items():
        assert torch.equal(ckpt["state_dict"][f"members.0.{name}"], value), name
    assert any(not torch.equal(ckpt["state_dict"][f"members.1.{n}"], v) for n, v in start["state_dict"].items())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    code = main(["train-click", "--data", str(data), "--out", str(tmp_path / "x.pt"), "--init", str(members[0]),
                 "--replace-member"])
    assert code == 2 and not (tmp_path / "x.pt").exists()


def test_train_click_init_refuses_another_architecture(tmp_path, capsys):
    data = _tiny_mvtec(tmp_path / "data")
    start = _tiny_click(data, tmp_path / "m.pt", seed=0)
    out = tmp_path / "cont.pt"
    code = main(["train-click", "--data", str(data), "--out", str(out), "--init", str(start), "--depth", "2",
                 "--device", "cpu"])
    assert code == 2
    assert "--depth 2 (the checkpoint has 1)" in capsys.readouterr().err
    assert not out.exists()


def test_train_click_learns_from_real_defects_of_other_products(tmp_path):
    from adclick_core.utils.checkpoint import load_checkpoint

    rng = np.random.default_rng(3)
    normals = [(rng.random((96, 96, 3)) * 255).astype(np.uint8) for _ in range(3)]
    defects = []
    for i in range(2):
        img = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
        mask = np.zeros((96, 96), bool)
        mask[20 + 10 * i:50 + 10 * i, 30:60] = True
        img[mask] = 0
        defects.append((img, mask))
    product = write_mvtec(tmp_path / "product", normals, {"scratch": defects})
    synthetic = _tiny_mvtec(tmp_path / "synthetic")
    out = tmp_path / "click.pt"
    proc = run_cli("train-click", "--data", str(synthetic), "--defects", str(product), "--out", str(out),
                   "--input-size", "64", "--device", "cpu", "--iterations", "2", "--batch-size", "2",
                   "--per-image", "1", "--embed-dim", "32", "--depth", "1", "--k", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pool_size"] == 4 + 2 * 2  # 4 synthetic; each defect whole + one crop
    trained_on = load_checkpoint(out, "adclick_click")["trained_on"]
    assert trained_on["defects"] == {"sets": [{"data": str(product), "defect_images": 2, "samples": 4}],
                                     "crops_per_defect": 1}


def test_train_click_defects_need_masks_and_references(tmp_path, capsys):
    no_defects = _tiny_mvtec(tmp_path / "plain")
    code = main(["train-click", "--defects", str(no_defects), "--out", str(tmp_path / "c.pt")])
    assert code == 2 and "no defect images with masks" in capsys.readouterr().err
    code = main(["train-click", "--out", str(tmp_path / "c.pt")])
    assert code == 2 and "nothing to train on" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()
