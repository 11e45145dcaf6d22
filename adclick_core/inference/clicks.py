"""Clicks: the value type, click maps (disks) and the one place for click simulation.

Follows the RITM / SimpleClick protocol (ALGORITHM.md, "Click encoding and simulation").
Coordinates are pixels ``(x = column, y = row)`` in whatever image the caller works in;
helpers that change resolution say so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import torch

__all__ = [
    "Click",
    "scale_clicks",
    "click_maps",
    "click_disk",
    "next_eval_click",
    "sample_training_clicks",
    "next_training_click",
    "encode_clicks",
]


@dataclass(frozen=True)
class Click:
    """One user click: ``x`` is the column, ``y`` the row, in pixels."""

    x: float
    y: float
    positive: bool = True

    def scaled(self, sx: float, sy: float) -> "Click":
        return Click(self.x * sx, self.y * sy, self.positive)


def scale_clicks(clicks: Sequence[Click], src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> list[Click]:
    """Map clicks from an image of size ``src_hw`` to one of size ``dst_hw`` (pixel centres kept)."""
    sy = dst_hw[0] / src_hw[0]
    sx = dst_hw[1] / src_hw[1]
    return [Click((c.x + 0.5) * sx - 0.5, (c.y + 0.5) * sy - 0.5, c.positive) for c in clicks]


def click_maps(clicks: Iterable[Click], hw: tuple[int, int], radius: float = 5.0) -> np.ndarray:
    """Two binary disk maps ``(2, H, W)`` float32: channel 0 positive clicks, channel 1 negative."""
    h, w = hw
    maps = np.zeros((2, h, w), dtype=np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    r2 = float(radius) ** 2
    for c in clicks:
        disk = (yy - c.y) ** 2 + (xx - c.x) ** 2 <= r2
        maps[0 if c.positive else 1][disk] = 1.0
    return maps


def click_disk(hw: tuple[int, int], x: float, y: float, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of (x, y), always including the pixel the click falls in."""
    disk = np.zeros(hw, dtype=bool)
    r = int(np.ceil(max(radius, 0.0)))
    y0, y1 = max(0, int(np.floor(y)) - r), min(hw[0], int(np.ceil(y)) + r + 1)
    x0, x1 = max(0, int(np.floor(x)) - r), min(hw[1], int(np.ceil(x)) + r + 1)
    if y0 < y1 and x0 < x1:  # only the window around the click: full-image grids cost ms per click
        yy = np.arange(y0, y1, dtype=np.float64)[:, None]
        xx = np.arange(x0, x1, dtype=np.float64)[None, :]
        disk[y0:y1, x0:x1] = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
    disk[min(max(int(round(y)), 0), hw[0] - 1), min(max(int(round(x)), 0), hw[1] - 1)] = True
    return disk


def _error_click(
    fn: np.ndarray, fp: np.ndarray, not_clicked: np.ndarray, rng: np.random.Generator | None
) -> Click | None:
    """Click in the larger of the two error regions, where its distance transform is largest.

    With ``rng`` (training) a random pixel whose distance exceeds half the maximum is taken;
    without it (evaluation) the argmax, so evaluation is deterministic.
    """
    fn_dt, fn_off = _distance_inside(fn & not_clicked)
    fp_dt, fp_off = _distance_inside(fp & not_clicked)
    fn_max = float(fn_dt.max()) if fn_dt.size else 0.0
    fp_max = float(fp_dt.max()) if fp_dt.size else 0.0
    if max(fn_max, fp_max) <= 0:
        return None
    positive = fn_max >= fp_max
    dt, (oy, ox) = (fn_dt, fn_off) if positive else (fp_dt, fp_off)
    dmax = fn_max if positive else fp_max
    if rng is None:
        y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
    else:
        ys, xs = np.nonzero(dt > dmax / 2.0)
        i = int(rng.integers(len(ys)))
        y, x = ys[i], xs[i]
    return Click(float(x + ox), float(y + oy), bool(positive))


def _distance_inside(region: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Euclidean distance of each pixel of ``region`` to the nearest pixel outside it or to the
    image border (which counts as outside, as in RITM), on the region's bounding box only, with
    the box's (row, column) offset. Exact: a one-pixel ring of outside pixels surrounds the box,
    and for any outside pixel beyond it a ring pixel lies at least as close. The whole-image
    transform cost tens of ms per click on megapixel images for a few hundred error pixels."""
    rows = np.flatnonzero(region.any(axis=1))
    if not len(rows):
        return np.zeros((0, 0)), (0, 0)
    cols = np.flatnonzero(region.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.pad(region[y0:y1, x0:x1], 1)
    return ndimage.distance_transform_edt(box)[1:-1, 1:-1], (int(y0), int(x0))


def _clicked_mask(clicks: Sequence[Click], hw: tuple[int, int], radius: float) -> np.ndarray:
    clicked = np.zeros(hw, dtype=bool)
    for c in clicks:
        clicked |= click_disk(hw, c.x, c.y, radius)
    return clicked


def next_eval_click(
    gt: np.ndarray, pred: np.ndarray | None, clicks: Sequence[Click] = (), click_radius: float = 5.0
) -> Click | None:
    """The evaluation protocol's next click (deterministic).

    ``gt`` and ``pred`` are boolean masks of one size (``pred`` None = nothing predicted yet).
    Returns None when there is no error left to click on.
    """
    gt = gt.astype(bool)
    pred = np.zeros_like(gt) if pred is None else pred.astype(bool)
    not_clicked = ~_clicked_mask(clicks, gt.shape, click_radius) if clicks else np.ones_like(gt)
    return _error_click(gt & ~pred, pred & ~gt, not_clicked, None)


def next_training_click(gt: np.ndarray, pred: np.ndarray, rng: np.random.Generator) -> Click | None:
    """The training protocol's iterative click: random pixel deep inside the larger error region."""
    gt = gt.astype(bool)
    pred = pred.astype(bool)
    return _error_click(gt & ~pred, pred & ~gt, np.ones_like(gt), rng)


def sample_training_clicks(
    gt: np.ndarray,
    rng: np.random.Generator,
    max_positive: int = 3,
    max_negative: int = 3,
    p_geometric: float = 0.8,
    erosion: int = 2,
) -> list[Click]:
    """Initial clicks for one training sample: ``1 + Geometric(p)`` positives inside the eroded
    mask, and ``Geometric(p) - 1`` negatives (often none) on the background near the object."""
    gt = gt.astype(bool)
    clicks: list[Click] = []
    if not gt.any():
        return clicks
    inner = ndimage.binary_erosion(gt, iterations=erosion) if erosion > 0 else gt
    if not inner.any():
        inner = gt
    n_pos = min(max_positive, int(rng.geometric(p_geometric)))
    ys, xs = np.nonzero(inner)
    for i in rng.choice(len(ys), size=min(n_pos, len(ys)), replace=False):
        clicks.append(Click(float(xs[i]), float(ys[i]), True))
    n_neg = min(max_negative, int(rng.geometric(p_geometric)) - 1)
    if n_neg > 0:
        # Negatives where annotators put them: on good surface close to the defect.
        ring = ndimage.binary_dilation(gt, iterations=12) & ~ndimage.binary_dilation(gt, iterations=3)
        if not ring.any():
            ring = ~gt
        ys, xs = np.nonzero(ring)
        if len(ys):
            for i in rng.choice(len(ys), size=min(n_neg, len(ys)), replace=False):
                clicks.append(Click(float(xs[i]), float(ys[i]), False))
    return clicks


def encode_clicks(
    clicks: Sequence[Sequence[Click]], prev_mask: "torch.Tensor | None", size: int, radius: float
) -> "torch.Tensor":
    """Model input for a batch: B x 3 x size x size (positive disks, negative disks, previous mask).

    Clicks must already be in model-input pixels; ``prev_mask`` is B x 1 x size x size or None.
    """
    import torch

    maps = torch.from_numpy(np.stack([click_maps(c, (size, size), radius) for c in clicks]))
    if prev_mask is None:
        prev = torch.zeros(len(clicks), 1, size, size)
    else:
        prev = prev_mask.detach().float().cpu()
    return torch.cat([maps, prev], dim=1)
