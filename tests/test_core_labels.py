"""Label construction (Eq. 8-9, block labels, boxes, tags) on hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from adclick_core.inference.clicks import Click
from adclick_core.utils.errors import InputError
from adclick_core.training.labels import (
    WeakLabel,
    block_fractions,
    block_labels,
    box_labels,
    click_disc_labels,
    exact_labels,
    pseudo_labels,
    tag_labels,
    trivalued_labels,
)

# ---------------------------------------------------------------- Eq. 8


def test_click_discs_override_probability():
    prob = np.full((7, 9), 0.4, dtype=np.float32)
    out = click_disc_labels(prob, [Click(2, 3, True), Click(7, 3, False)], radius=1.0)
    # positive disc of radius 1 around (x=2, y=3): the centre and its 4 neighbours
    for y, x in [(3, 2), (2, 2), (4, 2), (3, 1), (3, 3)]:
        assert out[y, x] == 1.0
    for y, x in [(3, 7), (2, 7), (4, 7), (3, 6), (3, 8)]:
        assert out[y, x] == 0.0
    assert out[2, 1] == pytest.approx(0.4)  # diagonal neighbour: distance sqrt 2 > 1
    assert (out == 1.0).sum() == 5 and (out == 0.0).sum() == 5
    assert np.all(prob == np.float32(0.4))  # input untouched


def test_click_discs_later_click_wins_on_overlap():
    prob = np.full((5, 5), 0.5, np.float32)
    out = click_disc_labels(prob, [Click(2, 2, True), Click(3, 2, False)], radius=1.0)
    assert out[2, 2] == 0.0 and out[2, 1] == 1.0 and out[2, 4] == 0.0


# ---------------------------------------------------------------- Eq. 9


def test_trivalued_bands_on_a_ramp():
    ramp = np.array([[0.0, 0.2, 0.44, 0.46, 0.5, 0.54, 0.56, 0.8, 1.0]], np.float32)
    target, valid = trivalued_labels(ramp, delta=0.05)
    np.testing.assert_array_equal(target, [[0, 0, 0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(valid, [[1, 1, 1, 0, 0, 0, 1, 1, 1]])
    assert target.dtype == np.float32 and valid.dtype == np.float32
    t0, v0 = trivalued_labels(ramp, delta=0.0)
    np.testing.assert_array_equal(t0, [[0, 0, 0, 0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(v0, [[1, 1, 1, 1, 0, 1, 1, 1, 1]])


def test_pseudo_labels_combine_discs_and_random_band():
    prob = np.array([[0.3, 0.45, 0.55, 0.7, 0.52]], np.float32)
    clicks = [Click(4, 0, True)]  # forces the 0.52 pixel to 1
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(50):
        target, valid = pseudo_labels(prob, clicks, radius=0.5, rng=rng, max_delta=0.1)
        assert target[0, 4] == 1 and valid[0, 4] == 1
        assert valid[0, 0] == 1 and target[0, 0] == 0 and valid[0, 3] == 1 and target[0, 3] == 1
        seen.add(int(valid[0, 1]))
        assert valid[0, 1] == valid[0, 2]  # symmetric band
    assert seen == {0, 1}  # delta < 0.05 keeps 0.45/0.55, delta > 0.05 drops them
    t, v = pseudo_labels(prob, clicks, radius=0.5, rng=rng, max_delta=0.0)
    np.testing.assert_array_equal(v, 1)


def test_exact_labels_all_valid():
    mask = np.array([[0, 255], [1, 0]], np.uint8)
    target, valid = exact_labels(mask)
    np.testing.assert_array_equal(target, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(valid, 1)


# ---------------------------------------------------------------- block labels


def test_block_labels_on_hand_made_16x16_mask():
    mask = np.zeros((16, 16), bool)
    mask[0:4, 0:4] = True  # top-left block: 16/64 = 0.25 -> positive (a >= eps+)
    mask[0:2, 8:12] = True  # top-right: 8/64 = 0.125 -> ignored
    mask[8:10, 0:2] = True  # bottom-left: 4/64 = 0.0625 -> negative (a <= eps-)
    # bottom-right: 0 -> negative
    np.testing.assert_allclose(block_fractions(mask, 8), [[0.25, 0.125], [0.0625, 0.0]])
    target, valid = block_labels(mask, block=8, eps_pos=0.25, eps_neg=0.08)
    assert target.shape == (2, 2)
    np.testing.assert_array_equal(target, [[1, 0], [0, 0]])
    np.testing.assert_array_equal(valid, [[1, 0], [1, 1]])


def test_block_labels_partial_border_blocks_and_soft_input():
    mask = np.zeros((10, 12), np.float32)
    mask[8:10, 8:12] = 1.0  # bottom-right block holds 2x4 real pixels, all anomalous
    target, valid = block_labels(mask, block=8)
    assert target.shape == (2, 2)  # ceil(10/8) x ceil(12/8)
    assert block_fractions(mask, 8)[1, 1] == pytest.approx(1.0)
    assert target[1, 1] == 1 and valid[1, 1] == 1
    assert target[1, 0] == 0 and valid[1, 0] == 1
    soft = np.full((8, 8), 0.1, np.float32)
    assert block_labels(soft)[1][0, 0] == 0  # 0.1 lies between 0.08 and 0.25: ignored
    with pytest.raises(InputError):
        block_labels(np.full((8, 8), 255.0))


# ---------------------------------------------------------------- weak labels


def test_box_labels_pixel_level():
    lab = box_labels((6, 8), [(1, 1, 3, 4), (6.5, 0, 8, 1)])
    assert isinstance(lab, WeakLabel) and lab.image_label == 1
    expected_unknown = np.zeros((6, 8), bool)
    expected_unknown[1:4, 1:3] = True
    expected_unknown[0:1, 6:8] = True  # partly covered pixel column 6 counts as inside
    np.testing.assert_array_equal(lab.valid, ~expected_unknown)
    np.testing.assert_array_equal(lab.target, 0)
    empty = box_labels((6, 8), [])
    assert empty.image_label == 0 and empty.valid.all()


def test_box_labels_block_level():
    # 16x16, one box covering 4x4 pixels of the top-left block (0.25) and 1x4 of the top-right (1/16)
    lab = box_labels((16, 16), [(4, 2, 9, 6)], block=8, eps_neg=0.08)
    assert lab.valid.shape == (2, 2)
    np.testing.assert_array_equal(lab.valid, [[0, 1], [1, 1]])
    np.testing.assert_array_equal(lab.target, 0)


def test_tag_labels():
    ok = tag_labels((5, 7), "OK")
    assert ok.image_label == 0 and ok.valid.shape == (5, 7) and ok.valid.all() and not ok.target.any()
    ng = tag_labels((5, 7), "ng")
    assert ng.image_label == 1 and not ng.valid.any()
    assert tag_labels((17, 16), "NG", block=8).valid.shape == (3, 2)
    with pytest.raises(InputError):
        tag_labels((5, 7), "maybe")
