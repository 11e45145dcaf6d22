"""Synthetic anomalies: Perlin noise, masks and the blend (changes inside the mask only)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from adclick_core.training.synthesis import (AnomalySynthesizer, crack_mask, edge_mask, finish_mask, perlin_mask, strip_mask, perlin_noise,
                                             photometric_jitter, spot_mask, uneven_mask)


def texture(seed: int, hw=(64, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    v = 128 + 50 * np.sin(xx / 3) * np.cos(yy / 4) + rng.normal(0, 8, hw)
    return np.stack([v, v * 0.8, v * 1.2], -1).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------- Perlin noise


@pytest.mark.parametrize("shape, res", [((64, 64), (4, 4)), ((32, 48), (2, 8)), ((16, 16), (1, 1)), ((32, 32), (32, 32))])
def test_perlin_noise_shape_and_range(shape, res):
    for seed in range(20):
        n = perlin_noise(shape, res, np.random.default_rng(seed))
        assert n.shape == shape
        assert np.isfinite(n).all()
        assert np.abs(n).max() <= 1.0 + 1e-9


def test_perlin_noise_is_not_trivial_and_smooth():
    n = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert n.std() > 0.1
    assert n.max() > 0.3 and n.min() < -0.3
    # Zero at lattice points (gradient noise), smooth in between.
    assert np.abs(n[::16, ::16]).max() < 1e-9
    assert np.abs(np.diff(n, axis=1)).max() < 0.2


def test_perlin_noise_determinism():
    a = perlin_noise((32, 32), (4, 2), np.random.default_rng(7))
    b = perlin_noise((32, 32), (4, 2), np.random.default_rng(7))
    c = perlin_noise((32, 32), (4, 2), np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_perlin_noise_rejects_bad_res():
    with pytest.raises(ValueError, match="multiple"):
        perlin_noise((30, 32), (4, 4), np.random.default_rng(0))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_masks_nonempty_within_area_bounds(hw):
    synth = AnomalySynthesizer()
    area = hw[0] * hw[1]
    kinds = set()
    for seed in range(40):
        m, kind = synth.draw(hw, np.random.default_rng(seed))
        kinds.add(kind)
        assert m.shape == hw and m.dtype == bool
        assert m.any()
        top = synth.max_uneven_area_frac if kind == "uneven" else synth.max_area_frac
        assert synth.min_area_frac * area <= m.sum() <= top * area
    assert kinds == {"perlin", "crack", "spot", "uneven"}


def test_mask_respects_foreground():
    synth = AnomalySynthesizer()
    fg = np.zeros((64, 64), bool)
    fg[:, :40] = True
    for seed in range(10):
        m = synth.mask((64, 64), np.random.default_rng(seed), foreground=fg)
        assert not (m & ~fg).any()


def test_each_mask_kind():
    rng = np.random.default_rng(3)
    for fn in (crack_mask, spot_mask):
        for _ in range(5):
            m = fn((64, 48), rng)
            assert m.shape == (64, 48) and m.dtype == bool and m.any()
    m = perlin_mask((64, 48), rng)
    assert m.shape == (64, 48) and m.dtype == bool
    # Cracks are thin: far less area than their extent.
    c = crack_mask((64, 64), np.random.default_rng(0))
    assert c.sum() < 0.2 * 64 * 64


def test_mask_kind_probabilities():
    # p_perlin = 1: every mask is a thresholded Perlin blob; p_perlin = 0, p_crack = 1: only cracks.
    only_crack = AnomalySynthesizer(p_perlin=0.0, p_crack=1.0, p_uneven=0.0)
    m = only_crack.mask((64, 64), np.random.default_rng(5))
    rng = np.random.default_rng(5)
    rng.random()  # the kind draw
    np.testing.assert_array_equal(m, crack_mask((64, 64), rng))
    only_spot = AnomalySynthesizer(p_perlin=0.0, p_crack=0.0, p_uneven=0.0)
    m = only_spot.mask((64, 64), np.random.default_rng(6))
    rng = np.random.default_rng(6)
    rng.random()
    np.testing.assert_array_equal(m, spot_mask((64, 64), rng))


# ---------------------------------------------------------------- the synthesizer


@pytest.mark.parametrize("seed", range(12))
def test_synthesizer_changes_inside_mask_only(seed):
    img = texture(seed, (48, 64))
    others = [texture(seed + 100, (48, 64)), texture(seed + 200, (32, 32))]
    # hard-edged kinds only: uneven regions are feathered across their border on purpose
    out, mask = AnomalySynthesizer(p_uneven=0.0)(img, np.random.default_rng(seed), others=others)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert mask.shape == img.shape[:2] and mask.dtype == bool and mask.any()
    np.testing.assert_array_equal(out[~mask], img[~mask])  # exactly unchanged outside
    diff = np.abs(out.astype(int) - img.astype(int)).max(-1)[mask]
    assert (diff > 0).mean() > 0.8
    assert diff.mean() > 3.0


def test_synthesizer_each_source_kind_changes_pixels():
    img = texture(1)
    synth = AnomalySynthesizer()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        src = synth.source(img, rng, others=[texture(2)])
        assert src.shape == img.shape and np.issubdtype(src.dtype, np.floating)
        assert src.min() >= 0 and src.max() <= 255
        assert np.abs(src - img).mean() > 2.0


def test_synthesizer_determinism():
    img = texture(4)
    others = [texture(5)]
    a_img, a_mask = AnomalySynthesizer()(img, np.random.default_rng(11), others=others)
    b_img, b_mask = AnomalySynthesizer()(img, np.random.default_rng(11), others=others)
    c_img, c_mask = AnomalySynthesizer()(img, np.random.default_rng(12), others=others)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not (np.array_equal(a_mask, c_mask) and np.array_equal(a_img, c_img))
    # The input image is not modified in place.
    np.testing.assert_array_equal(img, texture(4))


def test_uneven_regions_are_large_and_blended_softly():
    hw = (64, 64)
    areas = [uneven_mask(hw, np.random.default_rng(seed)).mean() for seed in range(30)]
    assert np.median(areas) > 0.2  # far larger than spots and cracks
    synth = AnomalySynthesizer(p_perlin=0.0, p_crack=0.0, p_uneven=1.0)
    img = texture(0)
    out, m = synth(img, np.random.default_rng(2))
    assert synth.draw(hw, np.random.default_rng(2))[1] == "uneven"
    diff = np.abs(out.astype(np.float32) - img.astype(np.float32)).mean(-1)
    # a mild change inside (not the strong darkening of the other kinds), feathered across the border
    assert 1.0 < diff[m].mean() < 45.0
    assert diff[m].mean() > 3 * diff[~ndimage.binary_dilation(m, iterations=6)].mean()
    border = ndimage.binary_dilation(m, iterations=2) & ~m
    assert diff[border].mean() > diff[~ndimage.binary_dilation(m, iterations=6)].mean()


def _grows_from_one_side(m: np.ndarray) -> bool:
    """True if, for one image side, every mask pixel's path straight to that side is all mask."""
    views = [m, m[::-1], m.T, m.T[::-1]]  # top, bottom, left, right side as row 0
    return any(np.array_equal(v, np.cumprod(v, axis=0).astype(bool)) for v in views)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (80, 40)])
def test_edge_masks_are_bands_or_chips_on_one_side(hw):
    sides_touched = set()
    for seed in range(40):
        m = edge_mask(hw, np.random.default_rng(seed))
        assert m.shape == hw and m.dtype == bool
        if not m.any():
            continue
        assert _grows_from_one_side(m)
        assert m.mean() < 0.65  # at most ~40 % deep (+ the wave)
        sides_touched |= {i for i, edge in enumerate((m[0], m[-1], m[:, 0], m[:, -1])) if edge.any()}
    assert sides_touched == {0, 1, 2, 3}
    # Interior blobs seldom touch the border: the reason edge masks exist.
    assert not perlin_mask((64, 64), np.random.default_rng(0))[[0, -1]].all()


def test_edge_kind_probability_and_blend():
    rng = np.random.default_rng(0)
    kinds = [AnomalySynthesizer(p_edge=0.5).draw((64, 64), rng)[1] for _ in range(200)]
    assert 0.35 < kinds.count("edge") / 200 < 0.65
    assert "edge" not in [AnomalySynthesizer().draw((64, 64), rng)[1] for _ in range(200)]
    # p_edge = 0 leaves the random stream of the other kinds untouched (the shipped click model's pool)
    a = AnomalySynthesizer(p_edge=0.0).mask((64, 64), np.random.default_rng(9))
    b = AnomalySynthesizer().mask((64, 64), np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="p_edge"):
        AnomalySynthesizer(p_edge=1.0)
    img, other = texture(3), texture(8)
    synth = AnomalySynthesizer(p_edge=0.999)
    for seed in range(10):
        out, m = synth(img, np.random.default_rng(seed), others=[other])
        assert _grows_from_one_side(m) and m.any()
        diff = np.abs(out.astype(np.float32) - img.astype(np.float32)).mean(-1)
        far = ~ndimage.binary_dilation(m, iterations=8)
        assert diff[m].mean() > 1.0 and diff[far].max() == 0


# ---------------------------------------------------------------- photometric jitter


def test_photometric_jitter_changes_the_whole_image_mostly_brighter():
    img = texture(4, (48, 64)) // 2  # room above, like the dim references
    brighter = 0
    for seed in range(40):
        out = photometric_jitter(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(np.float32) - img.astype(np.float32)).mean(-1)
        assert (diff > 0).mean() > 0.5  # global, not a region
        brighter += out.mean() > img.mean()
        # the texture survives: the jittered image still correlates with the original
        assert np.corrcoef(out.mean(-1).ravel(), img.mean(-1).ravel())[0, 1] > 0.8
    assert 24 <= brighter <= 40  # about 80 % brighter, the rest darker


def test_photometric_share_keeps_masks_and_stream():
    img, other = texture(3), texture(8)
    plain = AnomalySynthesizer(p_edge=0.3)
    jittered = AnomalySynthesizer(p_edge=0.3, p_photometric=1.0)
    changed_outside = 0
    for seed in range(10):
        a, ma = plain(img, np.random.default_rng(seed), others=[other])
        b, mb = jittered(img, np.random.default_rng(seed), others=[other])
        np.testing.assert_array_equal(ma, mb)  # the jitter is drawn after the anomaly
        changed_outside += bool((a[~ma] != b[~mb]).any())
    assert changed_outside == 10
    # p_photometric = 0 draws nothing: the stream (and so every later image) is untouched
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    AnomalySynthesizer(p_photometric=0.0)(img, r1, others=[other])
    AnomalySynthesizer()(img, r2, others=[other])
    assert r1.random() == r2.random()
    with pytest.raises(ValueError, match="p_photometric"):
        AnomalySynthesizer(p_photometric=1.5)


# ---------------------------------------------------------------- finish patches


def _border_is_straight(m: np.ndarray) -> bool:
    """A band from the top / bottom: per column the patch is one run from the side; its depth
    varies along the side like a line (tilt) plus a small wave, not like a blob."""
    side = 0 if m[0].mean() > m[-1].mean() else -1
    cols = m if side == 0 else m[::-1]
    depth = np.array([np.argmin(c) if not c.all() else len(c) for c in cols.T], dtype=np.float32)
    x = np.arange(len(depth), dtype=np.float32)
    fit = np.polyval(np.polyfit(x, depth, 1), x)
    return bool(np.abs(depth - fit).max() <= 0.06 * m.shape[0] + 1)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_finish_masks_are_straight_bands_or_blocks(hw):
    bands = blocks = 0
    for seed in range(60):
        m = finish_mask(hw, np.random.default_rng(seed))
        assert m.shape == hw and m.dtype == bool and m.any()
        full_rows = m[0].all() or m[-1].all()
        touches_lr = m[:, 0].all() or m[:, -1].all()
        if full_rows and not touches_lr:
            bands += 1
            assert _border_is_straight(m)
            assert 0.05 < m.mean() < 0.65
        elif not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()):
            blocks += 1  # a rounded block inside the image
            assert 0.01 < m.mean() < 0.5
    assert bands >= 20 and blocks >= 10


@pytest.mark.parametrize("share, kind, bad", [("p_finish", "finish", -0.1), ("p_strip", "strip", 1.5),
                                             ("p_faint", None, 2.0)])
def test_share_of_uneven_draws_and_its_bounds(share, kind, bad):
    rng = np.random.default_rng(0)
    if kind is not None:  # p_faint changes how strips look, not which kind is drawn
        synth = AnomalySynthesizer(p_perlin=0.0, p_crack=0.0, p_uneven=1.0, **{share: 0.5})
        kinds = [synth.draw((64, 64), rng)[1] for _ in range(200)]
        assert set(kinds) == {"uneven", kind} and 0.35 < kinds.count(kind) / 200 < 0.65
    with pytest.raises(ValueError, match=share):
        AnomalySynthesizer(**{share: bad})


# The next random number after 20 composites, recorded with the synthesizer of commit b1e491d
# (before --faint-share): an option left at 0 must draw nothing, or the pools that trained the
# shipped click models (these mixes) could no longer be rebuilt from their seeds.
@pytest.mark.parametrize("mix, next_random", [
    ({}, 0.6529367689327586),
    ({"p_edge": 0.3, "p_uneven": 0.35}, 0.016189091126561972),
    ({"p_edge": 0.3, "p_uneven": 0.35, "p_strip": 0.5}, 0.03786578749659075),
    ({"p_finish": 0.5}, 0.08378232710057054),
])
def test_options_left_at_zero_keep_the_random_stream(mix, next_random):
    rng = np.random.default_rng(5)
    synth = AnomalySynthesizer(**mix)
    for _ in range(20):
        synth(texture(3), rng, others=[texture(8)])
    assert rng.random() == next_random


def test_finish_patch_blend():
    img = texture(3)
    # mostly a stronger texture (the deviation from the local mean grows inside the patch)
    only = AnomalySynthesizer(p_perlin=0.0, p_crack=0.0, p_uneven=1.0, p_finish=1.0)
    stronger = 0
    for seed in range(20):
        out, m = only(img, np.random.default_rng(seed))
        inner = ndimage.binary_erosion(m, iterations=4)
        if not inner.any():
            continue
        far = ~ndimage.binary_dilation(m, iterations=8)
        diff = np.abs(out.astype(np.float32) - img.astype(np.float32)).mean(-1)
        assert diff[inner].mean() > 2.0 and diff[far].max() == 0
        dev = lambda a: np.abs(a - ndimage.gaussian_filter(a, 5)).mean(-1)
        stronger += dev(out.astype(np.float32))[inner].mean() > dev(img.astype(np.float32))[inner].mean()
    assert stronger >= 10


def test_kind_shares_must_not_exceed_one():
    # One uniform number picks the kind: shares summing past 1 would be cut without a word.
    with pytest.raises(ValueError, match="summing to at most 1"):
        AnomalySynthesizer(p_perlin=0.35, p_crack=0.25, p_uneven=0.5)
    with pytest.raises(ValueError, match="summing to at most 1"):
        AnomalySynthesizer(p_crack=-0.1)
    AnomalySynthesizer(p_perlin=0.35, p_crack=0.25, p_uneven=0.4)  # no spots left: allowed


# ---------------------------------------------------------------- interior strips


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_strip_masks_cross_the_image_without_touching_the_other_sides(hw):
    across_width = across_height = 0
    for seed in range(60):
        m = strip_mask(hw, np.random.default_rng(seed))
        assert m.shape == hw and m.dtype == bool
        wide = m.any(0).all() and not (m[0].any() or m[-1].any())  # every column, neither top nor bottom
        tall = m.any(1).all() and not (m[:, 0].any() or m[:, -1].any())
        assert wide != tall, f"seed {seed}: a strip runs side to side in exactly one direction"
        across_width += wide
        across_height += tall
        lines = m if wide else m.T  # span x length
        runs = np.abs(np.diff(lines.astype(np.int8), axis=0)).sum(0)
        assert (runs == 2).all(), f"seed {seed}: one run per column / row, no holes"
        thickness = lines.sum(0) / lines.shape[0]
        assert 0.02 < thickness.min() and thickness.max() < 0.45
    assert across_width >= 35 and across_height >= 5


def test_strip_blend_stays_near_the_strip():
    img = texture(3)
    only = AnomalySynthesizer(p_perlin=0.0, p_crack=0.0, p_uneven=1.0, p_strip=1.0)
    for seed in range(10):
        out, m = only(img, np.random.default_rng(seed))
        assert m.any()
        far = ~ndimage.binary_dilation(m, iterations=10)
        diff = np.abs(out.astype(np.float32) - img.astype(np.float32)).mean(-1)
        assert diff[far].max() == 0 and diff[m].mean() > 1.0


def test_faint_strips_change_the_grey_level_by_a_few_percent_only():
    img = texture(3)
    faint = AnomalySynthesizer(p_perlin=0.0, p_crack=0.0, p_uneven=1.0, p_strip=1.0, p_faint=1.0)
    plain = AnomalySynthesizer(p_perlin=0.0, p_crack=0.0, p_uneven=1.0, p_strip=1.0)
    faint_change, plain_change = [], []
    for seed in range(12):
        for synth, changes in ((faint, faint_change), (plain, plain_change)):
            out, m = synth(img, np.random.default_rng(seed))
            far = ~ndimage.binary_dilation(m, iterations=10)
            a, b = out.astype(np.float32).mean(-1), img.astype(np.float32).mean(-1)
            assert m.any() and np.abs(a - b)[far].max() == 0
            changes.append(abs(a[m].mean() / b[m].mean() - 1))
    assert max(faint_change) < 0.08 and np.median(faint_change) > 0.005
    assert np.median(plain_change) > 2 * np.median(faint_change)  # the plain strips are the visible ones
