"""Click-driven baselines for the interactive evaluation.

Both take the same clicks as our model (``Click(x, y, positive)``, pixel coordinates of the
image they are given) and return a foreground probability map ``H x W`` float32 in [0, 1],
so the evaluation can threshold them (0.49) and simulate the next click exactly as for the
model.

* :func:`random_walker_probability` - classic interactive segmentation from image
  intensities alone (Grady's random walker seeded by the click disks).
* :func:`residual_cut_probability` - the training-free residual anomaly map, restricted to
  the neighbourhood of the positive clicks and suppressed around the negative ones.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Sequence

import numpy as np
from skimage.color import rgb2gray
from skimage.segmentation import random_walker
from skimage.transform import resize

from .clicks import Click, click_disk, scale_clicks
from ..utils.errors import InputError

try:  # a dependency of scikit-learn, so normally present
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

__all__ = ["random_walker_probability", "residual_cut_probability", "gray_image", "click_disk",
           "paint_click_seeds", "solver_shape", "random_walker_foreground"]

# Radius (px) of the disk forced to the click's label in the residual cut; the same radius
# as the click maps the model sees (ALGORITHM.md, "Click encoding and simulation").
_FORCED_DISK_RADIUS = 5.0


def _check_clicks(clicks: Sequence[Click], hw: tuple[int, int]) -> None:
    h, w = hw
    for c in clicks:
        # Half a pixel of slack: rescaled click coordinates of edge pixels land at -0.5 + eps.
        if not (-0.5 <= c.x < w - 0.5 + 1e-6 and -0.5 <= c.y < h - 0.5 + 1e-6):
            raise InputError(f"click ({c.x:.1f}, {c.y:.1f}) lies outside the {w}x{h} image")


def gray_image(image: np.ndarray) -> np.ndarray:
    """Grayscale float64 in [0, 1] (integer images by their dtype range)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        if np.issubdtype(img.dtype, np.integer):
            img = img[..., :3].astype(np.float64) / np.iinfo(img.dtype).max
        gray = rgb2gray(np.asarray(img[..., :3], dtype=np.float64))
    elif img.ndim == 2:
        if np.issubdtype(img.dtype, np.integer):
            gray = img.astype(np.float64) / np.iinfo(img.dtype).max
        else:
            gray = img.astype(np.float64)
    else:
        raise InputError(f"expected an H x W or H x W x 3 image, got shape {img.shape}")
    return np.nan_to_num(gray)


def paint_click_seeds(labels: np.ndarray, clicks: Sequence[Click], radius: float) -> None:
    """Paint each click's disk into ``labels`` (1 positive, 2 negative), in click order so a later
    click overrides an earlier one where disks overlap, as it does for the model. ``clicks`` are in
    the label grid's pixels; clicks off the grid are left out."""
    h, w = labels.shape
    for c in clicks:
        if -0.5 <= c.x < w and -0.5 <= c.y < h:
            labels[click_disk((h, w), c.x, c.y, radius)] = 1 if c.positive else 2


def solver_shape(hw: tuple[int, int], max_side: int) -> tuple[float, tuple[int, int]]:
    """(scale, shape) of the copy the random walker is solved on: longer side at most ``max_side``."""
    h, w = hw
    scale = min(1.0, max_side / max(h, w))
    return scale, (max(2, int(round(h * scale))), max(2, int(round(w * scale))))


def random_walker_foreground(gray: np.ndarray, labels: np.ndarray, beta: float) -> np.ndarray:
    """Grady's random walker on a grayscale image: probability of label 1 against label 2 for
    every pixel (``labels``: 0 unknown, 1 foreground seed, 2 background seed; both must occur)."""
    if (labels > 0).all():
        return (labels == 1).astype(np.float64)
    # The solver's vectors are small (~20k entries): multithreaded BLAS only adds
    # synchronisation, and on a busy machine made one call ~10x slower than one thread.
    one_thread = threadpool_limits(limits=1, user_api="blas") if threadpool_limits else nullcontext()
    with warnings.catch_warnings(), one_thread:
        # Isolated unlabelled pixels and cg tolerance notices are harmless here.
        warnings.simplefilter("ignore")
        # 'cg_j' (Jacobi-preconditioned conjugate gradient) needs no pyamg.
        full = random_walker(gray, labels, beta=beta, mode="cg_j", return_full_prob=True)
    return full[0]


def random_walker_probability(
    image: np.ndarray,
    clicks: Sequence[Click],
    beta: float = 130.0,
    max_side: int = 160,
    seed_radius: int = 3,
) -> np.ndarray:
    """Foreground probability from scikit-image's random walker seeded by the clicks.

    Positive click disks are label 1, negative click disks and the 1-pixel image border are
    label 2: the first click is always positive and the random walker needs two labels, so
    the border stands in for background, except where a positive disk covers it. Runs on a
    grayscale copy whose longer side is at most ``max_side`` (``seed_radius`` is in pixels
    of that copy) and resizes the probability of label 1 back bilinearly.

    Returns ``H x W`` float32 in [0, 1]; zeros when there is no positive click.
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    _check_clicks(clicks, (h, w))
    if not any(c.positive for c in clicks):
        return np.zeros((h, w), dtype=np.float32)

    gray = gray_image(image)
    scale, (sh, sw) = solver_shape((h, w), max_side)
    if (sh, sw) != (h, w):
        gray = resize(gray, (sh, sw), order=1, anti_aliasing=True)
    small_clicks = scale_clicks(clicks, (h, w), (sh, sw))

    labels = np.zeros((sh, sw), dtype=np.int32)
    labels[0, :] = labels[-1, :] = labels[:, 0] = labels[:, -1] = 2
    paint_click_seeds(labels, small_clicks, seed_radius)  # positive disks override border seeds
    if not (labels == 1).any():
        # Every positive disk was overwritten by a later negative one.
        return np.zeros((h, w), dtype=np.float32)
    if not (labels == 2).any():
        return np.ones((h, w), dtype=np.float32)
    prob = random_walker_foreground(gray, labels, beta)
    if (sh, sw) != (h, w):
        prob = resize(prob, (h, w), order=1, anti_aliasing=False)
    return np.clip(prob, 0.0, 1.0).astype(np.float32)


def residual_cut_probability(
    anomaly_map: np.ndarray, clicks: Sequence[Click], sigma_frac: float = 0.15
) -> np.ndarray:
    """The residual anomaly map "cut by the clicks".

    The map (any scale) is divided by its 99.5th percentile and clipped to [0, 1], so a few
    hot pixels do not flatten everything else. It is then weighted by proximity to the
    positive clicks, ``max_i exp(-d_i^2 / 2s^2)`` with ``s = sigma_frac * diagonal``, and
    multiplied by ``1 - exp(-d_j^2 / 2(s/2)^2)`` for each negative click. Finally, in click
    order, each positive click's disk (radius 5 px) is raised to at least 0.99 and each
    negative click's disk set to 0.

    Returns ``H x W`` float32 in [0, 1]; zeros when there is no positive click.
    """
    amap = np.asarray(anomaly_map, dtype=np.float64)
    if amap.ndim != 2:
        raise InputError(f"expected an H x W anomaly map, got shape {amap.shape}")
    h, w = amap.shape
    _check_clicks(clicks, (h, w))
    if not any(c.positive for c in clicks):
        return np.zeros((h, w), dtype=np.float32)
    if sigma_frac <= 0:
        raise InputError(f"sigma_frac must be positive, got {sigma_frac}")

    amap = np.nan_to_num(amap, nan=0.0, posinf=0.0, neginf=0.0)
    lo = min(float(amap.min()), 0.0)  # only shift maps that go negative
    amap = amap - lo
    ref = float(np.percentile(amap, 99.5))
    if ref <= 0:
        ref = float(amap.max())
    norm = np.clip(amap / ref, 0.0, 1.0) if ref > 0 else np.zeros_like(amap)

    s = sigma_frac * float(np.hypot(h, w))
    s_neg = s / 2.0
    yy = np.arange(h, dtype=np.float64)[:, None]
    xx = np.arange(w, dtype=np.float64)[None, :]
    near_pos = np.zeros((h, w))
    keep_neg = np.ones((h, w))
    for c in clicks:
        d2 = (yy - c.y) ** 2 + (xx - c.x) ** 2
        if c.positive:
            np.maximum(near_pos, np.exp(-d2 / (2 * s * s)), out=near_pos)
        else:
            keep_neg *= 1.0 - np.exp(-d2 / (2 * s_neg * s_neg))
    prob = norm * near_pos * keep_neg

    for c in clicks:
        disk = click_disk((h, w), c.x, c.y, _FORCED_DISK_RADIUS)
        if c.positive:
            prob[disk] = np.maximum(prob[disk], 0.99)
        else:
            prob[disk] = 0.0
    return np.clip(prob, 0.0, 1.0).astype(np.float32)
