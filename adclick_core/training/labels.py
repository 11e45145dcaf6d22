"""Label construction for ADClick-Seg training (ALGORITHM.md, "Losses and pseudo labels").

All functions work on numpy arrays and return ``(target, valid)`` pairs of float32 arrays:
``target`` in {0, 1}, ``valid`` 1 where the pixel/block is labelled and 0 where it is ignored
(ignored entries have target 0). They feed ``normalized_focal_loss(logits, target, valid)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..inference.clicks import Click
from ..utils.errors import InputError

__all__ = [
    "box_cover",
    "click_disc_labels",
    "trivalued_labels",
    "pseudo_labels",
    "exact_labels",
    "block_fractions",
    "block_labels",
    "WeakLabel",
    "box_labels",
    "tag_labels",
]

Box = tuple[float, float, float, float]


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise InputError(f"{name} must be H x W, got shape {a.shape}")
    return a


def click_disc_labels(prob: np.ndarray, clicks: Sequence[Click], radius: float) -> np.ndarray:
    """Eq. 8: pixels within ``radius`` (inclusive) of a positive click -> 1, of a negative click -> 0,
    else the ADClick probability. Where discs overlap, the later click wins."""
    prob = _as_2d(prob, "prob").astype(np.float32, copy=True)
    h, w = prob.shape
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    r2 = float(radius) ** 2
    for c in clicks:
        disk = (yy - c.y) ** 2 + (xx - c.x) ** 2 <= r2
        prob[disk] = 1.0 if c.positive else 0.0
    return prob


def trivalued_labels(prob: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 9: 1 where prob > 0.5 + delta, 0 where prob < 0.5 - delta, ignored (valid 0) between."""
    prob = _as_2d(prob, "prob").astype(np.float32, copy=False)
    if not 0.0 <= delta < 0.5:
        raise InputError(f"delta must be in [0, 0.5), got {delta}")
    pos = prob > 0.5 + delta
    neg = prob < 0.5 - delta
    return pos.astype(np.float32), (pos | neg).astype(np.float32)


def pseudo_labels(
    prob: np.ndarray,
    clicks: Sequence[Click],
    radius: float,
    rng: np.random.Generator,
    max_delta: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo labels from an ADClick mask and its clicks: Eq. 8, then Eq. 9 with delta ~ U[0, max_delta]
    drawn afresh on each call (i.e. each training iteration)."""
    delta = float(rng.uniform(0.0, max_delta)) if max_delta > 0 else 0.0
    return trivalued_labels(click_disc_labels(prob, clicks, radius), delta)


def exact_labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A human-painted mask (bool, {0,1} or {0,255}): every pixel labelled, no abandon band."""
    mask = _as_2d(mask, "mask")
    target = (mask > 0.5).astype(np.float32)
    return target, np.ones_like(target)


def block_fractions(values: np.ndarray, block: int = 8) -> np.ndarray:
    """Mean of ``values`` over each ``block`` x ``block`` cell -> ceil(H/block) x ceil(W/block).
    Partial border blocks average over the pixels they really contain."""
    values = _as_2d(values, "mask").astype(np.float64)
    if block < 1:
        raise InputError(f"block must be >= 1, got {block}")
    h, w = values.shape
    bh, bw = math.ceil(h / block), math.ceil(w / block)
    padded = np.zeros((bh * block, bw * block))
    count = np.zeros_like(padded)
    padded[:h, :w] = values
    count[:h, :w] = 1.0
    sums = padded.reshape(bh, block, bw, block).sum((1, 3))
    counts = count.reshape(bh, block, bw, block).sum((1, 3))
    return (sums / counts).astype(np.float32)


def block_labels(
    mask_or_fraction: np.ndarray, block: int = 8, eps_pos: float = 0.25, eps_neg: float = 0.08
) -> tuple[np.ndarray, np.ndarray]:
    """WeakREST block labels at ceil(H/block) x ceil(W/block): anomalous fraction a >= eps_pos -> 1,
    a <= eps_neg -> 0, ignored between. Input: a pixel mask (bool or values in [0, 1], soft allowed)."""
    m = _as_2d(mask_or_fraction, "mask")
    if m.dtype != bool and m.size and (float(m.min()) < 0.0 or float(m.max()) > 1.0):
        raise InputError("block_labels expects a mask with values in [0, 1]")
    if not 0.0 <= eps_neg < eps_pos <= 1.0:
        raise InputError(f"need 0 <= eps_neg < eps_pos <= 1, got {eps_neg}, {eps_pos}")
    a = block_fractions(m.astype(np.float32), block)
    pos = a >= eps_pos
    neg = a <= eps_neg
    return pos.astype(np.float32), (pos | neg).astype(np.float32)


@dataclass
class WeakLabel:
    """Weak supervision of one image: ``target``/``valid`` maps (pixel or block resolution) and the
    image-level label (1 = contains a defect, 0 = defect-free, None = unknown) for a MIL-style loss."""

    target: np.ndarray
    valid: np.ndarray
    image_label: int | None


def box_cover(hw: tuple[int, int], boxes: Sequence[Box]) -> np.ndarray:
    """Pixels touched by any box (x0, y0, x1, y1 in pixels, x = column); conservative: a pixel
    partly inside counts as inside."""
    h, w = hw
    cover = np.zeros((h, w), dtype=bool)
    for box in boxes:
        if len(box) != 4:
            raise InputError(f"a box is (x0, y0, x1, y1), got {box}")
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        c0, c1 = max(0, math.floor(x0)), min(w, math.ceil(x1))
        r0, r1 = max(0, math.floor(y0)), min(h, math.ceil(y1))
        if c1 == c0 and 0 <= c0 < w:  # degenerate (zero-width) box still touches its pixel column
            c1 = c0 + 1
        if r1 == r0 and 0 <= r0 < h:
            r1 = r0 + 1
        cover[r0:r1, c0:c1] = True
    return cover


def box_labels(
    hw: tuple[int, int], boxes: Sequence[Box], block: int | None = None, eps_neg: float = 0.08
) -> WeakLabel:
    """Boxes: normal (target 0, valid) outside all boxes, unknown (valid 0) inside.

    ``block``: labels at block resolution instead; a block is normal when the fraction of its pixels
    covered by boxes is <= ``eps_neg`` (then its defect fraction is <= eps_neg too), else unknown.
    ``image_label`` is 1 when any box is given, 0 for an empty list (nothing marked: all normal).
    """
    h, w = int(hw[0]), int(hw[1])
    cover = box_cover((h, w), boxes)
    if block is None:
        valid = (~cover).astype(np.float32)
    else:
        valid = (block_fractions(cover.astype(np.float32), block) <= eps_neg).astype(np.float32)
    return WeakLabel(np.zeros_like(valid), valid, 1 if len(boxes) else 0)


def tag_labels(hw: tuple[int, int], tag: str, block: int | None = None) -> WeakLabel:
    """Image tags: "OK" -> everything normal and valid; "NG" -> everything unknown (valid 0) with
    ``image_label`` 1 (a defect somewhere). Case-insensitive. ``block`` gives block resolution."""
    h, w = int(hw[0]), int(hw[1])
    if block is not None:
        h, w = math.ceil(h / block), math.ceil(w / block)
    t = str(tag).strip().upper()
    if t == "OK":
        return WeakLabel(np.zeros((h, w), np.float32), np.ones((h, w), np.float32), 0)
    if t == "NG":
        return WeakLabel(np.zeros((h, w), np.float32), np.zeros((h, w), np.float32), 1)
    raise InputError(f"image tag must be 'OK' or 'NG', got {tag!r}")
