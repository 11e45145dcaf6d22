"""Clicks: value type, scaling, disk maps, evaluation / training click simulation, model encoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adclick_core.inference.clicks import (
    Click,
    click_maps,
    encode_clicks,
    next_eval_click,
    next_training_click,
    sample_training_clicks,
    scale_clicks,
)


def square(hw=(40, 40), y0=10, x0=10, size=11) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


# ---------------------------------------------------------------- value type and scaling


def test_click_value_type():
    c = Click(3.0, 4.0)
    assert c.positive is True
    assert c == Click(3.0, 4.0, True)
    assert c != Click(3.0, 4.0, False)
    with pytest.raises(Exception):
        c.x = 5.0  # frozen
    assert c.scaled(2.0, 0.5) == Click(6.0, 2.0, True)
    assert Click(1, 1, False).scaled(3, 3).positive is False


def test_scale_clicks_keeps_pixel_centres():
    src, dst = (50, 70), (100, 140)  # H x W, both axes x2
    out = scale_clicks([Click(0, 0), Click(69, 49, False)], src, dst)
    # Pixel 0 covers [0, 1) -> its centre 0.5 maps to 1.0 -> pixel coordinate 0.5 in the target.
    assert out[0] == Click(0.5, 0.5, True)
    assert out[1] == Click(138.5, 98.5, False)
    # Anisotropic: x by W ratio, y by H ratio.
    out = scale_clicks([Click(10, 20)], (50, 100), (25, 25))
    assert out[0].x == pytest.approx((10.5) * 0.25 - 0.5)
    assert out[0].y == pytest.approx((20.5) * 0.5 - 0.5)
    # Round trip.
    back = scale_clicks(scale_clicks([Click(13.0, 7.0)], (50, 70), (64, 64)), (64, 64), (50, 70))
    assert back[0].x == pytest.approx(13.0) and back[0].y == pytest.approx(7.0)
    assert scale_clicks([], (10, 10), (20, 20)) == []


# ---------------------------------------------------------------- disk maps


def test_click_maps_disks():
    maps = click_maps([Click(10, 20, True), Click(30, 5, False)], (40, 50), radius=3)
    assert maps.shape == (2, 40, 50) and maps.dtype == np.float32
    pos, neg = maps
    yy, xx = np.mgrid[0:40, 0:50]
    want_pos = (yy - 20) ** 2 + (xx - 10) ** 2 <= 9
    want_neg = (yy - 5) ** 2 + (xx - 30) ** 2 <= 9
    np.testing.assert_array_equal(pos > 0, want_pos)
    np.testing.assert_array_equal(neg > 0, want_neg)
    assert pos.sum() == 29  # a radius-3 digital disk
    assert set(np.unique(maps)) <= {0.0, 1.0}
    # Column = x, row = y.
    assert pos[20, 13] == 1 and pos[23, 10] == 1 and pos[20, 14] == 0 and pos[13, 20] == 0


def test_click_maps_radius_and_overlap_and_border():
    maps = click_maps([Click(0, 0), Click(1, 0)], (10, 10), radius=1.0)
    assert maps[0].sum() == 3 + 4 - 2  # two clipped disks sharing two pixels
    assert maps[1].sum() == 0
    assert click_maps([], (5, 6)).shape == (2, 5, 6)
    assert click_maps([], (5, 6)).sum() == 0
    big = click_maps([Click(20, 20)], (41, 41), radius=5.0)[0].sum()
    small = click_maps([Click(20, 20)], (41, 41), radius=2.0)[0].sum()
    assert big == 81 and small == 13


# ---------------------------------------------------------------- evaluation clicks


def test_first_eval_click_is_centre_of_square():
    gt = square()  # rows/cols 10..20, centre (15, 15)
    c = next_eval_click(gt, None)
    assert c == Click(15.0, 15.0, True)


def test_first_eval_click_in_non_square_blob_is_dt_argmax():
    from scipy import ndimage

    gt = np.zeros((30, 40), bool)
    gt[5:12, 3:35] = True  # wide bar
    gt[12:25, 25:35] = True  # plus a leg
    c = next_eval_click(gt, np.zeros_like(gt))
    dt = ndimage.distance_transform_edt(np.pad(gt, 1))[1:-1, 1:-1]
    assert c.positive
    assert dt[int(c.y), int(c.x)] == dt.max()


def test_eval_click_border_counts_as_outside():
    gt = np.zeros((20, 20), bool)
    gt[:, :6] = True  # touches the image border on three sides
    c = next_eval_click(gt, None)
    assert c.positive
    assert 2 <= c.x <= 3  # middle of the 6-wide band, not the border column


def test_eval_click_negative_when_false_positive_region_larger():
    gt = square((60, 60), 5, 5, 5)
    pred = gt.copy()
    pred[:, :] = False
    pred[5:8, 5:10] = True  # part of the defect found: FN strip 2 rows high
    pred[30:50, 30:50] = True  # large false positive
    c = next_eval_click(gt, pred)
    assert c is not None and c.positive is False
    assert 30 <= c.y < 50 and 30 <= c.x < 50
    assert (c.x, c.y) in {(39.0, 39.0), (40.0, 40.0), (39.0, 40.0), (40.0, 39.0)}


def test_eval_click_positive_when_false_negative_larger():
    gt = square((60, 60), 10, 10, 20)
    pred = np.zeros_like(gt)
    pred[50:53, 50:53] = True  # small false positive
    c = next_eval_click(gt, pred)
    assert c.positive and 10 <= c.x < 30 and 10 <= c.y < 30


def test_eval_click_perfect_prediction_none():
    gt = square()
    assert next_eval_click(gt, gt.copy()) is None
    empty = np.zeros((10, 10), bool)
    assert next_eval_click(empty, None) is None


def test_eval_click_avoids_clicked_pixels():
    gt = square((40, 40), 10, 10, 11)
    first = next_eval_click(gt, None)
    second = next_eval_click(gt, None, clicks=[first], click_radius=3)
    assert second is not None and second.positive
    assert (second.x - first.x) ** 2 + (second.y - first.y) ** 2 > 9
    assert gt[int(second.y), int(second.x)]


# ---------------------------------------------------------------- training clicks


@pytest.mark.parametrize("seed", range(10))
def test_sample_training_clicks_inside_and_outside(seed):
    rng = np.random.default_rng(seed)
    gt = np.zeros((64, 64), bool)
    gt[20:40, 15:45] = True
    clicks = sample_training_clicks(gt, rng, max_positive=3, max_negative=3, p_geometric=0.5)
    pos = [c for c in clicks if c.positive]
    neg = [c for c in clicks if not c.positive]
    assert 1 <= len(pos) <= 3 and len(neg) <= 3
    for c in pos:
        assert gt[int(c.y), int(c.x)]
        # Inside the eroded mask (2 px from the border).
        assert 22 <= c.y < 38 and 17 <= c.x < 43
    for c in neg:
        assert not gt[int(c.y), int(c.x)]
    assert len({(c.x, c.y) for c in clicks}) == len(clicks)  # no pixel sampled twice


def test_sample_training_clicks_counts_over_many_draws():
    rng = np.random.default_rng(0)
    gt = square((64, 64), 20, 20, 20)
    draws = [sample_training_clicks(gt, rng, p_geometric=0.5) for _ in range(200)]
    n_pos = [sum(c.positive for c in d) for d in draws]
    n_neg = [sum(not c.positive for c in d) for d in draws]
    assert min(n_pos) == 1 and max(n_pos) == 3
    assert min(n_neg) == 0 and max(n_neg) == 3
    assert any(n > 0 for n in n_neg)


def test_sample_training_clicks_tiny_and_empty_masks():
    rng = np.random.default_rng(1)
    assert sample_training_clicks(np.zeros((10, 10), bool), rng) == []
    thin = np.zeros((30, 30), bool)
    thin[10, 5:25] = True  # erosion removes it completely: falls back to the mask itself
    for _ in range(20):
        clicks = sample_training_clicks(thin, rng)
        assert all(thin[int(c.y), int(c.x)] for c in clicks if c.positive)
        assert all(not thin[int(c.y), int(c.x)] for c in clicks if not c.positive)


@pytest.mark.parametrize("seed", range(5))
def test_next_training_click_in_larger_error_region(seed):
    rng = np.random.default_rng(seed)
    gt = square((64, 64), 5, 5, 24)  # 24 x 24 defect
    pred = np.zeros_like(gt)
    pred[5:10, 5:29] = True  # top of it found
    pred[50:54, 50:54] = True  # small false positive
    c = next_training_click(gt, pred, rng)
    assert c.positive
    # Deep inside the false-negative region: distance > half of its maximum (~10).
    assert 10 <= c.y < 29 and 5 <= c.x < 29
    assert gt[int(c.y), int(c.x)] and not pred[int(c.y), int(c.x)]
    # Now the false positive is the larger error.
    pred2 = gt.copy()
    pred2[35:60, 35:60] = True
    c = next_training_click(gt, pred2, rng)
    assert c.positive is False
    assert 35 <= c.x < 60 and 35 <= c.y < 60
    assert next_training_click(gt, gt, rng) is None


def test_next_training_click_is_random_but_deep():
    gt = square((64, 64), 10, 10, 30)
    pred = np.zeros_like(gt)
    seen = {next_training_click(gt, pred, np.random.default_rng(s)) for s in range(20)}
    assert len(seen) > 5  # random, unlike the evaluation click
    for c in seen:
        assert 17 <= c.x <= 32 and 17 <= c.y <= 32  # distance > 7.5 from the border of a 30-px square


# ---------------------------------------------------------------- encoding


def test_encode_clicks_shape_and_channels():
    clicks = [[Click(5, 6, True)], [Click(10, 10, False), Click(20, 3, True)], []]
    x = encode_clicks(clicks, None, 32, 2.0)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x[0, 0, 6, 5] == 1 and x[0, 1].sum() == 0
    assert x[1, 1, 10, 10] == 1 and x[1, 0, 3, 20] == 1 and x[1, 0, 10, 10] == 0
    assert x[2].sum() == 0
    assert x[:, 2].sum() == 0  # no previous mask
    np.testing.assert_array_equal(x[1, :2].numpy(), click_maps(clicks[1], (32, 32), 2.0))
    prev = torch.rand(3, 1, 32, 32, requires_grad=True)
    y = encode_clicks(clicks, prev, 32, 2.0)
    assert not y.requires_grad
    torch.testing.assert_close(y[:, 2:], prev.detach())
    torch.testing.assert_close(y[:, :2], x[:, :2])


def _whole_image_click(gt, pred, clicks=(), rng=None):
    """The click protocol with the distance transform over the whole (padded) image: the
    reference the bounding-box transform must reproduce exactly."""
    from scipy import ndimage

    from adclick_core.inference.clicks import _clicked_mask

    not_clicked = ~_clicked_mask(list(clicks), gt.shape, 5.0) if clicks else np.ones_like(gt)
    fn = ndimage.distance_transform_edt(np.pad(gt & ~pred & not_clicked, 1))[1:-1, 1:-1]
    fp = ndimage.distance_transform_edt(np.pad(pred & ~gt & not_clicked, 1))[1:-1, 1:-1]
    if max(fn.max(), fp.max()) <= 0:
        return None
    positive = fn.max() >= fp.max()
    dt = fn if positive else fp
    if rng is None:
        y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
    else:
        ys, xs = np.nonzero(dt > dt.max() / 2.0)
        i = int(rng.integers(len(ys)))
        y, x = ys[i], xs[i]
    return Click(float(x), float(y), bool(positive))


@pytest.mark.parametrize("seed", range(6))
def test_error_click_on_the_bounding_box_equals_the_whole_image_transform(seed):
    rng = np.random.default_rng(seed)
    hw = (int(rng.integers(30, 90)), int(rng.integers(30, 90)))
    yy, xx = np.mgrid[: hw[0], : hw[1]]

    def blobs(n):
        m = np.zeros(hw, bool)
        for _ in range(n):
            cy, cx, r = rng.integers(0, hw[0]), rng.integers(0, hw[1]), rng.integers(2, 12)
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # some touch the image border
        return m

    gt, pred = blobs(3), blobs(2)
    clicks = []
    for _ in range(4):
        nxt = next_eval_click(gt, pred, clicks)
        assert nxt == _whole_image_click(gt, pred, clicks)
        if nxt is None:
            break
        clicks.append(nxt)
    assert next_training_click(gt, pred, np.random.default_rng(seed)) == \
        _whole_image_click(gt, pred, rng=np.random.default_rng(seed))
