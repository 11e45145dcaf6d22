"""Boundary refinement of click answers (adclick_core/inference/refinement.py) on hand-made images."""
from __future__ import annotations

import numpy as np
import pytest

from adclick_core.inference.clicks import Click
from adclick_core.evaluation.metrics import iou
from adclick_core.inference.refinement import RefineConfig, refine_answer, seeded_boundary

H, W = 160, 200  # a 6 px spot's 3x blob covers ~1.3 % (below max_area_frac)


def _disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _scene(cy=60, cx=80, r=6, seed=0):
    """A dark spot on a bright, slightly noisy tile, and a coarse answer 3x its radius."""
    rng = np.random.default_rng(seed)
    gray = np.clip(200 + rng.normal(0, 4, (H, W)), 0, 255)
    spot = _disc(cy, cx, r)
    gray[spot] = 60
    yy, xx = np.mgrid[:H, :W]
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1.6 * r) ** 2))  # > 0.5 out to ~1.9 r
    return gray.astype(np.uint8), spot, blob.astype(np.float32)


def test_a_coarse_blob_shrinks_onto_the_dark_spot():
    gray, spot, blob = _scene()
    assert iou(blob > 0.5, spot) < 0.35  # the over-segmented answer the click model gives
    out = refine_answer(blob, gray, [Click(80, 60, True)])
    assert out.shape == blob.shape and out.dtype == np.float32
    assert iou(out > 0.5, spot) > 0.8
    yy, xx = np.mgrid[:H, :W]
    far = (np.abs(yy - 60) > 45) | (np.abs(xx - 80) > 45)
    np.testing.assert_array_equal(out[far], blob[far])  # outside the crop nothing moves


def test_a_defect_on_the_image_border_is_kept():
    gray, spot, blob = _scene(cy=3, cx=80, r=7)
    out = refine_answer(blob, gray, [Click(80, 2, True)])
    assert iou(out > 0.5, spot) > 0.7


def test_a_negative_click_inside_the_answer_removes_its_side():
    gray, spot, blob = _scene()
    gray[_disc(60, 94, 5)] = 60  # a second dark spot the user does not want
    yy, xx = np.mgrid[:H, :W]
    # As the model answers a negative click: low around it, the first spot's blob kept.
    away = 1 - np.exp(-((yy - 60) ** 2 + (xx - 94) ** 2) / (2 * 6.0**2))
    answer = (np.maximum(blob, np.roll(blob, 14, axis=1)) * away).astype(np.float32)
    out = refine_answer(answer, gray, [Click(80, 60, True), Click(94, 60, False)])
    assert (out[_disc(60, 94, 5)] < 0.5).all()
    assert iou(out > 0.5, spot) > 0.6


def test_answers_without_positive_clicks_or_anchoring_are_returned_as_they_are():
    gray, _, blob = _scene()
    big = np.zeros((H, W), np.float32)
    big[20:100, 20:140] = 0.9  # 50 % of the image: a soft-edged region, not an intensity edge
    assert refine_answer(big, gray, [Click(80, 60, True)], RefineConfig(relative_threshold=None)) is big
    assert refine_answer(blob, gray, [Click(80, 60, False)]) is blob
    tight = RefineConfig(max_area_frac=1e-4, relative_threshold=None)
    assert refine_answer(blob, gray, [Click(80, 60, True)], tight) is blob


def test_mismatched_sizes_are_an_error():
    gray, _, blob = _scene()
    with pytest.raises(ValueError, match="differ in size"):
        refine_answer(blob, gray[:, :-1], [Click(80, 60, True)])


def _soft_region():
    """A large region the model is sure of at its centre and lukewarm (0.3) over the rest."""
    region = np.zeros((H, W), bool)
    region[20:120, 30:170] = True  # 44 % of the image
    answer = np.where(region, 0.3, 0.02).astype(np.float32)
    answer[60:80, 90:110] = 0.9  # where the user clicked: 1.25 % alone, 44 % with the rest
    answer[20:40, 30:60] = 0.6  # so the raw answer (> 0.5) is large enough to skip the walker
    return region, answer


def test_a_large_lukewarm_answer_is_cut_relative_to_the_clicks():
    region, answer = _soft_region()
    gray = np.full((H, W), 128, np.uint8)
    assert iou(answer > 0.5, region) < 0.15
    out = refine_answer(answer, gray, [Click(100, 70, True)])
    # cut = 0.4 x 0.9 = 0.36: the whole 0.3-region stays out, so with a 0.7 anchor it comes in.
    assert iou(out > 0.5, region) < 0.15
    out = refine_answer(answer, gray, [Click(100, 70, True)], RefineConfig(relative_threshold=0.3, max_growth=None))
    assert iou(out > 0.5, region) == 1.0
    # By default the cut may grow the mask by a quarter at most: the 0.3-region stays out.
    capped = refine_answer(answer, gray, [Click(100, 70, True)], RefineConfig(relative_threshold=0.3))
    assert (answer > 0.5).sum() <= (capped > 0.5).sum() <= 1.25 * (answer > 0.5).sum()
    assert out.dtype == np.float32 and out.shape == answer.shape
    # the order of the pixels is kept (a monotone rescale)
    flat = np.argsort(answer.ravel(), kind="stable")
    assert (np.diff(out.ravel()[flat]) >= -1e-6).all()


def test_the_anchored_cut_never_drops_below_its_floor():
    region, answer = _soft_region()
    gray = np.full((H, W), 128, np.uint8)
    # a positive click where the model says 0.02: the cut stays at min_threshold, not 0.008
    out = refine_answer(answer, gray, [Click(5, 5, True)], RefineConfig(max_growth=None))
    assert ((out > 0.5) == (answer > 0.05)).all()


def _thin_crack(seed=0):
    """A faint 2 px dark vertical line, 90 px long, and a lukewarm (0.7) answer band around it."""
    rng = np.random.default_rng(seed)
    gray = np.clip(150 + rng.normal(0, 6, (H, W)), 0, 255)
    crack = np.zeros((H, W), bool)
    crack[30:120, 99:101] = True
    gray[crack] -= 20
    answer = np.full((H, W), 0.02, np.float32)
    answer[28:122, 95:105] = 0.7  # 2.9 % of the image: below the walker's gate
    return gray.astype(np.uint8), crack, answer


def test_clicks_on_one_thin_crack_are_joined_along_it():
    gray, crack, answer = _thin_crack()
    clicks = [Click(100, 32, True), Click(100, 117, True)]
    alone = refine_answer(answer, gray, clicks, RefineConfig(trace_between_clicks=False))
    traced = refine_answer(answer, gray, clicks)
    # The walker alone keeps the ends and loses the middle; traced, the whole line is in.
    assert (alone[60:90, 99:101] > 0.5).mean() < 0.5 and iou(alone > 0.5, crack) < 0.3
    assert (traced[crack] > 0.5).mean() > 0.9
    assert iou(traced > 0.5, crack) > 0.7


def test_clicks_in_separate_regions_are_not_joined():
    gray, crack, answer = _thin_crack()
    answer[70:80, 95:105] = 0.02  # the answer splits the line in two
    traced = refine_answer(answer, gray, [Click(100, 32, True), Click(100, 117, True)])
    assert (traced[72:78, 99:101] < 0.5).all()


# ---------------------------------------------------------------- click consistency


def test_every_click_pixel_carries_its_label_and_the_last_click_wins():
    from adclick_core.inference.refinement import ClickConsistency, keep_clicks

    prob = np.full((40, 60), 0.3, np.float32)
    prob[10:20, 10:20] = 0.95  # the clicked defect
    out = keep_clicks(prob, [Click(30, 30, True), Click(15, 15, False), Click(31, 30, False)])
    assert out[30, 30] <= 0.05  # the later negative click overrides the positive one beside it
    assert out[15, 15] <= 0.05 and out[30, 28] >= 0.9
    cfg = ClickConsistency(radius=0.0)
    assert keep_clicks(np.zeros((5, 5), np.float32), [Click(2.4, 1.6, True)], cfg)[2, 2] >= 0.9
    untouched = keep_clicks(prob, [])
    np.testing.assert_array_equal(untouched, prob)


def test_mask_parts_no_positive_click_touches_drop_out_of_the_mask():
    from adclick_core.inference.refinement import keep_clicks

    prob = np.zeros((40, 60), np.float32)
    prob[5:12, 5:12] = 0.8  # clicked
    prob[25:35, 40:55] = 0.9  # stray
    out = keep_clicks(prob, [Click(8, 8, True), Click(47, 30, False)])
    assert (out[5:12, 5:12] >= 0.8).all()
    stray = out[25:35, 40:55]
    assert stray.max() < 0.49 and (stray > 0).sum() > 100  # still ranked, out of the mask (also at 0.49)


def _plate(seed=0):
    """A bright 30 x 30 px patch (the defect) on a darker noisy plate, 240 x 300 px."""
    rng = np.random.default_rng(seed)
    gray = np.clip(90 + rng.normal(0, 3, (240, 300)), 0, 255)
    patch = np.zeros((240, 300), bool)
    patch[100:130, 130:160] = True
    gray[patch] += 80
    return gray.astype(np.uint8), patch


def test_seeded_boundary_a_click_takes_in_the_region_an_unsure_model_left_out():
    gray, patch = _plate()
    prob = np.where(patch, 0.45, 0.05).astype(np.float32)  # unsure on the patch, just below the cut
    assert not (prob > 0.5).any()
    out = seeded_boundary(prob, gray, [Click(145, 115, True)])
    assert out.shape == prob.shape and out.dtype == np.float32
    assert iou(out > 0.5, patch) > 0.95  # up to the patch's edges, not beyond


def test_seeded_boundary_a_negative_click_removes_an_unsure_region_and_keeps_the_sure_one():
    gray, patch = _plate()
    gray[100:130, 60:90] += 80  # a second bright patch that the model half believes in
    prob = np.where(patch, 0.9, 0.05).astype(np.float32)
    prob[100:130, 60:90] = 0.6
    out = seeded_boundary(prob, gray, [Click(145, 115, True), Click(75, 115, False)])
    assert iou(out > 0.5, patch) > 0.95
    assert (out[100:130, 60:90] > 0.5).mean() < 0.05


def test_seeded_boundary_keeps_a_sure_answer_where_no_click_disagrees():
    gray, patch = _plate()
    prob = np.where(patch, 0.97, 0.03).astype(np.float32)
    out = seeded_boundary(prob, gray, [Click(145, 115, True)])
    assert iou(out > 0.5, patch) > 0.97
    np.testing.assert_array_equal(out[:20], prob[:20])  # outside the crop nothing moves


def test_seeded_boundary_every_click_disk_takes_its_label():
    gray, patch = _plate()
    prob = np.where(patch, 0.9, 0.1).astype(np.float32)
    clicks = [Click(145, 115, True), Click(40, 40, True), Click(135, 105, False)]
    out = seeded_boundary(prob, gray, clicks)
    assert out[40, 40] > 0.99 and out[105, 135] < 0.01


def test_seeded_boundary_without_clicks_or_with_a_wrong_size():
    gray, patch = _plate()
    prob = np.where(patch, 0.9, 0.1).astype(np.float32)
    assert seeded_boundary(prob, gray, []) is prob
    with pytest.raises(ValueError, match="differ in size"):
        seeded_boundary(prob, gray[:-1], [Click(1, 1, True)])
