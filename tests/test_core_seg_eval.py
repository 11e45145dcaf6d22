"""``eval-seg`` pieces: fold split, boxes from masks, weak items from an MVTec-style folder, and one
tiny end-to-end ``evaluate_seg`` run (64 px, a click checkpoint trained here, a tiny text encoder)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adclick_core.features.backbone import BackboneConfig
from adclick_core.utils.data import MVTecFolder, Sample
from adclick_core.utils.errors import MissingWeightsError
from adclick_core.inference.predictor import ClickPredictor
from adclick_core.features.prompts import TEXT_ENCODER_ENV
from adclick_core.features.residuals import ResidualConfig
from adclick_core.evaluation.seg import SEG_MODES, evaluate_seg, mask_boxes, split_folds, weak_items
from adclick_core.training.seg import item_label_kind
from tests.images import defective, texture as _texture, write_mvtec
from tests.tiny_click import train_tiny_click

BACKBONE = BackboneConfig(input_size=64)
RESIDUAL = ResidualConfig(k=3, radius=2.0)
HW = (48, 64)  # non-square on purpose: maps must come back at the image size


def texture(seed: int, hw=HW) -> np.ndarray:
    return _texture(seed, hw)


# ---------------------------------------------------------------- split_folds


def fake_samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"/nowhere/test/{t}/{i:03d}.png"), t, Path(f"/nowhere/gt/{t}/{i:03d}_mask.png"))
            for t, n in counts.items() for i in range(n)]


def test_split_folds_deterministic_disjoint_covering_stratified():
    samples = fake_samples({"crack": 7, "scratch": 4, "hole": 1, "dent": 10})
    folds = split_folds(samples, seed=3)
    assert len(folds) == 2
    assert split_folds(samples, seed=3) == folds  # same seed, same split
    flat = [s for f in folds for s in f]
    assert len(flat) == len(samples) == len(set(flat))  # disjoint
    assert set(flat) == set(samples)  # covering
    for t, n in {"crack": 7, "scratch": 4, "hole": 1, "dent": 10}.items():
        sizes = [sum(s.defect_type == t for s in f) for f in folds]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1, (t, sizes)
    # Another seed gives another split (same sizes per type).
    other = split_folds(samples, seed=4)
    assert [set(f) for f in other] != [set(f) for f in folds]
    for t in ("crack", "dent"):
        assert sorted(sum(s.defect_type == t for s in f) for f in other) == sorted(
            sum(s.defect_type == t for s in f) for f in folds)


def test_split_folds_three_folds_and_empty():
    samples = fake_samples({"a": 8, "b": 3})
    folds = split_folds(samples, seed=0, n_folds=3)
    assert len(folds) == 3
    flat = [s for f in folds for s in f]
    assert len(flat) == len(set(flat)) == len(samples) and set(flat) == set(samples)
    for t in ("a", "b"):
        sizes = [sum(s.defect_type == t for s in f) for f in folds]
        assert max(sizes) - min(sizes) <= 1, sizes
    assert split_folds([], seed=0) == [[], []]


# ---------------------------------------------------------------- boxes from masks


def testmask_boxes_of_components():
    m = np.zeros((30, 40), bool)
    m[2:6, 3:9] = True  # component 1: rows 2-5, cols 3-8
    m[10:13, 30:35] = True  # component 2
    m[10, 35] = True  # 4-connected to component 2 (extends it by one column)
    m[20, 20] = True  # a diagonal pair: one component under 8-connectivity
    m[21, 21] = True
    m[22, 22] = True
    boxes = mask_boxes(m)
    assert sorted(boxes) == sorted([(3.0, 2.0, 9.0, 6.0), (30.0, 10.0, 36.0, 13.0), (20.0, 20.0, 23.0, 23.0)])
    assert all(isinstance(v, float) for b in boxes for v in b)
    assert mask_boxes(np.zeros((5, 5), bool)) == []
    full = np.ones((4, 6), bool)
    assert mask_boxes(full) == [(0.0, 0.0, 6.0, 4.0)]
    # Boxes as (x0, y0, x1, y1): every mask pixel lies inside its box.
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 30
    ys, xs = np.nonzero(m)
    assert all(any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in boxes) for y, x in zip(ys, xs))


# ---------------------------------------------------------------- a tiny MVTec-style folder


def _square(seed: int) -> tuple[np.ndarray, np.ndarray]:
    return defective(seed, HW, size_range=(8, 14), margin=3, square_seed=500, texture_seed=200)


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    pairs = [_square(k) for k in range(5)]
    for img, m in pairs[3:]:  # crack: two separate defects in one image
        m2 = np.zeros(HW, bool)
        m2[40:44, 4:7] = True
        img[m2] = 10
        m |= m2
    return write_mvtec(tmp_path_factory.mktemp("mvtec") / "toy", [texture(i) for i in range(6)],
                       {"scratch": pairs[:3], "crack": pairs[3:]}, [texture(50 + i) for i in range(2)])


def test_weak_items_masksmask_boxes_tags(mvtec):
    samples = MVTecFolder(mvtec).test_samples(defective_only=True)
    assert len(samples) == 5
    masks = weak_items("masks", samples)
    boxes = weak_items("boxes", samples)
    tags = weak_items("tags", samples)
    for s, a, b, c in zip(samples, masks, boxes, tags):
        gt = s.mask()
        assert gt.shape == HW and gt.any()
        assert item_label_kind(a) == "mask" and item_label_kind(b) == "boxes" and item_label_kind(c) == "tag"
        assert a.defect_type == b.defect_type == c.defect_type == s.defect_type
        np.testing.assert_array_equal(a.mask, gt)
        np.testing.assert_array_equal(a.image, s.image())
        assert b.mask is None and b.boxes == mask_boxes(gt)
        assert len(b.boxes) == (2 if s.defect_type == "crack" else 1)
        assert c.tag == "NG" and c.mask is None and not c.boxes
    with pytest.raises(ValueError, match="no labelled items"):
        weak_items("unsupervised", samples)


@pytest.fixture(scope="module")
def click_setup(tmp_path_factory, mvtec):
    """A click checkpoint trained a few iterations on a random 64 px backbone, and its predictor."""
    path = tmp_path_factory.mktemp("click") / "click.pt"
    bank = train_tiny_click(mvtec, path, BACKBONE, RESIDUAL, random_init=True)
    torch.manual_seed(0)
    pred = ClickPredictor.from_checkpoint(path, bank, device="cpu", random_init_backbone=True)
    return path, pred


def test_weak_items_clicks(mvtec, click_setup):
    _, pred = click_setup
    samples = MVTecFolder(mvtec).test_samples(defective_only=True)
    items = weak_items("clicks5", samples, pred, n_clicks=5)
    assert len(items) == len(samples)
    for s, it in zip(samples, items):
        assert item_label_kind(it) == "clicks" and it.defect_type == s.defect_type
        assert it.click_prob.shape == HW and it.click_prob.dtype == np.float32
        assert 0 <= it.click_prob.min() and it.click_prob.max() <= 1
        assert 1 <= len(it.clicks) <= 5
        gt = s.mask()
        first = it.clicks[0]
        assert first.positive and gt[int(first.y), int(first.x)]  # the first click lands on the defect
        for c in it.clicks:
            assert 0 <= c.x < HW[1] and 0 <= c.y < HW[0]
            # positive clicks on the defect, negative ones on good surface
            assert gt[min(int(c.y), HW[0] - 1), min(int(c.x), HW[1] - 1)] == c.positive
        # The stored map is the predictor's answer to exactly those clicks, each step fed the previous one.
        state = pred.set_image(s.image())
        prob = None
        for k in range(1, len(it.clicks) + 1):
            prob = pred.predict(state, it.clicks[:k], prev_mask=prob)
        np.testing.assert_allclose(it.click_prob, prob, atol=2e-3)  # stored as float16
    two = weak_items("clicks", samples[:2], pred, n_clicks=2)
    assert all(1 <= len(it.clicks) <= 2 for it in two)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "crack", "scratch", "on", "the", "surface"]
    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(str(d))
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    return str(d)


def test_evaluate_seg_end_to_end(mvtec, click_setup, tiny_bert_dir, tmp_path, monkeypatch):
    click_path, _ = click_setup
    monkeypatch.setenv(TEXT_ENCODER_ENV, tiny_bert_dir)  # language modes use the tiny encoder
    runs = tmp_path / "runs"
    result = evaluate_seg(mvtec, runs, modes=SEG_MODES, seed=0, iterations=2, click_checkpoint=str(click_path),
                          bank_path=str(tmp_path / "bank.pt"), device="cpu", progress=False)
    assert set(result["methods"]) == set(SEG_MODES)
    assert len(result["folds"]) == 2
    for row in [result["methods"], *result["folds"]]:
        for mode in SEG_MODES:
            assert set(row[mode]) >= {"ap", "aupro", "pixel_auroc", "image_auroc"}, row[mode]
            for k in ("ap", "aupro", "pixel_auroc", "image_auroc"):
                assert 0.0 <= row[mode][k] <= 1.0, (mode, k, row[mode][k])
    for mode in SEG_MODES:  # methods = mean over folds
        for k, v in result["methods"][mode].items():
            assert v == pytest.approx(np.mean([f[mode][k] for f in result["folds"]]), abs=1e-4)
    split = result["split"]
    assert sorted(split["fold_sizes"]) == [2, 3] and split["good_test_images"] == 2 and split["seed"] == 0
    json.dumps(result)  # plain data
    # One unsupervised model shared by both folds, one per fold for every labelled mode.
    written = {p.name for p in runs.glob("*.pt")}
    expected = {"unsupervised.pt"} | {f"{m}_fold{f}.pt" for m in SEG_MODES if m not in ("residual_map", "unsupervised")
                                      for f in (0, 1)}
    assert written == expected
    assert set(result["training_seconds"]) == expected
    assert (tmp_path / "bank.pt").is_file()
    for name, lang in (("masks_fold0.pt", True), ("clicks5_no_language_fold1.pt", False)):
        ck = torch.load(runs / name, weights_only=True)
        assert ck["kind"] == "adclick_seg" and ck["defect_types"] == ["crack", "scratch"]
        assert ck["train_summary"]["iterations"] == 2
        assert bool(ck["prompt_features"]) is lang
    kinds = torch.load(runs / "tags_fold0.pt", weights_only=True)["train_summary"]["label_kinds"]
    assert kinds["tag"] == 2 * split["fold_sizes"][0]  # NG items of the fold + as many OK images
    # Boxes reach training as the click model's answer to them (box_prompts), one item per image.
    assert torch.load(runs / "boxes_fold1.pt", weights_only=True)["train_summary"]["label_kinds"] == {
        "clicks": split["fold_sizes"][1]}

    # Existing checkpoints are reused, not retrained: the same numbers come back.
    again = evaluate_seg(mvtec, runs, modes=("residual_map", "masks"), seed=0, train_missing=False,
                         click_checkpoint=str(click_path), bank_path=str(tmp_path / "bank.pt"), device="cpu",
                         progress=False)
    assert again["training_seconds"] == {}
    for mode in ("residual_map", "masks"):
        assert again["methods"][mode] == result["methods"][mode]
    # One fold alone scores exactly as in the two-fold run, and the mean is over it only.
    one = evaluate_seg(mvtec, runs, modes=("residual_map", "masks"), seed=0, train_missing=False,
                       click_checkpoint=str(click_path), bank_path=str(tmp_path / "bank.pt"), device="cpu",
                       progress=False, only_folds=[1])
    assert one["fold_ids"] == [1] and len(one["folds"]) == 1
    assert one["folds"][0] == {m: result["folds"][1][m] for m in ("residual_map", "masks")}
    assert one["methods"]["masks"] == one["folds"][0]["masks"]
    # Gating forced off: the training-free map and the image ranking (max vs max^2) are unchanged.
    ungated = evaluate_seg(mvtec, runs, modes=("residual_map", "masks"), seed=0, train_missing=False,
                           click_checkpoint=str(click_path), bank_path=str(tmp_path / "bank.pt"), device="cpu",
                           progress=False, only_folds=[1], gate=False)
    assert one["gate"] == "as each checkpoint says" and ungated["gate"] is False
    assert ungated["folds"][0]["residual_map"] == one["folds"][0]["residual_map"]
    assert ungated["folds"][0]["masks"]["image_auroc"] == one["folds"][0]["masks"]["image_auroc"]
    with pytest.raises(MissingWeightsError):
        evaluate_seg(mvtec, tmp_path / "empty_runs", modes=("masks",), train_missing=False,
                     click_checkpoint=str(click_path), bank_path=str(tmp_path / "bank.pt"), device="cpu",
                     progress=False)


def test_cli_seg_commands_wiring(capsys):
    from adclick_core.cli import build_parser, cmd_eval_seg, cmd_train_seg

    parser = build_parser()
    for cmd, flags in (("eval-seg", ["--runs", "--modes", "--no-train", "--json", "--click-checkpoint", "--folds",
                                     "--gate", "--pretrained"]),
                       ("train-seg", ["--mode", "--fold", "--no-language", "--clicks", "--out", "--set", "--init"]),
                       ("pretrain-seg", ["--data", "--out", "--iterations", "--bank-dir", "--set"])):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([cmd, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for f in flags:
            assert f in text, (cmd, f)
    args = parser.parse_args(["eval-seg", "--data", "d", "--runs", "r"])
    assert args.func is cmd_eval_seg and tuple(args.modes.split(",")) == SEG_MODES and not args.no_train
    args = parser.parse_args(["train-seg", "--data", "d", "--mode", "boxes", "--out", "o.pt", "--fold", "1"])
    assert args.func is cmd_train_seg and args.mode == "boxes" and args.fold == 1 and args.clicks == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["train-seg", "--data", "d", "--mode", "clicks5", "--out", "o.pt"])
    from adclick_core.cli import cmd_pretrain_seg

    args = parser.parse_args(["pretrain-seg", "--data", "a,b", "--data", "c", "--out", "p.pt"])
    assert args.func is cmd_pretrain_seg and args.data == ["a,b", "c"]
    with pytest.raises(SystemExit, match="once"):
        cmd_pretrain_seg(parser.parse_args(["pretrain-seg", "--data", "a,a", "--out", "p.pt"]))


def test_evaluate_seg_scores_a_model_pretrained_on_other_products(mvtec, click_setup, tiny_bert_dir, tmp_path,
                                                                  monkeypatch):
    """``pretrained``: the modes 'pretrained' (no label of this product) and 'pretrained_fused'
    score the checkpoint as it is on this product's types and bank, and a mode that trains starts
    from it; without one those modes are refused."""
    from adclick_core.evaluation.seg import PRETRAINED_MODES
    from adclick_core.training.seg import SegItem, SegProduct, SegTrainConfig, train_seg
    from adclick_core.models import ADClickConfig

    click_path, pred = click_setup
    monkeypatch.setenv(TEXT_ENCODER_ENV, tiny_bert_dir)
    other = write_mvtec(tmp_path / "other", [texture(80 + i) for i in range(5)],
                        {"dent": [_square(40 + k) for k in range(3)]}, [])
    folder = MVTecFolder(other)
    from adclick_core.features.reference import ReferenceBank

    bank = ReferenceBank.build(pred.extractor, folder.train_good(), progress=False)
    items = [SegItem(s.image_path, s.defect_type, mask=s.mask()) for s in folder.test_samples(defective_only=True)]
    pre = tmp_path / "pre.pt"
    cfg = SegTrainConfig(iterations=2, batch_size=4, warmup=1, model=ADClickConfig(
        head="token", embed_dim=16, depth=2, num_heads=2, window_size=4, drop_path=0.0))
    train_seg(items[:1], pred.extractor, bank, cfg, residual_config=RESIDUAL, out=pre, progress=False,
              others=[SegProduct(items[1:], bank, "other")])
    modes = ("residual_map", *PRETRAINED_MODES, "unsupervised")
    result = evaluate_seg(mvtec, tmp_path / "runs", modes=modes, seed=0, iterations=2,
                          click_checkpoint=str(click_path), bank_path=str(tmp_path / "bank.pt"), device="cpu",
                          progress=False, pretrained=pre)
    assert result["pretrained"] == str(pre)
    for mode in modes:
        assert 0.0 <= result["methods"][mode]["ap"] <= 1.0
    assert result["methods"]["pretrained"] != result["methods"]["pretrained_fused"]
    unsup = torch.load(tmp_path / "runs" / "unsupervised.pt", weights_only=True)
    assert unsup["train_summary"]["initialised_from"] == str(pre)
    assert not (tmp_path / "runs" / "pretrained.pt").exists()  # scored as it is, nothing trained
    with pytest.raises(ValueError, match="pre-trained checkpoint"):
        evaluate_seg(mvtec, tmp_path / "runs", modes=("pretrained",), click_checkpoint=str(click_path),
                     bank_path=str(tmp_path / "bank.pt"), device="cpu", progress=False)


def test_seg_product_from_folder_takes_every_defect_image_with_its_mask(mvtec, click_setup, tmp_path):
    from adclick_core.training.seg import SegProduct

    _, pred = click_setup
    product = SegProduct.from_folder(mvtec, pred.extractor, tmp_path / "bank.safetensors", progress=False)
    samples = MVTecFolder(mvtec).test_samples(defective_only=True)
    assert product.name == "toy" and len(product.bank) == len(MVTecFolder(mvtec).train_good())
    assert (tmp_path / "bank.safetensors").is_file()
    assert [(it.image, it.defect_type) for it in product.items] == [(s.image_path, s.defect_type) for s in samples]
    for it, s in zip(product.items, samples):
        np.testing.assert_array_equal(it.mask, s.mask())
