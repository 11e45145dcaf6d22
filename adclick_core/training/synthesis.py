"""Synthetic anomalies on defect-free images, so the models train with no real defect at all.

Masks: Perlin-noise blobs (DRAEM-style, rotated, thresholded), thin crack-like curves, small
spots (blowhole-like), large low-contrast regions (uneven surface) or, where ``p_finish`` > 0,
straight-bordered patches of a different surface finish and, where ``p_edge`` > 0
(ADClick-Seg's pool), bands / chips along an image side. Sources: a shuffled tile
grid of the image itself after intensity / blur changes, a darkened or brightened copy, or another
normal image. Blend (ALGORITHM.md): ``I' = (1 - M) I + M (beta S + (1 - beta) I)`` with
``beta ~ U[0.5, 1]``; uneven regions use a mild gain as S, a feathered M and ``beta ~ U[0.75, 1]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["perlin_noise", "perlin_mask", "crack_mask", "spot_mask", "uneven_mask", "edge_mask", "finish_mask",
           "strip_mask", "photometric_jitter",
           "AnomalySynthesizer"]


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1]; ``shape`` must be a multiple of ``res``."""
    h, w = shape
    ry, rx = res
    if h % ry or w % rx:
        raise ValueError("shape must be a multiple of res")
    angles = rng.uniform(0, 2 * np.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    # Local coordinates inside each lattice cell, and the cell each pixel belongs to.
    ys = np.arange(h) * ry / h
    xs = np.arange(w) * rx / w
    yi, xi = ys.astype(int), xs.astype(int)
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[yi[:, None] + dy, xi[None, :] + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return np.sqrt(2) * (top * (1 - uy) + bottom * uy)


def _rotated_perlin(hw: tuple[int, int], max_log2_res: int, rng: np.random.Generator) -> np.ndarray:
    """H x W Perlin noise with a random lattice 2^U{0..max_log2_res - 1} per axis, randomly rotated."""
    h, w = hw
    size = 1 << int(np.ceil(np.log2(max(h, w))))
    ry = 1 << int(rng.integers(0, max_log2_res))
    rx = 1 << int(rng.integers(0, max_log2_res))
    noise = perlin_noise((size, size), (min(ry, size), min(rx, size)), rng)
    noise = ndimage.rotate(noise, float(rng.uniform(-90, 90)), reshape=False, order=1, mode="reflect")
    return noise[:h, :w]


def perlin_mask(hw: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """Blob mask from rotated Perlin noise with a random scale 2^U{0..5} per axis."""
    return _rotated_perlin(hw, 6, rng) > threshold


def crack_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A thin, wandering curve (crack / scratch) 1-4 px wide, sometimes branching."""
    h, w = hw
    mask = np.zeros(hw, dtype=bool)
    n_curves = 1 + int(rng.random() < 0.3)
    for _ in range(n_curves):
        y, x = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.15, 0.6) * max(h, w)
        step = 1.0
        for _ in range(int(length / step)):
            angle += rng.normal(0, 0.15)
            y += step * np.sin(angle)
            x += step * np.cos(angle)
            if not (0 <= y < h and 0 <= x < w):
                break
            mask[int(y), int(x)] = True
    width = int(rng.integers(0, 3))
    return ndimage.binary_dilation(mask, iterations=width) if width else mask


def spot_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """1-4 small irregular ellipses (blowhole-like), radius 2-6 % of the image side."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros(hw, dtype=bool)
    side = min(h, w)
    centre = np.array([rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w])
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = centre + rng.normal(0, 0.08 * side, size=2)
        ay, ax = rng.uniform(0.02, 0.06, size=2) * side
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dy * np.cos(t) + dx * np.sin(t)
        v = -dy * np.sin(t) + dx * np.cos(t)
        wobble = 1 + 0.25 * perlin_noise((64, 64), (4, 4), rng)[
            (np.clip(yy / h * 63, 0, 63)).astype(int), (np.clip(xx / w * 63, 0, 63)).astype(int)
        ]
        mask |= (u / ay) ** 2 + (v / ax) ** 2 <= wobble
    return mask


def uneven_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A large region (about 10-55 % of the image) from very low-frequency Perlin noise.

    Real "uneven" defects are big, low-contrast and soft-edged; a click model that only ever saw
    small synthetic blobs learns to stay small around the click and under-segments them."""
    noise = _rotated_perlin(hw, 2, rng)
    return noise > rng.uniform(-0.1, 0.35)


def _wave_along(length: int, res: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth 1-D wave in about [-1, 1] with ``res`` periods, sampled at ``length`` points: the
    wobble of a band's border along the side it follows."""
    return perlin_noise((1, 64), (1, res), rng)[0][(np.arange(length) * 63) // max(length - 1, 1)]


def _band_from_side(depth: np.ndarray, side: int, span: int) -> np.ndarray:
    """Mask of the pixels less than ``depth`` (one value per position along the side) away from
    ``side`` (0 top, 1 bottom, 2 left, 3 right); ``span``: the image's extent away from it."""
    d = np.arange(span)[:, None] < depth[None, :]  # span x length, row 0 on the side
    if side < 2:  # top, bottom
        return d if side == 0 else d[::-1]
    return d.T if side == 2 else d.T[:, ::-1]  # left, right


def edge_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A band along one image side, 5-40 % of the image deep, with a wavy inner border.

    Many surface defects start at a part's edge (chipped or broken edges, frayed or uneven bands
    along a side); blobs placed anywhere rarely touch the border, so a model trained on them only
    learns interior defects. Half of the bands cover part of the side only (a chip, not a band)."""
    h, w = hw
    side = int(rng.integers(4))
    length, span = (w, h) if side in (0, 1) else (h, w)  # along the side, away from it
    t = np.arange(length)
    wave = _wave_along(length, int(rng.choice([2, 4, 8])), rng)
    depth = rng.uniform(0.05, 0.4) * span * (1 + rng.uniform(0.1, 0.5) * wave)
    if rng.random() < 0.5:
        # a chip: the depth falls to zero outside a stretch of the side
        c, half = rng.uniform(0, length), rng.uniform(0.1, 0.4) * length
        depth = depth * np.clip(1 - np.abs(t - c) / half, 0, None) ** 0.5
    return _band_from_side(depth, side, span)


def finish_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A patch with a straight border: a band in from one side (12-50 % deep, border tilted by up
    to 12 degrees, mostly top / bottom) or a rounded block (superellipse, 20-60 % of the height).

    Real "uneven" defects on ground surfaces are patches of a different finish whose border is a
    machining line, not a soft blob (MTD: full-width bands, tile-wide blocks)."""
    h, w = hw
    if rng.random() < 0.65:
        side = int(rng.integers(4)) if rng.random() < 0.2 else int(rng.integers(2))
        length, span = (w, h) if side in (0, 1) else (h, w)
        t = np.arange(length) / max(length - 1, 1)
        wave = _wave_along(length, 4, rng)
        depth = (rng.uniform(0.12, 0.5) * span + np.tan(np.radians(rng.uniform(-12, 12))) * (t - 0.5) * length
                 + 0.02 * span * wave)
        return _band_from_side(depth, side, span)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rh, rw = rng.uniform(0.1, 0.3) * h, rng.uniform(0.15, 0.45) * w
    cy, cx = rng.uniform(rh, h - rh), rng.uniform(rw, w - rw)
    power = rng.uniform(3, 8)
    wobble = 1 + 0.1 * perlin_noise((64, 64), (4, 4), rng)[(yy / h * 63).astype(int), (xx / w * 63).astype(int)]
    return np.abs((yy - cy) / rh) ** power + np.abs((xx - cx) / rw) ** power <= wobble


def _shuffled_tiles(image: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    h, w = image.shape[:2]
    th, tw = h // grid, w // grid
    tiles = [image[i * th : (i + 1) * th, j * tw : (j + 1) * tw] for i in range(grid) for j in range(grid)]
    order = rng.permutation(len(tiles))
    rows = [np.concatenate([tiles[order[i * grid + j]] for j in range(grid)], axis=1) for i in range(grid)]
    out = np.concatenate(rows, axis=0)
    return np.pad(out, ((0, h - out.shape[0]), (0, w - out.shape[1]), (0, 0)), mode="reflect")


def photometric_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The whole image brighter / higher in contrast / sharper (rarely a little darker), a little noise.

    Production images need not be lit like the defect-free references, and a model that saw only
    reference-lit normals fires on every pixel of a photo lit otherwise. (On MTD the photos come in
    six exposures, each about as bright as the references of the same exposure; the normal areas
    of its defective photos sit further from the bank for another reason: see
    ``residuals.similar_bank_images``. Relighting still measured better there.)
    """
    img = image.astype(np.float32)
    mean = img.mean()
    gain = rng.uniform(1.0, 1.8) if rng.random() < 0.8 else rng.uniform(0.75, 1.0)
    contrast = rng.uniform(0.9, 1.5)
    out = (img - mean) * contrast * gain + mean * gain
    amount = rng.uniform(0.0, 1.2)
    if amount > 0.05:
        out = out + amount * (out - ndimage.gaussian_filter(out, sigma=(1.0, 1.0, 0)))
    out = out + rng.normal(0, rng.uniform(0, 4), size=out.shape)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _refinished(image: np.ndarray, sigma: float, gain: float, contrast: float) -> np.ndarray:
    """``image`` (float H x W x 3) as another surface finish: its local mean (Gaussian, ``sigma``
    px) scaled by ``gain`` and the texture around it by ``contrast``."""
    mean = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
    return np.clip(mean * gain + (image - mean) * contrast, 0, 255)


def strip_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A strip across the image, side to side, that touches neither of the other two sides:
    8-30 % of the image thick, tilted by up to 8 degrees, each border with its own small wave.
    Mostly across the width (like a grinding pass), one in five across the height.

    Bands from a side (``edge_mask``, ``finish_mask``) and soft blobs (``uneven_mask``) leave out
    the interior band: a model that never saw one grows each click on such a band into a blob
    that spills over it (MTD *uneven*: full-width bands in the middle of the tile). Measured on
    MTD: at 1200 iterations the best single click model but no better
    ensemble; trained 2000 iterations (``--strip-share 0.5``) it is the shipped ensemble's second
    member."""
    h, w = hw
    across_width = rng.random() < 0.8
    length, span = (w, h) if across_width else (h, w)
    t = np.arange(length) / max(length - 1, 1)
    thick = rng.uniform(0.08, 0.3) * span
    slope = np.tan(np.radians(rng.uniform(-8, 8)))
    # keep clear of the two sides it runs between: half the thickness, the wave, the tilt, a gap
    margin = thick / 2 + 0.03 * span + 0.05 * span
    slope *= min(1.0, max(0.0, span / 2 - margin - 1) / (abs(slope) * length / 2 + 1e-9))
    margin += abs(slope) * length / 2
    centre = rng.uniform(margin, max(margin, span - margin))
    mid = centre + slope * (t - 0.5) * length
    top = mid - thick / 2 + 0.03 * span * _wave_along(length, 4, rng)
    bottom = mid + thick / 2 + 0.03 * span * _wave_along(length, 4, rng)
    d = np.arange(span)[:, None]
    m = (d >= top[None, :]) & (d < bottom[None, :])  # span x length
    return m if across_width else m.T


@dataclass
class AnomalySynthesizer:
    """Pastes one synthetic anomaly on a defect-free image (H x W x 3 uint8)."""

    p_perlin: float = 0.35
    p_crack: float = 0.25
    p_uneven: float = 0.2  # the rest: spots
    # Bands / chips along a side (``edge_mask``), drawn before the kinds above, which share the
    # rest; 0 keeps the random stream of the pools that trained the shipped click model.
    p_edge: float = 0.0
    # Share of composites that then get a global ``photometric_jitter``; 0 (no random draw) keeps
    # the click pools' random stream as it was.
    p_photometric: float = 0.0
    # Share of the uneven draws that become straight-bordered finish patches (``finish_mask``,
    # locally brighter with stronger texture, or darker and smoother); 0 draws nothing extra.
    p_finish: float = 0.0
    # Share of the other uneven draws that become interior strips (``strip_mask``); 0 draws nothing.
    p_strip: float = 0.0
    # Share of the strips rendered faint (a 1-6 % change of brightness and texture): two of MTD's
    # four worst *uneven* bands differ from the rest of the tile by 1 % and 4 % in mean grey level, too
    # little for the residual, so there the model has to follow the clicks' line. Measured on MTD
    # : the best single click model, no better ensemble. 0 draws nothing extra.
    p_faint: float = 0.0
    min_area_frac: float = 0.0008
    max_area_frac: float = 0.35
    max_uneven_area_frac: float = 0.6
    max_tries: int = 20

    def draw(self, hw: tuple[int, int], rng: np.random.Generator,
             foreground: np.ndarray | None = None) -> tuple[np.ndarray, str]:
        """(mask, kind) with kind one of edge, perlin, crack, uneven, finish, strip, spot."""
        area = hw[0] * hw[1]
        m, kind = np.zeros(hw, dtype=bool), "spot"
        for _ in range(self.max_tries):
            u = rng.random()
            if u < self.p_edge:
                m, kind = edge_mask(hw, rng), "edge"
            else:
                u = (u - self.p_edge) / (1 - self.p_edge)
                if u < self.p_perlin:
                    m, kind = perlin_mask(hw, rng), "perlin"
                elif u < self.p_perlin + self.p_crack:
                    m, kind = crack_mask(hw, rng), "crack"
                elif u < self.p_perlin + self.p_crack + self.p_uneven:
                    if self.p_finish > 0 and rng.random() < self.p_finish:
                        m, kind = finish_mask(hw, rng), "finish"
                    elif self.p_strip > 0 and rng.random() < self.p_strip:
                        m, kind = strip_mask(hw, rng), "strip"
                    else:
                        m, kind = uneven_mask(hw, rng), "uneven"
                else:
                    m, kind = spot_mask(hw, rng), "spot"
            if foreground is not None:
                m &= foreground
            top = self.max_uneven_area_frac if kind in ("uneven", "edge", "finish", "strip") else self.max_area_frac
            if self.min_area_frac * area <= m.sum() <= top * area:
                return m, kind
        return m, kind

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_edge < 1.0:
            raise ValueError(f"p_edge must lie in [0, 1), got {self.p_edge}")
        for name in ("p_photometric", "p_finish", "p_strip", "p_faint"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        shares = (self.p_perlin, self.p_crack, self.p_uneven)
        if min(shares) < 0 or sum(shares) > 1.0 + 1e-9:
            # the kinds are drawn from one uniform number: shares beyond 1 would silently be cut
            raise ValueError(f"p_perlin + p_crack + p_uneven must be shares summing to at most 1 (the rest "
                             f"are spots), got {self.p_perlin} + {self.p_crack} + {self.p_uneven}")

    def mask(self, hw: tuple[int, int], rng: np.random.Generator, foreground: np.ndarray | None = None) -> np.ndarray:
        return self.draw(hw, rng, foreground)[0]

    def source(self, image: np.ndarray, rng: np.random.Generator, others: Sequence[np.ndarray] = (),
               other_only: bool = False) -> np.ndarray:
        """What is pasted: the image's own shuffled tiles, a darker / brighter copy or another
        image (``other_only``: always the last, unscaled)."""
        img = image.astype(np.float32)
        u = 1.0 if other_only else rng.random()
        if u < 0.4:
            src = _shuffled_tiles(img, rng)
            shift = rng.uniform(20, 60) * (1 if rng.random() < 0.3 else -1)
            src = src * rng.uniform(0.5, 1.5) + shift
        elif u < 0.8 or not len(others):
            # Defects on these surfaces are mostly darker (holes, cracks) or brighter (chips, glare).
            gain = rng.uniform(0.15, 0.7) if rng.random() < 0.75 else rng.uniform(1.3, 2.0)
            src = img * gain + rng.normal(0, rng.uniform(0, 12), size=img.shape)
        else:
            other = others[int(rng.integers(len(others)))].astype(np.float32)
            if other.shape != img.shape:
                zoom = (img.shape[0] / other.shape[0], img.shape[1] / other.shape[1], 1)
                other = ndimage.zoom(other, zoom, order=1)[: img.shape[0], : img.shape[1]]
            src = np.rot90(other, int(rng.integers(4))) if other.shape[0] == other.shape[1] else other[::-1]
            if not other_only:
                src = src * rng.uniform(0.5, 1.5)
        if rng.random() < 0.5:
            src = ndimage.gaussian_filter(src, sigma=(rng.uniform(0.5, 2.0),) * 2 + (0,))
        return np.clip(src, 0, 255)

    def __call__(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        others: Sequence[np.ndarray] = (),
        foreground: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (anomalous image uint8, boolean mask)."""
        mask, kind = self.draw(image.shape[:2], rng, foreground)
        img = image.astype(np.float32)
        m = mask.astype(np.float32)
        if kind == "edge" and len(others) and rng.random() < 0.5:
            # a band whose texture differs mildly (another part's surface, a little gain), soft border
            other = self.source(image, rng, others[:1], other_only=True)
            src = np.clip(other * rng.uniform(0.8, 1.25), 0, 255)
            m = ndimage.gaussian_filter(m, sigma=rng.uniform(1.0, 3.0))
            beta = rng.uniform(0.6, 1.0)
        elif kind == "strip" and self.p_faint > 0 and rng.random() < self.p_faint:
            sigma = rng.uniform(3, 8)
            gain = 1.0 + rng.uniform(0.01, 0.06) * (1 if rng.random() < 0.5 else -1)
            src = _refinished(img, sigma, gain, rng.uniform(0.85, 1.15))
            m = ndimage.gaussian_filter(m, sigma=rng.uniform(1.0, 3.0))
            beta = 1.0
        elif kind == "uneven" or (kind == "strip" and rng.random() < 0.5):
            # a mild brightness / texture change with a feathered border; the label stays the
            # hard region, as annotators paint it
            gain = rng.uniform(0.72, 0.9) if rng.random() < 0.7 else rng.uniform(1.1, 1.3)
            src = np.clip(img * gain + rng.normal(0, rng.uniform(0, 6), size=img.shape), 0, 255)
            m = ndimage.gaussian_filter(m, sigma=rng.uniform(1.0, 0.02 * max(image.shape[:2]) + 1.0))
            beta = rng.uniform(0.75, 1.0)
        elif kind in ("finish", "strip"):
            # the texture around its local mean amplified and the patch a little brighter (a
            # coarser, shinier finish), or the reverse; the border stays sharp, like a machining line
            sigma = rng.uniform(3, 8)
            if rng.random() < 0.75:
                gain, contrast = rng.uniform(1.05, 1.45), rng.uniform(1.4, 2.6)
            else:
                gain, contrast = rng.uniform(0.6, 0.85), rng.uniform(0.3, 0.8)
            src = _refinished(img, sigma, gain, contrast)
            m = ndimage.gaussian_filter(m, sigma=rng.uniform(0.5, 3.0))
            beta = rng.uniform(0.8, 1.0)
        else:
            src = self.source(image, rng, others)
            beta = rng.uniform(0.5, 1.0)
        m = m[..., None]
        out = np.clip((1 - m) * img + m * (beta * src + (1 - beta) * img) + 0.5, 0, 255).astype(np.uint8)
        if self.p_photometric > 0 and rng.random() < self.p_photometric:
            out = photometric_jitter(out, rng)
        return out, mask
