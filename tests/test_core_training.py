"""Click training on a tiny synthetic pool, checkpoints, and the ClickPredictor built from one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adclick_core.training.click as training
from adclick_core.features.backbone import BackboneConfig, build_extractor
from adclick_core.utils.checkpoint import load_checkpoint, save_checkpoint
from adclick_core.inference.clicks import Click, encode_clicks, next_eval_click
from adclick_core.utils.errors import CheckpointError, EmptyBankError, InputError, MissingWeightsError
from adclick_core.models import ADClick, ADClickConfig
from adclick_core.inference.predictor import ClickPredictor
from adclick_core.features.reference import ReferenceBank
from adclick_core.inference.refinement import RefineConfig
from adclick_core.features.residuals import ResidualConfig
from adclick_core.training.click import ClickTrainConfig, build_synthetic_pool, train_click
from tests.images import reshot, texture

ITERATIONS = 40


BACKBONE = BackboneConfig(input_size=64)
RESIDUAL = ResidualConfig(k=3, radius=2.0)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    extractor = build_extractor(BACKBONE, random_init=True, device="cpu")
    normals = [texture(i) for i in range(6)]
    bank = ReferenceBank.build(extractor, normals, names=[f"n{i}" for i in range(6)], progress=False)
    pool = build_synthetic_pool(extractor, bank, normals, RESIDUAL, per_image=2, seed=0, progress=False,
                                bank_index=list(range(6)))
    return extractor, bank, normals, pool


def model_config(extractor) -> ADClickConfig:
    return ADClickConfig(in_channels=extractor.feature_dim, embed_dim=16, depth=2, num_heads=2, window_size=4,
                         grid_size=extractor.grid_size, input_size=BACKBONE.input_size,
                         fine_channels=extractor.fine_channels, head_channels=8, drop_path=0.0)


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    extractor, bank, _, pool = setup
    out = tmp_path_factory.mktemp("ckpt") / "click.pt"
    cfg = ClickTrainConfig(iterations=ITERATIONS, batch_size=8, lr=3e-3, warmup=3, ema_decay=0.9, seed=0,
                           model=model_config(extractor))
    meta = {"backbone": BACKBONE.to_dict(), "residual_config": RESIDUAL.to_dict(), "bank_fingerprint": bank.fingerprint}
    losses: list[float] = []
    dices: list[float] = []
    bces: list[float] = []
    progress: list[tuple[float, str]] = []
    real_loss = training.normalized_focal_loss
    real_dice = training.soft_dice_loss

    def recording_dice(logits, target, *args, **kwargs):
        loss = real_dice(logits, target, *args, **kwargs)
        dices.append(loss.item())
        return loss

    def recording_loss(logits, target, *args, **kwargs):
        loss = real_loss(logits, target, *args, **kwargs)
        losses.append(loss.item())
        # NFL renormalises its weights towards the hardest pixels, so its value falls slowly; plain
        # BCE on the same batch is a steadier view of the same progress.
        bces.append(F.binary_cross_entropy_with_logits(logits.detach(), target).item())
        return loss

    mp = pytest.MonkeyPatch()
    mp.setattr(training, "normalized_focal_loss", recording_loss)
    mp.setattr(training, "soft_dice_loss", recording_dice)
    try:
        model, summary = train_click(pool, cfg, out=out, meta=meta, device="cpu", progress=False,
                                     callback=lambda f, m: progress.append((f, m)), checkpoint_every=0)
    finally:
        mp.undo()
    totals = [n + cfg.dice_weight * d for n, d in zip(losses, dices)]
    return {"model": model, "summary": summary, "path": out, "losses": losses, "bces": bces, "progress": progress,
            "config": cfg, "totals": totals}


# ---------------------------------------------------------------- the pool


def test_synthetic_pool(setup):
    extractor, _, _, pool = setup
    assert len(pool) == 12
    assert pool.residual.shape == (12, 256, 8, 8) and pool.residual.dtype == torch.float16
    assert pool.fine.shape == (12, 24, 16, 16)
    assert pool.masks.shape == (12, 64, 64) and pool.masks.dtype == bool
    assert all(m.any() for m in pool.masks)
    assert torch.isfinite(pool.residual.float()).all()
    # Residuals are not trivially zero: each image was excluded from its own retrieval.
    assert (pool.residual.float().flatten(1).norm(dim=1) > 0).all()


def test_synthetic_pool_deterministic(setup):
    extractor, bank, normals, pool = setup
    again = build_synthetic_pool(extractor, bank, normals[:2], RESIDUAL, per_image=1, seed=0, progress=False,
                                 bank_index=[0, 1])
    third = build_synthetic_pool(extractor, bank, normals[:2], RESIDUAL, per_image=1, seed=0, progress=False,
                                 bank_index=[0, 1])
    np.testing.assert_array_equal(again.masks, third.masks)
    assert torch.equal(again.residual, third.residual)


def test_self_exclusion_matters(setup):
    extractor, bank, normals, _ = setup
    # A normal image without a defect that is in the bank: without exclusion its residual is ~zero.
    with_self = build_synthetic_pool(extractor, bank, normals[:1], RESIDUAL, per_image=1, seed=3, progress=False)
    excluded = build_synthetic_pool(extractor, bank, normals[:1], RESIDUAL, per_image=1, seed=3, progress=False,
                                    bank_index=[0])
    m = torch.from_numpy(with_self.masks[0]).float()[None, None]
    normal_cells = torch.nn.functional.adaptive_max_pool2d(m, 8)[0, 0] < 0.5
    norm_self = with_self.residual[0].float().norm(dim=0)[normal_cells].mean()
    norm_excl = excluded.residual[0].float().norm(dim=0)[normal_cells].mean()
    assert norm_excl > norm_self


def test_exclude_similar_leaves_the_reshot_copy_out(setup):
    extractor, _, normals, _ = setup
    # The bank holds a re-shot copy of normal 0 (brighter, other pixel noise): leaving out only
    # normal 0 itself, its composite matches the copy; leaving out its most similar image too, not.
    bank = ReferenceBank.build(extractor, [*normals, reshot(normals[0])], progress=False)
    near = build_synthetic_pool(extractor, bank, normals[:1], RESIDUAL, per_image=1, seed=3, progress=False,
                                bank_index=[0])
    new_part = build_synthetic_pool(extractor, bank, normals[:1], RESIDUAL, per_image=1, seed=3, progress=False,
                                    bank_index=[0], exclude_similar=1)
    np.testing.assert_array_equal(near.masks, new_part.masks)
    m = torch.from_numpy(near.masks[0]).float()[None, None]
    normal_cells = torch.nn.functional.adaptive_max_pool2d(m, 8)[0, 0] < 0.5
    assert new_part.residual[0].float().norm(dim=0)[normal_cells].mean() > \
        1.1 * near.residual[0].float().norm(dim=0)[normal_cells].mean()


# ---------------------------------------------------------------- training


@torch.no_grad()
def pool_bce(model, pool) -> float:
    """BCE on every pool sample with one click at the centre of its defect: a fixed measurement,
    unlike the per-iteration losses of random batches."""
    model.eval()
    s = model.config.input_size
    total = 0.0
    for i in range(len(pool)):
        mask = pool.masks[i]
        maps = encode_clicks([[next_eval_click(mask, None)]], None, s, model.config.click_radius)
        logits = model(pool.residual[i : i + 1].float(), maps, pool.fine[i : i + 1].float())
        logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
        total += F.binary_cross_entropy_with_logits(logits[0, 0], torch.from_numpy(mask).float()).item()
    return total / len(pool)


def test_training_lowers_the_loss(setup, trained):
    losses = trained["losses"]
    assert len(losses) == ITERATIONS  # one loss per iteration (extra clicks run without loss)
    assert all(np.isfinite(losses)) and all(np.isfinite(trained["bces"]))
    _, _, _, pool = setup
    torch.manual_seed(trained["config"].seed)  # train_click's own initialisation
    untrained = ADClick(trained["config"].model)
    before, after = pool_bce(untrained, pool), pool_bce(trained["model"], pool)
    assert after < 0.8 * before, (before, after)


def test_summary_and_callback(trained):
    summary = trained["summary"]
    assert summary["iterations"] == ITERATIONS
    assert len(trained["totals"]) == ITERATIONS  # NFL + Dice, the loss the summary reports
    assert summary["loss_first_50"] == pytest.approx(float(np.mean(trained["totals"][:50])), rel=1e-5)
    assert summary["loss_last_50"] == pytest.approx(float(np.mean(trained["totals"][-50:])), rel=1e-5)
    fractions = [f for f, _ in trained["progress"]]
    assert fractions == sorted(fractions) and 0 < fractions[0] <= fractions[-1] <= 1
    assert len(fractions) == ITERATIONS // 10 + 1 and fractions[-1] == 1.0  # every 10 iterations, and the end
    assert all("loss" in m for _, m in trained["progress"])
    assert not trained["model"].training  # EMA model returned in eval mode


def test_checkpoint_written_and_loadable(trained, setup):
    extractor, bank, _, _ = setup
    ckpt = load_checkpoint(trained["path"], "adclick_click")
    assert ckpt["kind"] == "adclick_click"
    assert ckpt["backbone"] == BACKBONE.to_dict()
    assert ckpt["residual_config"] == RESIDUAL.to_dict()
    assert ckpt["bank_fingerprint"] == bank.fingerprint
    assert ADClickConfig.from_dict(ckpt["model_config"]) == trained["config"].model
    assert ckpt["train_summary"]["iterations_done"] == ITERATIONS
    state = trained["model"].state_dict()
    assert set(ckpt["state_dict"]) == set(state)
    for k, v in state.items():
        assert torch.equal(ckpt["state_dict"][k], v.cpu()), k
    # input_scale was set from the pool, not left at ones.
    assert not torch.equal(ckpt["state_dict"]["residual_embed.input_scale"], torch.ones(256))
    assert not list(trained["path"].parent.glob("*.tmp"))


def test_checkpoint_errors(trained, tmp_path):
    data = trained["path"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(truncated, "adclick_click")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a torch file")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage, "adclick_click")
    with pytest.raises(CheckpointError, match="not a adclick_seg checkpoint"):
        load_checkpoint(trained["path"], "adclick_seg")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", "adclick_click")
    newer = save_checkpoint(tmp_path / "newer.pt", "adclick_click", {})
    payload = torch.load(newer, weights_only=True)
    payload["format_version"] = 999
    torch.save(payload, newer)
    with pytest.raises(CheckpointError, match="newer version"):
        load_checkpoint(newer, "adclick_click")
    with pytest.raises(CheckpointError):
        ClickPredictor.from_checkpoint(truncated, device="cpu", random_init_backbone=True)


# ---------------------------------------------------------------- predictor


@pytest.fixture(scope="module")
def predictor(trained, setup):
    _, bank, _, _ = setup
    torch.manual_seed(0)  # the same random backbone the bank was built with
    return ClickPredictor.from_checkpoint(trained["path"], bank, device="cpu", random_init_backbone=True)


def test_predictor_from_checkpoint(predictor, trained, setup):
    _, bank, _, _ = setup
    assert predictor.residual_config == RESIDUAL
    assert predictor.extractor.config == BACKBONE
    assert predictor.checkpoint_info["kind"] == "adclick_click"
    assert "state_dict" not in predictor.checkpoint_info
    for k, v in trained["model"].state_dict().items():
        assert torch.equal(predictor.model.state_dict()[k], v), k
    # The same seed gives the bank's backbone: its features match the bank's.
    feats = predictor.extractor(predictor.extractor.preprocess([texture(0)]))
    torch.testing.assert_close(feats.grid.half(), bank.features[:1])


def test_predict_at_original_size(predictor):
    image = texture(50, (50, 70))
    image[10:25, 30:45] = 250
    state = predictor.set_image(image)
    assert state.original_hw == (50, 70)
    assert state.residual.shape == (1, 256, 8, 8)
    assert state.fine.shape == (1, 24, 16, 16)
    assert state.distance.shape == (8, 8)
    assert state.bank_fingerprint == predictor.bank.fingerprint
    prob = predictor.predict(state, [Click(37, 17, True)])
    assert prob.shape == (50, 70) and prob.dtype == np.float32
    assert prob.min() >= 0 and prob.max() <= 1
    both = predictor.predict(state, [Click(37, 17, True), Click(5, 45, False)], prev_mask=prob)
    assert both.shape == (50, 70) and both.dtype == np.float32
    assert 0 <= both.min() and both.max() <= 1
    assert not np.allclose(both, prob)  # clicks and previous mask feed the model
    # A 0/255 previous mask is accepted like a 0/1 one.
    binary = (prob > 0.5).astype(np.float32)
    np.testing.assert_allclose(predictor.predict(state, [], prev_mask=binary * 255),
                               predictor.predict(state, [], prev_mask=binary), rtol=1e-5, atol=1e-6)
    # Clicks on the image border are inside.
    assert predictor.predict(state, [Click(0, 0), Click(70, 50, False)]).shape == (50, 70)
    # The grayscale copy for boundary refinement; the raw answer is the model's alone.
    assert state.gray.shape == (50, 70) and state.gray.dtype == np.uint8 and state.gray[15, 35] > 200
    raw = predictor.with_refinement(None)
    assert raw.refinement is None and predictor.refinement is not None and raw.model is predictor.model
    untouched = predictor.with_refinement(RefineConfig(max_area_frac=0.0, relative_threshold=None))
    np.testing.assert_array_equal(raw.predict(state, [Click(37, 17, True)]),
                                  untouched.predict(state, [Click(37, 17, True)]))
    # The same image gives the same state.
    again = predictor.set_image(image)
    assert again.image_key == state.image_key
    torch.testing.assert_close(again.residual, state.residual)


def test_predict_input_errors(predictor):
    state = predictor.set_image(texture(51, (50, 70)))
    for bad in (Click(71, 10), Click(10, 51), Click(-1, 10), Click(10, -0.5), Click(float("nan"), 3)):
        with pytest.raises(InputError, match="outside"):
            predictor.predict(state, [bad])
    with pytest.raises(InputError, match="prev_mask"):
        predictor.predict(state, [Click(5, 5)], prev_mask=np.zeros((70, 50), np.float32))
    with pytest.raises(InputError):
        predictor.predict(state, [Click(5, 5)], prev_mask=np.zeros((50, 70, 3), np.float32))
    with pytest.raises(InputError):
        predictor.set_image(np.zeros((4, 4, 3), np.uint8))


def test_anomaly_map(predictor):
    image = texture(0, (50, 70))
    state = predictor.set_image(image)
    amap = predictor.anomaly_map(state)
    assert amap.shape == (50, 70) and amap.dtype == np.float32
    assert np.isfinite(amap).all() and amap.min() >= 0


def test_predictor_empty_bank(trained):
    torch.manual_seed(0)
    pred = ClickPredictor.from_checkpoint(trained["path"], None, device="cpu", random_init_backbone=True)
    assert len(pred.bank) == 0
    with pytest.raises(EmptyBankError):
        pred.set_image(texture(1))
    torch.manual_seed(0)
    pred = ClickPredictor.from_checkpoint(trained["path"], ReferenceBank(BACKBONE), device="cpu",
                                          random_init_backbone=True)
    with pytest.raises(EmptyBankError):
        pred.set_image(texture(1))


def test_predictor_with_bank(predictor, setup):
    _, bank, _, _ = setup
    small = bank.subset([0, 1, 2])
    other = predictor.with_bank(small)
    assert other.bank is small and predictor.bank is not small
    assert other.model is predictor.model
    state = other.set_image(texture(3))
    assert state.bank_fingerprint == small.fingerprint != predictor.bank.fingerprint
    # texture(3) is in the full bank (residual ~ fp16 rounding) but not in the subset.
    full = predictor.set_image(texture(3))
    assert state.distance.mean() > 10 * full.distance.mean()


def test_predictor_rejects_bank_of_other_backbone(trained):
    other = ReferenceBank(BackboneConfig(input_size=96))
    with pytest.raises(CheckpointError, match="rebuild the bank"):
        ClickPredictor.from_checkpoint(trained["path"], other, device="cpu", random_init_backbone=True)


# ---------------------------------------------------------------- ensembles of click models


def checkpoint_meta(ckpt: dict) -> dict:
    """A loaded checkpoint's records without its weights and header: what ``save_checkpoint`` takes."""
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "format_version", "kind")}


def test_click_ensemble_checkpoint_answers_with_the_mean_probability(trained, setup, tmp_path):
    from adclick_core.utils.checkpoint import combine_checkpoints

    _, bank, _, _ = setup
    first = load_checkpoint(trained["path"], "adclick_click")
    meta = checkpoint_meta(first)
    torch.manual_seed(1)
    other = ADClick(trained["config"].model)  # same architecture, other weights
    second = save_checkpoint(tmp_path / "other.pt", "adclick_click", other.state_dict(), **meta)
    out = tmp_path / "ensemble.pt"
    summary = combine_checkpoints([trained["path"], second], out)
    assert summary["members"] == [str(trained["path"]), str(second)]
    ckpt = load_checkpoint(out, "adclick_click")
    assert ckpt["ensemble_members"] == 2 and ckpt["bank_fingerprint"] == bank.fingerprint
    assert [m["checkpoint"] for m in ckpt["trained_on"]["members"]] == ["click.pt", "other.pt"]

    torch.manual_seed(0)
    ens = ClickPredictor.from_checkpoint(out, bank, device="cpu", random_init_backbone=True)
    state = ens.set_image(texture(60))
    maps = encode_clicks([[Click(30.0, 20.0, True)]], None, BACKBONE.input_size, ens.model.config.click_radius)
    with torch.no_grad():
        p_ens = torch.sigmoid(ens.model(state.residual, maps, state.fine))
        p_a = torch.sigmoid(trained["model"].eval()(state.residual, maps, state.fine))
        p_b = torch.sigmoid(other.eval()(state.residual, maps, state.fine))
    assert (p_a - p_b).abs().max() > 1e-3  # the members disagree, so the mean is a real test
    torch.testing.assert_close(p_ens, 0.5 * (p_a + p_b), atol=1e-5, rtol=1e-4)
    prob = ens.predict(state, [Click(30.0, 20.0, True)])
    assert prob.shape == (64, 64) and np.isfinite(prob).all()


def test_members_trained_against_other_banks_answer_together_and_keep_their_records(trained, tmp_path):
    from adclick_core.utils.checkpoint import combine_checkpoints, joint_fingerprint

    first = load_checkpoint(trained["path"], "adclick_click")
    meta = checkpoint_meta(first)
    other_bank = save_checkpoint(tmp_path / "b.pt", "adclick_click", first["state_dict"],
                                 **{**meta, "bank_fingerprint": "0000"})
    combine_checkpoints([trained["path"], other_bank], tmp_path / "e.pt")
    ckpt = load_checkpoint(tmp_path / "e.pt", "adclick_click")
    assert [m["bank_fingerprint"] for m in ckpt["trained_on"]["members"]] == [first["bank_fingerprint"], "0000"]
    assert ckpt["bank_fingerprint"] == joint_fingerprint([first["bank_fingerprint"], "0000"])
    assert ckpt["bank_fingerprint"] not in (first["bank_fingerprint"], "0000")
    assert joint_fingerprint(["0000", "0000"]) == "0000"


def test_click_ensemble_refuses_members_that_cannot_answer_together(trained, tmp_path):
    from adclick_core.utils.checkpoint import combine_checkpoints

    first = load_checkpoint(trained["path"], "adclick_click")
    meta = checkpoint_meta(first)
    other_k = {**meta["residual_config"], "k": meta["residual_config"]["k"] + 2}
    other_residuals = save_checkpoint(tmp_path / "r.pt", "adclick_click", first["state_dict"],
                                      **{**meta, "residual_config": other_k})
    with pytest.raises(CheckpointError, match="residual_config"):
        combine_checkpoints([trained["path"], other_residuals], tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="at least 2"):
        combine_checkpoints([trained["path"]], tmp_path / "e.pt")
    assert not (tmp_path / "e.pt").exists()
    ens = tmp_path / "ens.pt"
    combine_checkpoints([trained["path"], trained["path"]], ens)
    with pytest.raises(CheckpointError, match="already an ensemble"):
        combine_checkpoints([ens, trained["path"]], tmp_path / "e.pt")
    # A file whose member count does not match its weights is a clear error, not a crash.
    broken = save_checkpoint(tmp_path / "broken.pt", "adclick_click", load_checkpoint(ens, "adclick_click")["state_dict"],
                             **{**meta, "ensemble_members": 3})
    with pytest.raises(CheckpointError, match="do not fit"):
        ClickPredictor.from_checkpoint(broken, device="cpu", random_init_backbone=True)


# ---------------------------------------------------------------- real defects


def _with_spot(seed: int, hw: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    img = texture(seed, hw)
    y0, x0, y1, x1 = box
    mask = np.zeros(hw, bool)
    mask[y0:y1, x0:x1] = True
    img[mask] = 20
    return img, mask


def test_defect_pool_holds_each_defect_whole_and_zoomed_in(setup):
    extractor, _, _, _ = setup
    normals = [texture(i, (192, 160)) for i in range(4)]
    bank = ReferenceBank.build(extractor, normals, names=[f"n{i}" for i in range(4)], progress=False)
    large = _with_spot(50, (192, 160), (60, 50, 110, 100))  # 50 px: survives the resize to 64
    tiny = _with_spot(51, (192, 160), (100, 90, 102, 92))  # 2 px: gone at 64, kept in a crop
    pool = training.build_defect_pool(extractor, bank, [large, tiny, (texture(52, (192, 160)),
                                                                      np.zeros((192, 160), bool))],
                                      RESIDUAL, progress=False, crops_per_image=2)
    assert len(pool) == 1 + 2 + 2  # large: whole + 2 crops; tiny: 2 crops; the image without defect: none
    assert pool.residual.shape[1:] == (256, 8, 8) and pool.masks.shape[1:] == (64, 64)
    assert all(m.any() for m in pool.masks)
    whole = pool.masks[0]
    assert abs(whole.sum() - 50 * 50 * (64 / 192) * (64 / 160)) < 60  # the large spot at 64 px
    for crop in pool.masks[1:3]:  # a crop shows the spot larger than the whole image does
        assert crop.sum() > whole.sum()
    assert all(m.sum() < 64 * 64 / 4 for m in pool.masks[3:])  # the tiny spot stays small
    # The defect stands out in its residual: more energy under the mask than beside it.
    energy = pool.residual.float().norm(dim=1)
    cell = F.adaptive_max_pool2d(torch.from_numpy(pool.masks[:1]).float()[:, None], 8)[0, 0] > 0
    assert energy[0][cell].mean() > energy[0][~cell].mean()


def test_defect_pool_refuses_a_mask_of_another_size(setup):
    extractor, bank, normals, _ = setup
    with pytest.raises(ValueError, match="differ in size"):
        training.build_defect_pool(extractor, bank, [(normals[0], np.ones((10, 10), bool))], RESIDUAL,
                                   progress=False, crops_per_image=0)
