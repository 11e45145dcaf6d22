"""Boxes as prompts: a drawn box becomes the clicks an annotator who only knew the box would make.

A box says "the defect is in here, nothing is outside", but not which pixels inside are defective.
Trained as "normal outside, unknown inside" (WeakREST), ADClick-Seg gets almost no positive pixel
and falls below the training-free map on MTD. The click model already turns a click into a mask,
so the box is turned into clicks instead: a positive click on one of the most anomalous points
inside each box (the one whose answer fills the box best: boxes are drawn tight), then negative
clicks where the answer leaks out of the boxes. The answer, cut to the boxes, is a pseudo label
like the one from real clicks (``SegItem`` with ``click_prob``), and trains the same way (Eq. 9-10).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
from scipy import ndimage

from .clicks import Click
from .predictor import ClickPredictor, ImageState
from .seg_training import SegItem

__all__ = ["box_region", "box_fit", "box_clicks_and_probability", "box_prompted_item"]

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def box_region(hw: tuple[int, int], boxes: Sequence[Box]) -> np.ndarray:
    """H x W bool: the union of the boxes (pixel (r, c) is inside if its centre is)."""
    h, w = hw
    region = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        c1, r1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        if c1 > c0 and r1 > r0:
            region[r0:r1, c0:c1] = True
    return region


def _peak(values: np.ndarray, where: np.ndarray) -> Click | None:
    """The pixel with the largest value where ``where`` holds (None if nowhere)."""
    if not where.any():
        return None
    flat = np.where(where, values, -np.inf)
    r, c = np.unravel_index(int(np.argmax(flat)), flat.shape)
    return Click(float(c), float(r), True)


def _peaks(values: np.ndarray, where: np.ndarray, k: int, separation: float) -> list[Click]:
    """Up to ``k`` maxima of ``values`` inside ``where``, each at least ``separation`` px from the others."""
    where = where.copy()
    yy, xx = np.mgrid[0:where.shape[0], 0:where.shape[1]]
    out: list[Click] = []
    while len(out) < k:
        c = _peak(values, where)
        if c is None:
            break
        out.append(c)
        where &= (yy - c.y) ** 2 + (xx - c.x) ** 2 > separation ** 2
    return out


def box_fit(answer: np.ndarray, box: Box) -> float:
    """How well a binary answer explains a tight box: the area of the answer's bounding box inside
    the box over the box's area (1: the answer touches all four sides; 0: nothing inside)."""
    region = box_region(answer.shape, [box])
    inside = answer & region
    if not inside.any():
        return 0.0
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    return float((rows[-1] + 1 - rows[0]) * (cols[-1] + 1 - cols[0]) / region.sum())


def box_clicks_and_probability(
    predictor: ClickPredictor,
    state: ImageState,
    boxes: Sequence[Box],
    defect_type: str | None = None,
    candidates: int = 3,
    max_extra_positive: int = 2,
    extra_peak_ratio: float = 0.5,
    max_negative: int = 2,
    leak_fraction: float = 0.05,
    smooth_sigma: float = 2.0,
) -> tuple[np.ndarray, list[Click]]:
    """(probability H x W cut to the boxes, the clicks that produced it).

    Annotators draw boxes tight, so the right answer's bounding box fills the box (``box_fit``).
    Per box (largest first): of the ``candidates`` strongest peaks of the smoothed residual map
    inside it, the positive click whose answer fits the box best. Then (large defects: one click
    covers little of an uneven area) positive clicks on the strongest in-box peak the answer
    (p > 0.5) does not cover yet, while it is at least ``extra_peak_ratio`` of the first peak and
    the fit improves (at most ``max_extra_positive``). Then, while more than ``leak_fraction`` of
    the answer lies outside the boxes, a negative click on the most confident leaked pixel (at most
    ``max_negative``).
    """
    h, w = state.original_hw
    amap = ndimage.gaussian_filter(predictor.anomaly_map(state), smooth_sigma)
    boxes = [b for b in boxes if box_region((h, w), [b]).any()]
    inside = box_region((h, w), boxes)
    clicks: list[Click] = []
    prob: np.ndarray | None = None

    def fit(p: np.ndarray) -> float:
        return float(np.mean([box_fit(p > 0.5, b) for b in boxes]))

    for box in sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
        side = min(box[2] - box[0], box[3] - box[1])
        best = None
        for c in _peaks(amap, box_region((h, w), [box]), candidates, max(3.0, 0.25 * side)):
            p = predictor.predict(state, clicks + [c], prev_mask=prob, defect_type=defect_type)
            score = box_fit(p > 0.5, box)
            if best is None or score > best[0]:
                best = (score, c, p)
        clicks.append(best[1])
        prob = best[2]
    if prob is None:
        return np.zeros((h, w), dtype=np.float32), []
    first_peak = max(float(amap[int(c.y), int(c.x)]) for c in clicks)
    for _ in range(max_extra_positive):
        uncovered = inside & ~ndimage.binary_dilation(prob > 0.5, iterations=2)
        c = _peak(amap, uncovered)
        if c is None or amap[int(c.y), int(c.x)] < extra_peak_ratio * first_peak:
            break
        p = predictor.predict(state, clicks + [c], prev_mask=prob, defect_type=defect_type)
        if fit(p) <= fit(prob):
            break
        clicks.append(c)
        prob = p
    for _ in range(max_negative):
        answer = prob > 0.5
        leak = answer & ~inside
        if leak.sum() <= leak_fraction * max(1, answer.sum()):
            break
        neg = _peak(prob, leak)
        clicks.append(Click(neg.x, neg.y, False))
        prob = predictor.predict(state, clicks, prev_mask=prob, defect_type=defect_type)
    return np.where(inside, prob, 0.0).astype(np.float32), clicks


def box_prompted_item(predictor: ClickPredictor, item: SegItem, state: ImageState | None = None) -> SegItem:
    """A box-labelled item (no mask, no click answer) -> the same item with the box-prompted click
    answer as ``click_prob``; other items are returned unchanged.

    Only the negative clicks (outside the boxes: certainly normal) go into ``clicks``, whose discs
    training forces (Eq. 8); the positive ones are the machine's guesses, so there the answer's
    own confidence decides (Eq. 9)."""
    if item.mask is not None or item.click_prob is not None or not len(item.boxes):
        return item
    state = state or predictor.set_image(item.image)
    prob, clicks = box_clicks_and_probability(predictor, state, item.boxes, item.defect_type)
    if not clicks:
        return item
    return replace(item, click_prob=prob, clicks=tuple(c for c in clicks if not c.positive))
