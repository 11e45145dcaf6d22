"""ADClick-Seg: label kinds, ``train_seg`` on every kind of label (language on and off), learning on a
toy set, and the ``SegPredictor`` built from the checkpoints (Eq. 7, sizes, errors)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image
from scipy import ndimage
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adclick_core.features.backbone import BackboneConfig, build_extractor
from adclick_core.utils.checkpoint import load_checkpoint
from adclick_core.inference.clicks import Click
from adclick_core.utils.errors import CheckpointError, InputError
from adclick_core.evaluation.metrics import pixel_ap
from adclick_core.models import ADClickConfig
from adclick_core.models.language import PWAM
from adclick_core.inference.predictor import ImageState, MapFusion, SegPredictor, fuse_with_map, gate_by_image_score, smooth_map
from adclick_core.features.prompts import PromptEncoder, TextEncoderConfig
from adclick_core.features.reference import ReferenceBank
from adclick_core.features.residuals import ResidualConfig
from adclick_core.training.synthesis import AnomalySynthesizer
from adclick_core.training.seg import (SEG_KIND, SegItem, SegProduct, SegTrainConfig, bank_map_reference,
                                       bank_residual_scale, item_label_kind, normalize_residual,
                                       seg_synthesizer, seg_synthetic_pool,
                                       train_seg)
from adclick_core.training.click import ClickTrainConfig, build_synthetic_pool, train_click
from tests.images import defective, texture

BACKBONE = BackboneConfig(input_size=64)
RESIDUAL = ResidualConfig(k=3, radius=2.0)
TYPES = ["crack", "scratch"]


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def tiny_model() -> ADClickConfig:
    return ADClickConfig(head="token", embed_dim=16, depth=2, num_heads=2, window_size=4, drop_path=0.0)


def tiny_config(iterations: int = 3, language: bool = True, **kw) -> SegTrainConfig:
    base = dict(iterations=iterations, batch_size=4, lr=3e-3, warmup=2, ema_decay=0.9, seed=0, language=language,
                model=tiny_model())
    base.update(kw)
    return SegTrainConfig(**base)


# ---------------------------------------------------------------- shared tiny world


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    extractor = build_extractor(BACKBONE, random_init=True, device="cpu")
    normals = [texture(i) for i in range(6)]
    bank = ReferenceBank.build(extractor, normals, names=[f"n{i}" for i in range(6)], progress=False)
    pool = build_synthetic_pool(extractor, bank, normals, RESIDUAL, per_image=1, seed=0, progress=False,
                                bank_index=list(range(6)))
    return extractor, bank, normals, pool


_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "crack", "scratch", "on", "the", "surface",
          "photo", "of", "with", "small", "large", "defect"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> PromptEncoder:
    """A tiny BERT written here (no 90 MB MiniLM needed)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(_WORDS) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(_WORDS), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(d))
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    return PromptEncoder(TextEncoderConfig(path=str(d), max_length=24), device="cpu")


def load_predictor(path, bank) -> SegPredictor:
    torch.manual_seed(0)  # the same random backbone the bank was built with
    return SegPredictor.from_checkpoint(path, bank, device="cpu", random_init_backbone=True)


def labelled_items() -> dict[str, list[SegItem]]:
    """Two items of every label kind, over both defect types."""
    out: dict[str, list[SegItem]] = {"mask": [], "clicks": [], "boxes": [], "tag": []}
    for i in range(2):
        img, m = defective(i)
        out["mask"].append(SegItem(img, TYPES[i], mask=m))
        img, m = defective(10 + i)
        ys, xs = np.nonzero(m)
        prob = np.where(m, 0.9, 0.05).astype(np.float32)
        prob[:2] = 0.5  # an uncertain band (abandoned by Eq. 9)
        clicks = [Click(float(xs.mean()), float(ys.mean()), True), Click(2.0, 60.0, False)]
        out["clicks"].append(SegItem(img, TYPES[i], click_prob=prob, clicks=clicks))
        img, m = defective(20 + i)
        out["boxes"].append(SegItem(img, TYPES[i], boxes=[box_of(m)]))
    img, _ = defective(30)
    out["tag"] += [SegItem(img, "crack", tag="NG"), SegItem(texture(40), None, tag="ok"),
                   SegItem(defective(31)[0], "scratch", tag="ng"), SegItem(texture(41), None, tag="OK")]
    return out


def test_seg_synthetic_pool_adds_edge_anomalies_and_leaves_bank_images_out(world, tmp_path):
    extractor, bank, normals, _ = world
    paths = []
    for i, img in enumerate(normals[:4]):
        paths.append(tmp_path / f"n{i}")  # the bank's names: these files are its images
        Image.fromarray(img).save(paths[-1].with_suffix(".png"))
        paths[-1] = paths[-1].with_suffix(".png")
    bank_named = ReferenceBank.build(extractor, normals, names=[p.name for p in paths] + ["n4", "n5"], progress=False)
    edges = seg_synthetic_pool(extractor, bank_named, paths, RESIDUAL, progress=False, synthesizer=AnomalySynthesizer(p_edge=0.99))
    assert len(edges) == 4
    for m in edges.masks:  # bands / chips: every mask touches the image border
        assert m.any() and (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    # Left out of its own retrieval, a bank image's unchanged cells cannot match themselves: the same
    # images as arrays (no name, so not left out) give smaller residuals there.
    as_arrays = seg_synthetic_pool(extractor, bank_named, normals[:4], RESIDUAL, progress=False, synthesizer=AnomalySynthesizer(p_edge=0.99))
    np.testing.assert_array_equal(as_arrays.masks, edges.masks)  # seeded: the same anomalies
    far = ~torch.from_numpy(ndimage.binary_dilation(edges.masks, iterations=12, axes=(1, 2))[:, ::8, ::8].copy())
    assert far.any()
    left_out = edges.residual.float().norm(dim=1)[far].mean()
    assert left_out > 1.5 * as_arrays.residual.float().norm(dim=1)[far].mean()


def test_seg_synthetic_pool_photometric_share_relights_the_normal_surface(world):
    """Relit composites still carry anomalies, but their normal cells move away from the bank:
    larger residuals far from any anomaly — what the unsupervised model learns to call normal."""
    extractor, bank, normals, _ = world
    plain = seg_synthetic_pool(extractor, bank, normals[:4], RESIDUAL, progress=False)
    relit = seg_synthetic_pool(extractor, bank, normals[:4], RESIDUAL, progress=False,
                               synthesizer=AnomalySynthesizer(p_edge=0.3, p_photometric=1.0))
    # the jitter is drawn after the first anomaly (later ones follow another stream)
    np.testing.assert_array_equal(plain.masks[0], relit.masks[0])
    assert all(m.any() for m in relit.masks)

    def far_norm(pool):
        far = ~torch.from_numpy(ndimage.binary_dilation(pool.masks, iterations=12, axes=(1, 2))[:, ::8, ::8].copy())
        assert far.any()
        return pool.residual.float().norm(dim=1)[far].mean()

    assert far_norm(relit) > 1.1 * far_norm(plain)


# ---------------------------------------------------------------- item_label_kind


def test_item_label_kind_each_kind():
    img = texture(0)
    m = np.zeros((64, 64), bool)
    assert item_label_kind(SegItem(img, mask=m)) == "mask"
    assert item_label_kind(SegItem(img, click_prob=np.zeros((64, 64), np.float32))) == "clicks"
    assert item_label_kind(SegItem(img, boxes=[(1, 2, 3, 4)])) == "boxes"
    for tag in ("OK", "ok", "NG", "ng", "Ng"):
        assert item_label_kind(SegItem(img, tag=tag)) == "tag"
    # Precedence: the richest label wins.
    assert item_label_kind(SegItem(img, mask=m, boxes=[(1, 2, 3, 4)], tag="NG")) == "mask"
    assert item_label_kind(SegItem(img, click_prob=np.zeros((64, 64)), boxes=[(1, 2, 3, 4)])) == "clicks"
    assert item_label_kind(SegItem(img, boxes=[(1, 2, 3, 4)], tag="OK")) == "boxes"


def test_item_label_kind_without_label_raises():
    img = texture(0)
    for item in (SegItem(img), SegItem(img, "crack"), SegItem(img, tag="maybe"), SegItem(img, boxes=[])):
        with pytest.raises(ValueError, match="without any label"):
            item_label_kind(item)


def test_box_prompted_item_leaves_the_uncovered_box_unknown(world):
    """A box-prompted click answer covering part of the box: the rest of the box is unknown (not
    normal), outside the box is normal, the answer is positive, and the box is a MIL region."""
    from adclick_core.training.seg import _prepare

    extractor, bank, _, _ = world
    img = texture(3)
    prob = np.full((64, 64), 0.02, np.float32)
    prob[20:30, 20:30] = 0.95  # the answer: a quarter of the 20 x 20 box
    item = SegItem(img, "crack", click_prob=prob, clicks=[Click(25.0, 25.0, True)], boxes=[(20.0, 20.0, 40.0, 40.0)])
    data = _prepare([item], extractor, bank, RESIDUAL, progress=False)
    valid, target, mil = data.valid[0].numpy(), data.target[0].numpy(), data.mil[0].numpy()
    assert data.kind == ["clicks"]
    assert valid[22:28, 22:28].all() and (target[22:28, 22:28] > 0.5).all()
    assert not valid[32:38, 32:38].any() and not valid[22:28, 32:38].any()
    assert valid[:15].all() and valid[45:].all() and (target[45:] < 0.5).all()
    assert mil[20:40, 20:40].all() and not mil[:15].any()
    # Without the box the same answer labels everything it does not cover as normal.
    plain = _prepare([SegItem(img, "crack", click_prob=prob, clicks=[Click(25.0, 25.0, True)])], extractor, bank,
                     RESIDUAL, progress=False)
    assert plain.valid[0].all() and not plain.mil[0].any()


def test_bank_normals_are_the_bank_images_residuals_with_all_normal_labels(world):
    """A bank image as a normal sample: from the bank's stored features, the same residual as the
    image file gives as an OK item (itself excluded from its references either way), all pixels
    labelled normal, no MIL region."""
    from adclick_core.training.seg import _bank_normals, _prepare

    extractor, bank, normals, _ = world
    data = _bank_normals(bank, RESIDUAL, [1, 4], 64)
    assert data.kind == ["normal", "normal"] and data.defect_type == [None, None]
    assert data.residual.shape == (2, extractor.feature_dim, extractor.grid_size, extractor.grid_size)
    assert (data.target == 0).all() and data.valid.all() and not data.mil.any()
    from_files = _prepare([SegItem(normals[1], None, tag="OK"), SegItem(normals[4], None, tag="OK")],
                          extractor, bank, RESIDUAL, progress=False)
    torch.testing.assert_close(data.residual.float(), from_files.residual.float(), atol=2e-2, rtol=2e-2)
    # Not the trivial zero residual of an image matched against itself.
    assert data.residual.float().abs().mean() > 1e-3


@pytest.mark.parametrize("count,fraction,expected", [(200, 0.25, 5), (3, 0.25, 3), (200, 0.0, 0)])
def test_train_seg_draws_normals_from_the_bank(count, fraction, expected, world):
    """Bank normals: up to ``bank_normals`` of the bank's images (capped at its size - 1, 6 images
    here), none when their batch share is 0 or when nothing is labelled (unsupervised)."""
    extractor, bank, _, pool = world
    items = labelled_items()["mask"]
    cfg = tiny_config(iterations=2, language=False, bank_normals=count, normal_fraction=fraction)
    _, summary = train_seg(items, extractor, bank, cfg, residual_config=RESIDUAL, synthetic=pool, progress=False)
    assert summary["bank_normals"] == expected
    assert summary["labelled_images"] == 2 and summary["label_kinds"] == {"mask": 2}
    _, unsupervised = train_seg([], extractor, bank, cfg, residual_config=RESIDUAL, synthetic=pool, progress=False)
    assert unsupervised["bank_normals"] == 0
    # OK-tagged items are the normals then (in a project, the bank's own images): none drawn.
    with_ok = items + [SegItem(texture(50), None, tag="OK")]
    _, tagged = train_seg(with_ok, extractor, bank, cfg, residual_config=RESIDUAL, synthetic=pool, progress=False)
    assert tagged["bank_normals"] == 0 and tagged["label_kinds"] == {"mask": 2, "tag": 1}


def test_train_seg_rejects_unlabelled_item_and_empty_input(world):
    extractor, bank, _, _ = world
    with pytest.raises(ValueError, match="without any label"):
        train_seg([SegItem(texture(0), "crack")], extractor, bank, tiny_config(language=False),
                  residual_config=RESIDUAL, progress=False)
    with pytest.raises(ValueError, match="nothing to train on"):
        train_seg([], extractor, bank, tiny_config(language=False), residual_config=RESIDUAL, progress=False)


# ---------------------------------------------------------------- train_seg on each kind of label


@pytest.mark.parametrize("kind", ["mask", "clicks", "boxes", "tag"])
def test_train_seg_each_label_kind_with_language(kind, world, encoder, tmp_path):
    extractor, bank, _, pool = world
    items = labelled_items()[kind]
    out = tmp_path / f"{kind}.pt"
    progress: list[tuple[float, str]] = []
    model, summary = train_seg(items, extractor, bank, tiny_config(iterations=3), residual_config=RESIDUAL,
                               synthetic=pool, prompt_encoder=encoder, out=out,
                               progress=lambda f, m: progress.append((f, m)))
    assert summary["label_kinds"] == {kind: len(items)}
    assert summary["labelled_images"] == len(items)
    # The default 200, capped; none where OK-tagged items are the normals.
    assert summary["bank_normals"] == (0 if kind == "tag" else len(bank) - 1)
    assert summary["synthetic_pool"] == len(pool)
    assert summary["language"] is True
    assert summary["defect_types"] == TYPES  # from the items, sorted
    assert np.isfinite(summary["loss_first_50"]) and np.isfinite(summary["loss_last_50"])
    assert progress[0][0] == 0.0 and progress[-1] == (1.0, f"checkpoint written: {out}")
    assert not model.training

    ckpt = load_checkpoint(out, SEG_KIND)
    assert ckpt["defect_types"] == TYPES
    assert set(ckpt["prompt_features"]) == set(TYPES)
    for t in TYPES:
        feat = ckpt["prompt_features"][t]
        assert feat.shape == (encoder.feature_dim,)
        # Eq. 6: the stored vector is the average of the type's template phrases.
        torch.testing.assert_close(feat, encoder.defect_features(t).mean)
    assert ckpt["model_config"]["text_dim"] == encoder.feature_dim
    assert ckpt["model_config"]["head"] == "token"
    assert ckpt["backbone"] == BACKBONE.to_dict()
    assert ckpt["residual_config"] == RESIDUAL.to_dict()
    assert ckpt["bank_fingerprint"] == bank.fingerprint
    assert ckpt["train_summary"]["label_kinds"] == {kind: len(items)}
    # The pre-annotation threshold is calibrated on labelled pixels where defects are known,
    # else on the synthetic pool, and travels with the weights.
    cal = summary["threshold"]
    # Two labelled images are too few to hold any out: calibrated on the training images.
    assert cal["source"] == ("the training images (too few labelled images to hold any out)"
                             if kind in ("mask", "clicks") else "synthetic anomalies")
    assert 0.05 <= ckpt["threshold"] == cal["threshold"] <= 0.95 and cal["images"] > 0

    pred = load_predictor(out, bank)
    assert pred.threshold == ckpt["threshold"]
    assert pred.defect_types == TYPES
    assert set(pred.prompt_features) == set(TYPES)
    for k, v in model.state_dict().items():
        assert torch.equal(pred.model.state_dict()[k], v), k
    amap, score = pred.predict(texture(5))
    assert amap.shape == (64, 64) and np.isfinite(amap).all()


def test_train_seg_mixed_kinds_without_language(world, tmp_path):
    extractor, bank, _, pool = world
    by_kind = labelled_items()
    items = [it for k in ("mask", "clicks", "boxes", "tag") for it in by_kind[k]]
    out = tmp_path / "mixed.pt"
    _, summary = train_seg(items, extractor, bank, tiny_config(iterations=4, language=False),
                           residual_config=RESIDUAL, synthetic=pool, defect_types=["scratch", "crack", "dent"],
                           out=out, progress=False)
    assert summary["label_kinds"] == {"boxes": 2, "clicks": 2, "mask": 2, "tag": 4}
    assert summary["labelled_images"] == 10
    assert summary["language"] is False
    assert summary["defect_types"] == ["crack", "dent", "scratch"]  # given types win over the items'
    ckpt = load_checkpoint(out, SEG_KIND)
    assert ckpt["prompt_features"] == {}
    assert ckpt["model_config"]["text_dim"] == 0
    assert not any(".fusion." in k for k in ckpt["state_dict"])  # no PWAM without language
    pred = load_predictor(out, bank)
    assert pred.prompt_features == {}
    assert pred.defect_types == ["crack", "dent", "scratch"]


def test_train_seg_with_language_adds_pwam(world, encoder, tmp_path):
    extractor, bank, _, pool = world
    items = labelled_items()["mask"]
    train_seg(items, extractor, bank, tiny_config(iterations=2), residual_config=RESIDUAL, synthetic=pool,
              prompt_encoder=encoder, out=tmp_path / "l.pt", progress=False)
    sd = load_checkpoint(tmp_path / "l.pt", SEG_KIND)["state_dict"]
    assert any(k.startswith("trunk.fusion.1.") for k in sd)  # PWAM after block 1 (block 3 > depth is dropped)


def test_train_seg_unsupervised_synthetic_only(world, tmp_path):
    extractor, bank, _, pool = world
    _, summary = train_seg([], extractor, bank, tiny_config(iterations=3, language=False), residual_config=RESIDUAL,
                           synthetic=pool, out=tmp_path / "unsup.pt", progress=False)
    assert summary["labelled_images"] == 0 and summary["label_kinds"] == {}
    assert summary["defect_types"] == ["defect"]
    pred = load_predictor(tmp_path / "unsup.pt", bank)
    assert pred.defect_types == ["defect"]
    assert pred.predict(texture(3))[0].shape == (64, 64)


def test_train_seg_reads_image_paths_and_non_square_images(world, tmp_path):
    extractor, bank, _, _ = world
    img, m = defective(50, (48, 80))
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    box = box_of(m)
    items = [SegItem(path, "crack", mask=m), SegItem(img, "crack", boxes=[box])]
    _, summary = train_seg(items, extractor, bank, tiny_config(iterations=2, language=False),
                           residual_config=RESIDUAL, out=tmp_path / "p.pt", progress=False)
    assert summary["label_kinds"] == {"boxes": 1, "mask": 1}
    assert summary["synthetic_pool"] == 0


def test_threshold_is_calibrated_on_labelled_images_held_out_of_training(world, tmp_path):
    extractor, bank, _, pool = world
    items = [SegItem(img, "crack", mask=m) for img, m in (defective(70 + i) for i in range(10))]
    cfg = tiny_config(iterations=10, language=False, calibration_min_images=8, calibration_holdout=0.2,
                      calibration_at=0.5)
    _, summary = train_seg(items, extractor, bank, cfg, residual_config=RESIDUAL, synthetic=pool, progress=False)
    cal = summary["threshold"]
    assert cal["source"] == "labelled images held out of training until iteration 5", cal
    assert cal["images"] == 2 and 0.05 <= cal["threshold"] <= 0.95
    # Below the minimum, the training images are all there is.
    _, summary = train_seg(items[:7], extractor, bank, cfg, residual_config=RESIDUAL, synthetic=pool, progress=False)
    assert summary["threshold"]["source"].startswith("the training images") and summary["threshold"]["images"] == 7


# ---------------------------------------------------------------- it learns


def test_training_raises_pixel_ap_on_toy_set(world, tmp_path):
    extractor, bank, _, pool = world
    data = [defective(i) for i in range(8)]
    items = [SegItem(img, "square", mask=m) for img, m in data]

    def ap_after(iterations: int) -> float:
        # All 8 images train from the start (no calibration hold-out) with a full batch of them (no
        # bank normals: at 70 iterations they hold AP at 0.35): this test is about learning, so the
        # raw maps are scored (no image-score gating, an inference-side re-ranking across images).
        cfg = SegTrainConfig(iterations=iterations, batch_size=8, lr=3e-3, warmup=5, ema_decay=0.9, seed=0,
                             language=False, model=tiny_model(), calibration_holdout=0.0, normal_fraction=0.0,
                             gate_by_image_score=False)
        out = tmp_path / f"toy{iterations}.pt"
        _, summary = train_seg(items, extractor, bank, cfg, residual_config=RESIDUAL, synthetic=pool, out=out,
                               progress=False)
        pred = load_predictor(out, bank)
        maps = [pred.predict(img)[0] for img, _ in data]
        return pixel_ap(maps, [m for _, m in data]), summary

    ap0, s0 = ap_after(1)
    ap1, s1 = ap_after(70)
    assert s1["loss_last_50"] < s1["loss_first_50"]
    assert ap1 > ap0 + 0.25, (ap0, ap1)
    assert ap1 > 0.4, ap1  # the square is found, not just slightly better than at random init


# ---------------------------------------------------------------- SegPredictor


@pytest.fixture(scope="module")
def lang_ckpt(world, encoder, tmp_path_factory):
    extractor, bank, _, pool = world
    items = labelled_items()["mask"] + labelled_items()["boxes"]
    out = tmp_path_factory.mktemp("seg") / "lang.pt"
    train_seg(items, extractor, bank, tiny_config(iterations=4), residual_config=RESIDUAL, synthetic=pool,
              prompt_encoder=encoder, out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def nolang_ckpt(world, tmp_path_factory):
    extractor, bank, _, pool = world
    out = tmp_path_factory.mktemp("seg") / "nolang.pt"
    train_seg(labelled_items()["mask"], extractor, bank, tiny_config(iterations=3, language=False),
              residual_config=RESIDUAL, synthetic=pool, defect_types=TYPES, out=out, progress=False)
    return out


def test_predict_original_size_range_and_score(lang_ckpt, world):
    _, bank, _, _ = world
    pred = load_predictor(lang_ckpt, bank)
    img, _ = defective(60, (50, 70))
    amap, score = pred.predict(img, TYPES)
    assert amap.shape == (50, 70) and amap.dtype == np.float32
    assert 0.0 <= amap.min() and amap.max() <= 1.0
    assert isinstance(score, float) and score == pytest.approx(float(amap.max()), abs=0)
    # An array and its prepared state give the same answer; None = the checkpoint's types.
    state = pred.set_image(img)
    assert isinstance(state, ImageState) and state.original_hw == (50, 70)
    again, score2 = pred.predict(state)
    np.testing.assert_allclose(again, amap, atol=1e-6)
    assert score2 == pytest.approx(score, abs=1e-6)


def test_predict_per_type_keys_and_eq7_max(lang_ckpt, world):
    _, bank, _, _ = world
    pred = load_predictor(lang_ckpt, bank)
    # Make the language branch matter strongly, so the per-type maps really differ: an open gate and
    # far-apart prompt vectors (the tiny encoder's template averages are nearly alike).
    torch.manual_seed(1)
    with torch.no_grad():
        for m in pred.model.modules():
            if isinstance(m, PWAM):
                torch.nn.init.normal_(m.gate[2].weight, std=1.0)
    z = pred.model.config.text_dim
    pred.prompt_features = {"crack": 3 * torch.randn(z), "scratch": 3 * torch.randn(z)}
    state = pred.set_image(defective(61, (50, 70))[0])
    per = pred.predict_per_type(state, ["scratch"])
    assert list(per) == ["scratch"]
    per = pred.predict_per_type(state, ["scratch", "crack"])
    assert list(per) == ["scratch", "crack"]
    assert set(pred.predict_per_type(state)) == set(TYPES)
    for v in per.values():
        assert v.shape == (50, 70) and v.dtype == np.float32 and 0 <= v.min() and v.max() <= 1
    a, b = per["crack"], per["scratch"]
    assert np.abs(a - b).max() > 1e-3  # the prompts change the map
    amap, score = pred.predict(state, ["crack", "scratch"])
    np.testing.assert_allclose(amap, np.maximum(a, b), rtol=0, atol=1e-6)  # Eq. 7
    assert score == pytest.approx(float(np.maximum(a, b).max()), abs=1e-6)
    single, _ = pred.predict(state, ["crack"])
    np.testing.assert_allclose(single, pred.predict_per_type(state, ["crack"])["crack"], atol=1e-6)
    # Here one prompt shifts the whole map; with maps that cross, the answer must be the pixel-wise
    # max, not any one of them.
    c = np.ascontiguousarray(a[:, ::-1])
    assert (a > c).any() and (c > a).any()
    pred.predict_per_type = lambda st, types=None: {"crack": a, "scratch": c, "dent": np.zeros_like(a)}
    amap, score = pred.predict(state, ["crack", "scratch", "dent"])
    np.testing.assert_array_equal(amap, np.maximum(a, c))
    assert amap.dtype == np.float32 and score == float(np.maximum(a, c).max())


def test_gate_by_image_score_scales_each_image_by_its_strongest_answer():
    a = torch.rand(2, 1, 6, 5) * 0.5
    b = torch.rand(2, 1, 6, 5) * 0.5
    b[1, 0, 2, 3] = 0.9  # image 1's strongest answer is in b, image 0's wherever a or b peaks
    gated = gate_by_image_score({"x": a, "y": b, "z": a})
    score = torch.maximum(a.flatten(1).amax(1), b.flatten(1).amax(1)).view(-1, 1, 1, 1)
    torch.testing.assert_close(gated["x"], a * score)
    torch.testing.assert_close(gated["y"], b * score)
    assert gated["x"] is gated["z"]  # a map shared by several types stays one tensor
    assert float(gated["y"][1].max()) == pytest.approx(0.81)


def test_seg_predictor_gates_as_its_checkpoint_was_calibrated(lang_ckpt, world):
    _, bank, _, _ = world
    pred = load_predictor(lang_ckpt, bank)
    assert pred.gated  # the default training config
    state = pred.set_image(defective(64, (44, 52))[0])
    gated = pred.predict_per_type(state, TYPES)
    amap, score = pred.predict(state, TYPES)
    for train_config in ({"gate_by_image_score": False}, {}):  # off, and a checkpoint older than the setting
        pred.checkpoint_info = {**pred.checkpoint_info, "train_config": train_config}
        assert not pred.gated
        raw = pred.predict_per_type(state, TYPES)
        top = max(float(v.max()) for v in raw.values())
        assert top < 1.0
        for t in TYPES:
            np.testing.assert_allclose(gated[t], raw[t] * top, atol=1e-6)
        raw_map, raw_score = pred.predict(state, TYPES)
        assert raw_score == pytest.approx(top, abs=1e-6) and score == pytest.approx(top * top, abs=1e-6)
        assert (np.argsort(raw_map, axis=None) == np.argsort(amap, axis=None)).mean() > 0.99  # same ranking inside
        pred.gate = True  # an evaluation's override, whatever the checkpoint says
        np.testing.assert_allclose(pred.predict(state, TYPES)[0], amap, atol=1e-6)
        pred.gate = None
    pred.checkpoint_info = {**pred.checkpoint_info, "train_config": {"gate_by_image_score": True}}
    pred.gate = False
    assert not pred.gated


def test_trained_language_maps_differ_per_type(lang_ckpt, world):
    _, bank, _, _ = world
    pred = load_predictor(lang_ckpt, bank)
    per = pred.predict_per_type(pred.set_image(defective(62)[0]))
    assert not np.array_equal(per["crack"], per["scratch"])  # the trained gate is open a little


def test_unknown_defect_type_with_language(lang_ckpt, world):
    _, bank, _, _ = world
    pred = load_predictor(lang_ckpt, bank)
    state = pred.set_image(texture(7))
    with pytest.raises(InputError, match="unknown to this model"):
        pred.predict_per_type(state, ["crack", "dent"])
    with pytest.raises(InputError):
        pred.predict(state, ["dent"])


def test_without_language_one_map_for_all_types(nolang_ckpt, world):
    _, bank, _, _ = world
    pred = load_predictor(nolang_ckpt, bank)
    assert pred.model.config.text_dim == 0
    state = pred.set_image(defective(63, (40, 56))[0])
    per = pred.predict_per_type(state, ["crack", "scratch", "never-seen"])
    assert list(per) == ["crack", "scratch", "never-seen"]  # any name is fine: no prompt is used
    assert per["crack"] is per["scratch"] is per["never-seen"]
    assert per["crack"].shape == (40, 56)
    amap, score = pred.predict(state, ["anything"])
    np.testing.assert_array_equal(amap, per["crack"])
    assert score == float(amap.max())


def test_seg_predictor_checkpoint_errors(world, tmp_path):
    extractor, bank, normals, pool = world
    with pytest.raises(CheckpointError, match="no ADClick-Seg checkpoint"):
        SegPredictor.from_checkpoint(None, bank, device="cpu", random_init_backbone=True)
    model = ADClickConfig(in_channels=extractor.feature_dim, embed_dim=16, depth=2, num_heads=2, window_size=4,
                          grid_size=extractor.grid_size, input_size=64, fine_channels=extractor.fine_channels,
                          head_channels=8, drop_path=0.0)
    click = tmp_path / "click.pt"
    train_click(pool, ClickTrainConfig(iterations=1, batch_size=2, warmup=1, model=model), out=click,
                meta={"backbone": BACKBONE.to_dict(), "residual_config": RESIDUAL.to_dict()}, device="cpu",
                progress=False, checkpoint_every=0)
    with pytest.raises(CheckpointError, match="not a adclick_seg checkpoint"):
        SegPredictor.from_checkpoint(click, bank, device="cpu", random_init_backbone=True)


def test_seg_predictor_rejects_bank_of_other_backbone(nolang_ckpt):
    with pytest.raises(CheckpointError, match="rebuild the bank"):
        SegPredictor.from_checkpoint(nolang_ckpt, ReferenceBank(BackboneConfig(input_size=96)), device="cpu",
                                     random_init_backbone=True)


# ---------------------------------------------------------------- fusion with the training-free map


def test_fuse_with_map_hand_computed():
    p = torch.tensor([[[[0.2, 0.4], [0.0, 0.1]]]])  # image score 0.4
    d = torch.tensor([[[[10.0, 0.0], [50.0, 20.0]]]])  # ||r||; reference 10, clipped at 3
    fusion = MapFusion(weight=1.5, reference=10.0, gate_exponent=0.5, clip=3.0)
    out = fuse_with_map({"a": p, "b": p}, d, fusion)
    expected = (p + 1.5 * torch.tensor([[[[1.0, 0.0], [3.0, 2.0]]]])) * 0.4 ** 0.5 / (1 + 1.5 * 3.0)
    torch.testing.assert_close(out["a"], expected)
    assert out["a"] is out["b"]  # a shared map stays one tensor
    assert float(out["a"].max()) <= 1.0
    # the map reorders: a strong residual outranks the model's own peak
    assert out["a"][0, 0, 1, 0] > out["a"][0, 0, 0, 1]
    assert MapFusion.from_dict(fusion.to_dict()) == fusion and MapFusion.from_dict(None) is None


def test_smooth_map_upsamples_and_keeps_a_constant():
    x = torch.full((1, 1, 4, 4), 2.0)
    out = smooth_map(x, (10, 12), sigma=2.0)
    assert out.shape == (1, 1, 10, 12)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))


def test_bank_map_reference_leaves_each_image_out_of_its_own_match(world):
    _, bank, _, _ = world
    ref = bank_map_reference(bank, RESIDUAL, max_images=4)
    assert ref > 0  # against itself every residual would be 0
    assert bank_map_reference(bank, RESIDUAL, max_images=4, quantile=0.5) < ref


def test_unsupervised_training_fuses_with_the_map_labelled_does_not(world, tmp_path):
    extractor, bank, _, pool = world
    _, summary = train_seg([], extractor, bank, tiny_config(iterations=2, language=False), residual_config=RESIDUAL,
                           synthetic=pool, out=tmp_path / "u.pt", progress=False)
    fusion = summary["map_fusion"]
    assert fusion["weight"] == 1.5 and fusion["reference"] == pytest.approx(bank_map_reference(bank, RESIDUAL))
    pred = load_predictor(tmp_path / "u.pt", bank)
    assert pred.map_fusion == MapFusion.from_dict(fusion)
    img = defective(70, (44, 52))[0]
    state = pred.set_image(img)
    fused, _ = pred.predict(state)
    assert 0.0 <= fused.min() and fused.max() <= 1.0
    pred.checkpoint_info = {**pred.checkpoint_info, "map_fusion": None}
    plain, _ = pred.predict(state)
    assert not np.allclose(fused, plain)
    # by hand: the plain (ungated) answer fused with the smoothed ||r||
    pred.gate = False
    raw = torch.from_numpy(pred.predict(state)[0])[None, None]
    d = smooth_map(state.distance[None, None], state.original_hw)
    np.testing.assert_allclose(fused, fuse_with_map({"x": raw}, d, MapFusion.from_dict(fusion))["x"][0, 0].numpy(),
                               atol=1e-5)
    # off by config, and never for labelled training
    _, off = train_seg([], extractor, bank, tiny_config(iterations=2, language=False, map_fusion_weight=0.0),
                       residual_config=RESIDUAL, synthetic=pool, progress=False)
    assert "map_fusion" not in off
    _, labelled = train_seg(labelled_items()["mask"], extractor, bank, tiny_config(iterations=2, language=False),
                            residual_config=RESIDUAL, synthetic=pool, out=tmp_path / "m.pt", progress=False)
    assert "map_fusion" not in labelled
    assert load_predictor(tmp_path / "m.pt", bank).map_fusion is None


def test_seg_synthesizer_recipes():
    labelled, unsupervised = seg_synthesizer(), seg_synthesizer(unsupervised=True)
    assert labelled.p_photometric == 0 and labelled.p_finish == 0 and labelled.p_edge > 0
    assert unsupervised.p_photometric > 0.5 and unsupervised.p_finish > 0 and unsupervised.p_uneven > labelled.p_uneven


# ---------------------------------------------------------------- pre-training on other products


@pytest.fixture(scope="module")
def other_product(world):
    """A second product: other textures as references, its own defects (type 'dent')."""
    extractor = world[0]
    normals = [texture(100 + i) for i in range(5)]
    bank = ReferenceBank.build(extractor, normals, names=[f"o{i}" for i in range(5)], progress=False)
    items = [SegItem(img, "dent", mask=m) for img, m in (defective(70 + i) for i in range(3))]
    return SegProduct(items, bank, "other")


def test_pretraining_learns_from_every_product_against_its_own_bank(world, other_product, encoder, tmp_path):
    """``others``: their images count as labelled, their types join the model's, each is matched
    against its own bank (not the first product's), and the bank normals come from both banks."""
    from adclick_core.training.seg import _prepare

    extractor, bank, _, _ = world
    items = labelled_items()["mask"]
    out = tmp_path / "pre.pt"
    _, summary = train_seg(items, extractor, bank, tiny_config(iterations=3, bank_normals=6), residual_config=RESIDUAL,
                           prompt_encoder=encoder, out=out, progress=False, others=[other_product])
    assert summary["labelled_images"] == 5 and summary["label_kinds"] == {"mask": 5}
    assert summary["defect_types"] == ["crack", "dent", "scratch"]
    assert summary["other_products"] == [{"name": "other", "labelled_images": 3}]
    assert summary["bank_normals"] == 3 + 3  # 6 shared by the two banks, each capped at its size - 1
    ckpt = load_checkpoint(out, SEG_KIND)
    assert ckpt["residual_normalization"] == "per_bank"
    assert (ckpt["state_dict"]["residual_embed.input_scale"] == 1).all()
    assert sorted(ckpt["prompt_features"]) == ["crack", "dent", "scratch"]
    own = _prepare(other_product.items, extractor, other_product.bank, RESIDUAL, progress=False)
    wrong = _prepare(other_product.items, extractor, bank, RESIDUAL, progress=False)
    assert not torch.allclose(own.residual.float(), wrong.residual.float())  # the bank matters


def test_training_continues_from_an_initial_checkpoint(world, other_product, encoder, tmp_path):
    """``init``: the starting weights (input scale included) are the checkpoint's; a checkpoint of
    another shape (language off) or backbone is refused with a clear error."""
    extractor, bank, _, pool = world
    pre = tmp_path / "pre.pt"
    train_seg(labelled_items()["mask"], extractor, bank, tiny_config(iterations=3), residual_config=RESIDUAL,
              prompt_encoder=encoder, out=pre, progress=False, others=[other_product])
    start = load_checkpoint(pre, SEG_KIND)["state_dict"]
    model, summary = train_seg([], extractor, bank, tiny_config(iterations=1, lr=0.0, warmup=0),
                               residual_config=RESIDUAL, synthetic=pool, prompt_encoder=encoder, defect_types=TYPES,
                               progress=False, init=pre)
    assert summary["initialised_from"] == str(pre)
    for k, v in model.state_dict().items():  # lr 0: nothing moved away from the start
        if k != "residual_embed.input_scale":
            torch.testing.assert_close(v.float(), start[k].float(), msg=k)
    # Pre-trained on residuals divided by each product's scale: this project's scale is now the
    # input scale the model divides r^2 by.
    assert (start["residual_embed.input_scale"] == 1).all()
    torch.testing.assert_close(model.residual_embed.input_scale.float(), bank_residual_scale(bank, RESIDUAL))
    with pytest.raises(ValueError, match="text_dim"):
        train_seg([], extractor, bank, tiny_config(iterations=1, language=False), residual_config=RESIDUAL,
                  synthetic=pool, progress=False, init=pre)
    other = build_extractor(BackboneConfig(input_size=96), random_init=True, device="cpu")
    with pytest.raises(ValueError, match="backbone"):
        train_seg([], other, bank, tiny_config(iterations=1), residual_config=RESIDUAL, synthetic=pool,
                  prompt_encoder=encoder, progress=False, init=pre)


def test_pretrained_model_answers_a_new_projects_types_and_fuses_with_its_map(lang_ckpt, world, encoder):
    """A model pre-trained elsewhere answers a project's own defect types (prompts encoded on
    demand, the known ones kept), and ``with_map_fusion`` fuses with this bank's map."""
    _, bank, _, _ = world
    pred = load_predictor(lang_ckpt, bank)
    state = pred.set_image(defective(63)[0])
    with pytest.raises(InputError):
        pred.predict_per_type(state, ["dent"])
    new = pred.with_defect_types(["crack", "dent"], encoder=encoder)
    per = new.predict_per_type(state, ["crack", "dent"])
    assert set(per) == {"crack", "dent"} and per["dent"].shape == state.original_hw
    np.testing.assert_allclose(per["crack"], pred.predict_per_type(state, ["crack"])["crack"], atol=1e-6)
    assert "dent" not in pred.prompt_features  # the original predictor is unchanged
    assert pred.map_fusion is None
    fusion = MapFusion(1.5, bank_map_reference(bank, RESIDUAL), 0.5)
    fused = new.with_map_fusion(fusion)
    assert fused.map_fusion == fusion and new.map_fusion is None
    assert not np.allclose(fused.predict_per_type(state, ["dent"])["dent"], per["dent"])


def test_bank_residual_scale_and_a_per_bank_model_divides_by_its_banks_scale(world, other_product, encoder, tmp_path):
    """The scale is the mean r^2 of bank images against the rest of their bank, per channel; a
    per-bank model answers on residuals divided by the scale of the bank it is given."""
    from adclick_core.training.seg import _bank_self_residuals
    from adclick_core.inference.predictor import seg_probabilities

    extractor, bank, _, _ = world
    scale = bank_residual_scale(bank, RESIDUAL, images=3)
    picked = [0, 2, 5]  # 3 spread over 6 images
    r = torch.cat([_bank_self_residuals(bank, RESIDUAL, i).residual.float() for i in picked])
    torch.testing.assert_close(scale, (r * r).mean(dim=(0, 2, 3)))
    x = torch.randn(2, scale.numel(), 4, 4)
    torch.testing.assert_close(normalize_residual(x, scale) ** 2, x ** 2 / scale.view(1, -1, 1, 1))
    with pytest.raises(ValueError, match="at least 2"):
        bank_residual_scale(ReferenceBank.build(extractor, [texture(0)], progress=False), RESIDUAL)

    pre = tmp_path / "pre.pt"
    train_seg(labelled_items()["mask"], extractor, bank, tiny_config(iterations=2), residual_config=RESIDUAL,
              prompt_encoder=encoder, out=pre, progress=False, others=[other_product])
    pred = load_predictor(pre, bank)
    assert pred.per_bank
    state = pred.set_image(defective(64)[0])
    got = pred.predict_per_type(state, ["crack"])["crack"]
    want = seg_probabilities(pred.model, normalize_residual(state.residual, bank_residual_scale(bank, RESIDUAL)),
                             ["crack"], pred.prompt_features, state.original_hw, state.fine)["crack"]
    pred.gate = False
    ungated = pred.predict_per_type(state, ["crack"])["crack"]
    np.testing.assert_allclose(ungated, want[0, 0].numpy(), atol=1e-6)
    assert got.shape == ungated.shape
    # Another bank, another scale, another answer to the same residuals.
    other = load_predictor(pre, other_product.bank)
    other.gate = False
    assert not np.allclose(other.predict_per_type(state, ["crack"])["crack"], ungated)
