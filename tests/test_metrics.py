"""Metrics against hand-computed values and slow reference implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from adclick_core.utils.errors import InputError
from adclick_core.evaluation.metrics import (
    aupro,
    image_auroc,
    iou,
    mean_iou_at,
    noc,
    pixel_ap,
    pixel_auroc,
    pro_curve,
    segmentation_report,
)

_trapezoid = getattr(np, "trapezoid", None) or np.trapz


# ---------------------------------------------------------------- pixel AP / AUROC


def test_pixel_ap_four_pixels_by_hand():
    # Ranked 0.9(+) 0.8(-) 0.7(+) 0.6(-): precision at the two positives is 1/1 and 2/3,
    # each recall step is 1/2, so AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    scores = np.array([[0.9, 0.8], [0.7, 0.6]])
    masks = np.array([[1, 0], [1, 0]])
    assert pixel_ap(scores, masks) == pytest.approx(5 / 6)


def test_pixel_ap_is_stepwise_with_ties():
    # Scores 0.9(-) 0.5(+) 0.5(-) 0.1(+). Thresholds: 0.9 -> R 0; 0.5 -> tp 1, fp 2, P 1/3,
    # R 1/2; 0.1 -> tp 2, fp 2, P 1/2, R 1. Step-wise AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12.
    # (A trapezoidal AUPR from (0, 1) would give a different, larger number.)
    scores = [np.array([[0.9, 0.5]]), np.array([[0.5], [0.1]])]  # different sizes, pooled
    masks = [np.array([[0, 1]]), np.array([[0], [1]])]
    assert pixel_ap(scores, masks) == pytest.approx(5 / 12)


def test_pixel_ap_matches_sklearn_on_random_pooled_maps():
    rng = np.random.default_rng(0)
    shapes = [(7, 9), (12, 5), (4, 4)]
    scores = [np.round(rng.random(s), 2) for s in shapes]  # rounding makes ties
    masks = [rng.random(s) < 0.2 for s in shapes]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([x.ravel() for x in scores])
    assert pixel_ap(scores, masks) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert pixel_auroc(scores, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_float16_maps_give_the_sklearn_figures(seed):
    """eval-click's answers are float16: they are grouped by a bincount over the float16 values,
    negative values, -0.0 and ties included, and must give sklearn's AP / AUROC and the slow AU-PRO."""
    rng = np.random.default_rng(seed)
    shapes = [(30, 41), (25, 25)]
    masks = [ndimage.gaussian_filter(rng.random(sh), 1.5) > 0.55 for sh in shapes]
    masks[0][0, 0] = True
    scores = [(rng.normal(size=sh) + 1.5 * m).astype(np.float16).astype(np.float32) for sh, m in zip(shapes, masks)]
    scores[1][:3, :3] = -0.0
    scores[1][3:6, :3] = 0.0
    y = np.concatenate([m.ravel() for m in masks])
    flat = np.concatenate([x.ravel() for x in scores])
    assert pixel_ap(scores, masks) == pytest.approx(average_precision_score(y, flat), abs=1e-12)
    assert pixel_auroc(scores, masks) == pytest.approx(roc_auc_score(y, flat), abs=1e-12)
    assert aupro(scores, masks, 0.3) == pytest.approx(_slow_aupro(scores, masks, 0.3), rel=1e-9)


def test_pixel_ap_nan_without_positive_pixels():
    assert math.isnan(pixel_ap([np.zeros((3, 3))], [np.zeros((3, 3), bool)]))


def test_masks_may_be_0_255():
    scores = np.array([[0.9, 0.8], [0.7, 0.6]])
    assert pixel_ap(scores, np.array([[255, 0], [255, 0]], np.uint8)) == pytest.approx(5 / 6)


def test_pixel_auroc_by_hand():
    # Pairs (positive, negative): (.9,.8) ok, (.9,.6) ok, (.7,.8) wrong, (.7,.6) ok -> 3/4.
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    masks = np.array([[1, 0, 1, 0]])
    assert pixel_auroc(scores, masks) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half.
    assert pixel_auroc(np.array([[0.5, 0.5]]), np.array([[1, 0]])) == pytest.approx(0.5)
    assert math.isnan(pixel_auroc(scores, np.ones((1, 4), bool)))


def test_image_auroc_by_hand():
    # Defective 0.35 beats 0.1 but not 0.4; defective 0.8 beats both -> 3 of 4 pairs.
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert image_auroc([0.1, 0.4], [True, False]) == pytest.approx(0.0)
    assert math.isnan(image_auroc([0.1, 0.4], [1, 1]))


def test_shape_mismatch_raises():
    with pytest.raises(InputError):
        pixel_ap([np.zeros((3, 3))], [np.zeros((3, 4), bool)])
    with pytest.raises(InputError):
        aupro([np.zeros((3, 3))], [])
    with pytest.raises(InputError):
        pixel_ap([np.array([[np.nan, 1.0]])], [np.array([[1, 0]])])


# ---------------------------------------------------------------- AU-PRO

# Shared 1 x 6 example. Mask 1 1 0 1 0 0: regions R1 = {0, 1} (size 2), R2 = {3} (size 1),
# normal pixels {2, 4, 5}. Each R1 pixel adds 1/(2*2) = 1/4 to PRO, the R2 pixel 1/2, each
# normal pixel 1/3 to FPR.
_MASK6 = np.array([[1, 1, 0, 1, 0, 0]], dtype=bool)


def test_aupro_two_regions_by_hand():
    # Descending: .9 (R1) .8 (R2) .5 (normal) .4 (R1) .2 .1 (normal). Curve:
    # (0,0) (0,.25) (0,.75) (1/3,.75) (1/3,1) (2/3,1) (1,1).
    scores = np.array([[0.9, 0.4, 0.5, 0.8, 0.2, 0.1]])
    # Up to FPR 0.3 PRO is flat at .75: area 0.3 * .75, normalised 0.75.
    assert aupro(scores, _MASK6) == pytest.approx(0.75)
    # Up to 0.5: 1/3 * .75 + (0.5 - 1/3) * 1 = 5/12; / 0.5 = 5/6.
    assert aupro(scores, _MASK6, fpr_limit=0.5) == pytest.approx(5 / 6)
    # Whole curve: 1/3 * .75 + 2/3 * 1 = 11/12.
    assert aupro(scores, _MASK6, fpr_limit=1.0) == pytest.approx(11 / 12)


def test_aupro_ties_and_interpolation_at_the_limit():
    # As above but the R1 pixel ties the normal pixel at .5: one threshold takes both, so the
    # curve goes straight from (0, .75) to (1/3, 1). Interpolated at 0.3:
    # .75 + .25 * 0.3 / (1/3) = .975; area 0.3 * (.75 + .975) / 2 = .25875; / 0.3 = .8625.
    scores = np.array([[0.9, 0.5, 0.5, 0.8, 0.2, 0.1]])
    assert aupro(scores, _MASK6) == pytest.approx(0.8625)
    # Whole curve: 1/3 * (.75 + 1) / 2 + 2/3 * 1 = 23/24.
    assert aupro(scores, _MASK6, fpr_limit=1.0) == pytest.approx(23 / 24)
    fpr, pro, n_regions = pro_curve(scores, _MASK6)
    assert n_regions == 2
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 1, 1, 1])


def test_aupro_regions_are_8_connected():
    # (0,0)-(1,1) touch diagonally: one region of size 2 with 8-connectivity (3 regions with
    # 4-connectivity). (3,3) is a second region. Only (3,3) scores high (1.0), the other
    # region pixels 0.0 and all normal pixels 0.5. Above FPR 0 PRO = 1/2 (one region of two
    # fully covered) until every normal pixel is in, so AU-PRO@0.3 = 0.5 (4-conn: 1/3).
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    scores = np.full((4, 4), 0.5)
    scores[mask] = 0.0
    scores[3, 3] = 1.0
    assert aupro(scores, mask) == pytest.approx(0.5)


def test_aupro_mean_over_regions_of_all_images():
    # Image A (1 x 4): one region of 3 pixels at .9, a normal pixel at .1.
    # Image B (2 x 2): a one-pixel region at .2, normals .5, .1, .1.
    # Two regions in all, 4 normal pixels. Curve: .9 -> (0, .5); .5 -> (.25, .5);
    # .2 -> (.25, 1); .1 -> (1, 1). Area to .3: .25 * .5 + .05 * 1 = .175; / .3 = 7/12.
    # (Weighting pixels instead of regions would give .75 after the first step.)
    scores = [np.array([[0.9, 0.9, 0.9, 0.1]]), np.array([[0.2, 0.5], [0.1, 0.1]])]
    masks = [np.array([[1, 1, 1, 0]]), np.array([[1, 0], [0, 0]])]
    assert aupro(scores, masks) == pytest.approx(7 / 12)


def test_aupro_stack_is_per_image():
    # A stack N x H x W must not join regions of neighbouring images into 3-D components.
    rng = np.random.default_rng(3)
    scores = rng.random((3, 8, 8))
    masks = np.zeros((3, 8, 8), bool)
    masks[:, 2:5, 2:5] = True
    assert aupro(scores, masks) == pytest.approx(aupro(list(scores), list(masks)))


def test_aupro_nan_without_region_or_normal_pixel():
    assert math.isnan(aupro([np.zeros((3, 3))], [np.zeros((3, 3), bool)]))
    assert math.isnan(aupro([np.zeros((3, 3))], [np.ones((3, 3), bool)]))
    with pytest.raises(InputError):
        aupro([np.zeros((3, 3))], [np.ones((3, 3), bool)], fpr_limit=0.0)


def _slow_aupro(scores, masks, fpr_limit):
    """Loop over every distinct threshold, then np.trapezoid with interpolation at the limit."""
    regions, normal = [], []
    for s, m in zip(scores, masks):
        labeled, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [s[labeled == k] for k in range(1, n + 1)]
        normal.append(s[labeled == 0])
    normal = np.concatenate(normal)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([s.ravel() for s in scores]))[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    x, y = list(fprs[fprs <= fpr_limit]), list(pros[fprs <= fpr_limit])
    beyond = np.nonzero(fprs > fpr_limit)[0]
    if beyond.size:
        j = beyond[0]
        x.append(fpr_limit)
        y.append(np.interp(fpr_limit, fprs[j - 1 : j + 1], pros[j - 1 : j + 1]))
    return _trapezoid(y, x) / fpr_limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    shapes = [(12, 15), (9, 20), (16, 16)]
    masks = [ndimage.gaussian_filter(rng.random(s), 1.5) > 0.55 for s in shapes]
    masks[0][0, 0] = True  # at least one region whatever the seed
    # Anomalous pixels score a bit higher; rounding to 2 decimals creates many ties.
    scores = [np.round(rng.random(s) * 0.8 + 0.3 * m, 2) for s, m in zip(shapes, masks)]
    for limit in (0.01, 0.05, 0.3, 0.77, 1.0):
        assert aupro(scores, masks, fpr_limit=limit) == pytest.approx(
            _slow_aupro(scores, masks, limit), rel=1e-9, abs=1e-12
        )


# ---------------------------------------------------------------- click metrics


def test_iou_by_hand():
    pred = np.array([[1, 1], [0, 0]], bool)
    gt = np.array([[1, 0], [1, 0]], bool)
    assert iou(pred, gt) == pytest.approx(1 / 3)  # intersection 1, union 3
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert iou(np.zeros((2, 2), bool), gt) == 0.0
    with pytest.raises(InputError):
        iou(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_noc():
    ious = [0.5, 0.8, 0.9]
    assert noc(ious, 0.85) == 3
    assert noc(ious, 0.5) == 1  # reaching the target exactly counts
    assert noc(ious, 0.95) == 20
    assert noc(ious, 0.85, max_clicks=2) == 2  # reached only after the budget
    assert noc([], 0.85) == 20


def test_mean_iou_at():
    per_image = [[0.5, 0.7, 0.9], [1.0]]  # the second image stopped after one perfect click
    assert mean_iou_at(per_image, 1) == pytest.approx(0.75)
    assert mean_iou_at(per_image, 2) == pytest.approx(0.85)
    assert mean_iou_at(per_image, 5) == pytest.approx(0.95)
    assert math.isnan(mean_iou_at([], 1))
    with pytest.raises(InputError):
        mean_iou_at(per_image, 0)


def test_segmentation_report_bundles_the_metrics():
    scores = [np.array([[0.9, 0.4, 0.5, 0.8, 0.2, 0.1]]), np.array([[0.3], [0.7]])]
    masks = [_MASK6, np.array([[0], [1]])]
    report = segmentation_report(scores, masks)
    assert set(report) == {"ap", "aupro", "pixel_auroc"}
    assert all(type(v) is float for v in report.values())
    assert report["ap"] == pytest.approx(pixel_ap(scores, masks))
    assert report["aupro"] == pytest.approx(aupro(scores, masks))
    assert report["pixel_auroc"] == pytest.approx(pixel_auroc(scores, masks))


def test_best_f1_threshold_by_hand():
    from adclick_core.evaluation.metrics import best_f1_threshold

    scores = np.array([[0.1, 0.4], [0.35, 0.8]])
    labels = np.array([[0, 0], [1, 1]], dtype=bool)
    # >= 0.35: TP 2, FP 1 -> F1 0.8; >= 0.8: F1 2/3; >= 0.4: F1 0.5; >= 0.1: F1 2/3.
    thr, f1 = best_f1_threshold([scores], [labels])
    assert thr == pytest.approx(0.35) and f1 == pytest.approx(0.8)
    assert best_f1_threshold([scores], [np.zeros((2, 2), bool)]) == (0.5, 0.0)
