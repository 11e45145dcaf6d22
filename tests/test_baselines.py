"""Click-driven baselines on small synthetic images."""
from __future__ import annotations

import numpy as np
import pytest

from adclick_core.inference.baselines import random_walker_probability, residual_cut_probability
from adclick_core.inference.clicks import Click
from adclick_core.utils.errors import InputError
from adclick_core.evaluation.metrics import iou

H, W = 64, 80


def _disk(cy: float, cx: float, r: float, hw=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _dark_disk_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark disk on a noisy bright background, and its mask."""
    rng = np.random.default_rng(seed)
    gt = _disk(30, 45, 14)
    img = 0.8 + 0.05 * rng.standard_normal((H, W))
    img[gt] = 0.25 + 0.05 * rng.standard_normal(int(gt.sum()))
    return np.clip(img, 0, 1), gt


def _window_mean(prob: np.ndarray, cy: int, cx: int, r: int = 3) -> float:
    return float(prob[cy - r : cy + r + 1, cx - r : cx + r + 1].mean())


# ---------------------------------------------------------------- random walker


def test_random_walker_segments_clicked_disk():
    img, gt = _dark_disk_image()
    prob = random_walker_probability(img, [Click(45, 30, True)])
    assert prob.shape == (H, W) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    assert iou(prob >= 0.49, gt) > 0.7


def test_random_walker_rgb_uint8_and_non_square_shapes():
    img, gt = _dark_disk_image(1)
    rgb = (np.repeat(img[..., None], 3, axis=2) * 255).astype(np.uint8)
    prob = random_walker_probability(rgb, [Click(45, 30, True)])
    assert prob.shape == (H, W)
    assert iou(prob >= 0.49, gt) > 0.7

    rng = np.random.default_rng(2)
    # Wider than max_side, so the image is processed downscaled and resized back.
    big = rng.random((150, 230, 3))
    prob = random_walker_probability(big, [Click(100, 70, True)], max_side=64)
    assert prob.shape == (150, 230) and prob.dtype == np.float32
    tall = rng.random((37, 21))
    prob = random_walker_probability(tall, [Click(10, 30, True)])
    assert prob.shape == (37, 21)
    assert prob[30, 10] > 0.9  # the click's own seed


def test_random_walker_negative_click_lowers_probability_around_it():
    img, _ = _dark_disk_image()
    pos = Click(45, 30, True)
    neg_y, neg_x = 30, 35  # inside the disk, off the positive seed
    before = random_walker_probability(img, [pos])
    after = random_walker_probability(img, [pos, Click(neg_x, neg_y, False)])
    assert _window_mean(before, neg_y, neg_x) > 0.8
    assert _window_mean(after, neg_y, neg_x) < _window_mean(before, neg_y, neg_x) - 0.3


def test_random_walker_keeps_positive_click_on_the_border():
    img, _ = _dark_disk_image()
    prob = random_walker_probability(img, [Click(0, 5, True)])
    assert prob[5, 0] > 0.9  # no background seed under the positive disk


def test_random_walker_without_positive_click_is_zero():
    img, _ = _dark_disk_image()
    assert not random_walker_probability(img, []).any()
    prob = random_walker_probability(img, [Click(10, 10, False)])
    assert prob.shape == (H, W) and not prob.any()


def test_random_walker_rejects_click_outside_image():
    img, _ = _dark_disk_image()
    with pytest.raises(InputError):
        random_walker_probability(img, [Click(W + 3, 10, True)])


# ---------------------------------------------------------------- residual cut


def _two_blob_map(scale: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    blob_a = np.exp(-((yy - 18) ** 2 + (xx - 20) ** 2) / (2 * 4.0**2))
    blob_b = np.exp(-((yy - 48) ** 2 + (xx - 65) ** 2) / (2 * 4.0**2))
    return scale * (blob_a + blob_b + 0.02)


def test_residual_cut_keeps_clicked_blob_and_drops_far_one():
    prob = residual_cut_probability(_two_blob_map(), [Click(20, 18, True)])
    assert prob.shape == (H, W) and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    assert prob[18, 20] >= 0.99
    # Blob A's flank, 6 px from the click (outside the forced disk), keeps most of its value:
    # map ~0.345 / 99.5th percentile ~0.9, times proximity exp(-36 / (2 * 15.4^2)) ~0.93.
    assert 0.2 < prob[18, 26] < 0.6
    assert prob[48, 65] < 0.05  # blob B, ~54 px away, is cut


def test_residual_cut_is_scale_invariant():
    clicks = [Click(20, 18, True)]
    a = residual_cut_probability(_two_blob_map(1.0), clicks)
    b = residual_cut_probability(_two_blob_map(1000.0), clicks)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_residual_cut_negative_click_suppresses():
    both = [Click(20, 18, True), Click(65, 40, True)]  # second click 8 px above blob B
    kept = residual_cut_probability(_two_blob_map(), both)
    assert kept[48, 65] > 0.5
    cut = residual_cut_probability(_two_blob_map(), both + [Click(65, 48, False)])
    assert cut[48, 65] == 0.0  # under the negative disk
    assert _window_mean(cut, 48, 65, 8) < _window_mean(kept, 48, 65, 8) - 0.2
    assert cut[18, 20] >= 0.99  # the other blob is untouched


def test_residual_cut_forces_click_disks_and_non_square():
    amap = np.zeros((30, 50))
    prob = residual_cut_probability(amap, [Click(10, 12, True), Click(40, 20, False)])
    assert prob.shape == (30, 50)
    assert prob[12, 10] >= 0.99 and prob[12, 14] >= 0.99  # radius-5 disk
    assert prob[12, 17] == 0.0  # outside the disk the (empty) map stays empty
    assert prob[20, 40] == 0.0


def test_residual_cut_without_positive_click_is_zero():
    assert not residual_cut_probability(_two_blob_map(), []).any()
    assert not residual_cut_probability(_two_blob_map(), [Click(20, 18, False)]).any()
