"""Per-product adaptation: zoom-in samples in the synthetic pool, and ``adapt_click`` / ``adapt-click``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adclick_core.training.adaptation import MIN_REFERENCES, AdaptConfig, adapt_click
from adclick_core.features.backbone import BackboneConfig
from adclick_core.cli import main
from adclick_core.utils.errors import InputError
from adclick_core.inference.predictor import ClickPredictor
from adclick_core.features.reference import ReferenceBank
from adclick_core.features.residuals import ResidualConfig
from adclick_core.training.click import build_synthetic_pool
from tests.images import texture, write_mvtec
from tests.tiny_click import train_tiny_click

BACKBONE = BackboneConfig(input_size=64)
RESIDUAL = ResidualConfig(k=3, radius=2.0)
WIDE = (96, 256)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_mvtec(tmp_path_factory.mktemp("adapt") / "parts", [texture(i, WIDE) for i in range(MIN_REFERENCES)], {})
    ckpt = root.parent / "click.pt"
    bank = train_tiny_click(root, ckpt, BACKBONE, RESIDUAL, random_init=False, iterations=2)
    pred = ClickPredictor.from_checkpoint(ckpt, bank, device="cpu", residual_config=RESIDUAL)
    return root, ckpt, pred


def test_zoom_samples_are_crops_matched_against_the_same_crops_of_the_references(world):
    _, _, pred = world
    bank = pred.bank
    normals = [bank.source(i) for i in range(len(bank))]
    whole = build_synthetic_pool(pred.extractor, bank, normals, RESIDUAL, per_image=1, seed=0, progress=False,
                                 bank_index=list(range(len(bank))))
    zoomed = build_synthetic_pool(pred.extractor, bank, normals, RESIDUAL, per_image=1, seed=0, progress=False,
                                  bank_index=list(range(len(bank))), zoom_share=1.0)
    assert len(zoomed) == len(whole) == len(bank)
    assert zoomed.residual.shape == whole.residual.shape and zoomed.masks.shape == whole.masks.shape
    assert all(m.any() for m in zoomed.masks)  # each crop got its anomaly
    assert not torch.allclose(zoomed.residual.float(), whole.residual.float())
    # Where there is no anomaly, a crop matched against the same crops of near-identical
    # references has residuals of the same size as a whole image's: the crops line up.
    def normal_level(pool):
        cells = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(pool.masks).float()[:, None], 8) < 0.5
        return float(pool.residual.float().norm(dim=1)[cells[:, 0]].median())
    assert normal_level(zoomed) < 2.0 * normal_level(whole)


def test_zoom_samples_need_a_bank_with_reference_pixels(world):
    _, _, pred = world
    bank = pred.bank
    old = ReferenceBank(bank.backbone, bank.features, bank.descriptors, bank.names, bank.hashes)
    with pytest.raises(ValueError, match="pixels"):
        build_synthetic_pool(pred.extractor, old, [texture(0, WIDE)], RESIDUAL, per_image=1, progress=False,
                             zoom_share=0.5)


def test_adapt_click_fine_tunes_the_model_on_the_bank_s_own_references(world, tmp_path):
    _, _, pred = world
    out = tmp_path / "adapted.pt"
    summary = adapt_click(pred, out, AdaptConfig(iterations=3, warmup=1, batch_size=2, per_image=1), progress=False)
    assert summary["references"] == MIN_REFERENCES and summary["pool_size"] == MIN_REFERENCES
    adapted = ClickPredictor.from_checkpoint(out, pred.bank, device="cpu", residual_config=RESIDUAL)
    before = dict(pred.model.named_parameters())
    changed = [n for n, p in adapted.model.named_parameters() if not torch.allclose(p, before[n])]
    assert changed  # fine-tuned, not a copy
    assert adapted.checkpoint_info["adapted"]["config"]["iterations"] == 3
    assert adapted.checkpoint_info["bank_fingerprint"] == pred.bank.fingerprint


def test_an_adapted_ensemble_keeps_its_other_members_as_they_were(world, tmp_path):
    from adclick_core.utils.checkpoint import combine_checkpoints, load_checkpoint

    _, ckpt, pred = world
    ens = tmp_path / "ens.pt"
    combine_checkpoints([ckpt, ckpt], ens)
    base = ClickPredictor.from_checkpoint(ens, pred.bank, device="cpu", residual_config=RESIDUAL)
    out = tmp_path / "adapted.pt"
    adapt_click(base, out, AdaptConfig(iterations=3, warmup=1, batch_size=2, per_image=1, member=1), progress=False)
    adapted = ClickPredictor.from_checkpoint(out, pred.bank, device="cpu", residual_config=RESIDUAL)
    assert len(adapted.model.members) == 2
    kept, tuned = (dict(m.named_parameters()) for m in adapted.model.members)
    before = dict(base.model.members[1].named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in kept.items())
    assert any(not torch.allclose(p, before[n]) for n, p in tuned.items())
    records = load_checkpoint(out, "adclick_click")["trained_on"]["members"]
    assert "adapted" not in records[0] and records[1]["adapted"]["config"]["member"] == 1
    assert adapted.checkpoint_info["adapted"]["references"] == MIN_REFERENCES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapted.pt", "ens.pt"]  # no temporary file left


def test_too_few_references_are_a_clear_error(world, tmp_path):
    _, _, pred = world
    small = pred.with_bank(pred.bank.subset(range(MIN_REFERENCES - 1)))
    with pytest.raises(InputError, match=f"at least {MIN_REFERENCES}"):
        adapt_click(small, tmp_path / "x.pt", AdaptConfig(iterations=1), progress=False)


def test_adapt_click_command_writes_a_loadable_checkpoint(world, tmp_path, capsys):
    root, ckpt, _ = world
    out = tmp_path / "cli.pt"
    code = main(["adapt-click", "--data", str(root), "--checkpoint", str(ckpt), "--out", str(out),
                 "--iterations", "2", "--per-image", "1", "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["checkpoint"] == str(out) and out.is_file() and printed["total_seconds"] > 0
    assert main(["adapt-click", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_adapt_click_learns_from_the_project_s_own_masks_too(world, tmp_path):
    _, _, pred = world
    img = texture(90, WIDE)
    mask = np.zeros(WIDE, bool)
    mask[30:60, 100:140] = True
    img[mask] = 10
    out = tmp_path / "adapted.pt"
    config = AdaptConfig(iterations=2, warmup=1, batch_size=2, per_image=1, zoom_share=0.0)
    summary = adapt_click(pred, out, config, progress=False, defects=[(img, mask), (img[:, ::-1].copy(), mask[:, ::-1])])
    assert summary["masks"] == 2
    assert summary["pool_size"] == MIN_REFERENCES + 2 * 2  # each mask whole and as one zoom-in crop
    assert ClickPredictor.from_checkpoint(out, pred.bank, device="cpu").checkpoint_info["adapted"]["masks"] == 2
    with pytest.raises(InputError, match="mask_share"):
        adapt_click(pred, out, AdaptConfig(iterations=1, mask_share=1.0), progress=False, defects=[(img, mask)])
