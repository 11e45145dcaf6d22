"""Evaluation metrics for anomaly segmentation and interactive (click) segmentation.

Definitions follow ALGORITHM.md ("Metrics") so our figures compare with the papers:
step-wise pixel AP, MVTec AD's official AU-PRO, pooled pixel / image AUROC, and the
click metrics NoC@tau and mIoU@k.

Where a function takes ``scores`` and ``masks`` it accepts either one array (``H x W`` or a
stack ``N x H x W``) or a sequence of per-image arrays that may differ in size; pixels of all
images are pooled. Masks may be bool, 0/1 or 0/255: a pixel is anomalous when its value is
at least 0.5.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from ..utils.errors import InputError

__all__ = [
    "pixel_ap",
    "pixel_auroc",
    "image_auroc",
    "aupro",
    "pro_curve",
    "iou",
    "noc",
    "mean_iou_at",
    "segmentation_report",
]

MapsLike = Union[np.ndarray, Sequence[np.ndarray]]

# MVTec AD's connectivity for ground-truth regions: 8-connected.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask >= 0.5


def _as_list(maps: MapsLike) -> list[np.ndarray]:
    if isinstance(maps, np.ndarray):
        return list(maps) if maps.ndim == 3 else [maps]
    return list(maps)


def _as_pairs(scores: MapsLike, masks: MapsLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-image ``(scores, bool mask)`` pairs with matching shapes.

    A single 3-D array is read as a stack of images, so AU-PRO labels regions per image.
    """
    scores = _as_list(scores)
    masks = _as_list(masks)
    if len(scores) != len(masks):
        raise InputError(f"{len(scores)} score maps but {len(masks)} masks")
    pairs = []
    for i, (s, m) in enumerate(zip(scores, masks)):
        s = np.asarray(s)
        s = s.astype(np.float32 if s.dtype in (np.float16, np.float32) else np.float64, copy=False)
        m = _as_mask(m)
        if s.shape != m.shape:
            raise InputError(f"image {i}: score map shape {s.shape} != mask shape {m.shape}")
        if not np.all(np.isfinite(s)):
            raise InputError(f"image {i}: score map contains NaN or infinite values")
        pairs.append((s, m))
    return pairs


def _pooled(scores: MapsLike, masks: MapsLike) -> tuple[np.ndarray, np.ndarray]:
    return _pooled_pairs(_as_pairs(scores, masks))


def _pooled_pairs(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return (
        np.concatenate([s.ravel() for s, _ in pairs]),
        np.concatenate([m.ravel() for _, m in pairs]),
    )


def _sums_per_score(score: np.ndarray, *selections: np.ndarray, weight: np.ndarray | None = None) -> list[np.ndarray]:
    """For each distinct score, from the highest down: how many pixels have it (first array),
    how many of them each boolean ``selections`` array selects, and (last, with ``weight``) the
    sum of their weights. Every threshold ``score >= t`` of a curve is a prefix of these groups.

    Maps that float16 holds exactly (``eval-click`` keeps its answers so) are grouped by a
    bincount over the 65,536 float16 values, with no sort; others by ``np.unique``. The figures
    are the same either way; sorting tens of millions of pooled pixels cost seconds per metric."""
    score = score + 0.0  # -0.0 and 0.0 are one threshold
    half = score.astype(np.float16)
    if np.array_equal(half, score):
        bits = half.view(np.uint16).astype(np.int64)
        key = np.where(bits & 0x8000, 0xFFFF - bits, bits | 0x8000)  # integer order = value order
        n = 1 << 16
    else:
        _, key = np.unique(score, return_inverse=True)
        key = key.ravel()
        n = int(key.max()) + 1 if key.size else 0
    counts = np.bincount(key, minlength=n)
    present = np.flatnonzero(counts)[::-1]
    out = [counts[present]]
    out += [np.bincount(key[sel], minlength=n)[present] for sel in selections]
    if weight is not None:
        out.append(np.bincount(key, weights=weight, minlength=n)[present])
    return out


def _ap_from(counts: np.ndarray, positives: np.ndarray) -> float:
    """Step-wise AP from per-score pixel and positive counts (``_sums_per_score``, highest first)."""
    precision = np.cumsum(positives, dtype=np.float64) / np.cumsum(counts, dtype=np.float64)
    return float(np.sum(positives / float(positives.sum()) * precision))


def _auroc_from(counts: np.ndarray, positives: np.ndarray) -> float:
    """Trapezoidal ROC AUC from per-score pixel and positive counts (highest score first)."""
    negatives = counts - positives
    tpr = np.concatenate(([0.0], np.cumsum(positives, dtype=np.float64) / positives.sum()))
    fpr = np.concatenate(([0.0], np.cumsum(negatives, dtype=np.float64) / negatives.sum()))
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1])) / 2.0)


def pixel_ap(scores: MapsLike, masks: MapsLike) -> float:
    """Step-wise average precision over pooled pixels (as sklearn's ``average_precision_score``:
    sum over thresholds of precision x recall gained).

    Not the trapezoidal area under the PR curve, which overestimates with few thresholds.
    NaN when there is no anomalous pixel.
    """
    s, m = _pooled(scores, masks)
    if not m.any():
        return float("nan")
    return _ap_from(*_sums_per_score(s, m))


def pixel_auroc(scores: MapsLike, masks: MapsLike) -> float:
    """ROC AUC over pooled pixels (trapezoidal, ties as one point, as sklearn's
    ``roc_auc_score``); NaN when only one class is present."""
    s, m = _pooled(scores, masks)
    if not m.any() or m.all():
        return float("nan")
    return _auroc_from(*_sums_per_score(s, m))


def image_auroc(image_scores: Sequence[float], labels: Sequence[Union[int, bool]]) -> float:
    """ROC AUC of per-image anomaly scores against image labels (1/True = defective)."""
    s = np.asarray(image_scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise InputError(f"{s.size} image scores but {y.size} labels")
    if not np.all(np.isfinite(s)):
        raise InputError("image scores contain NaN or infinite values")
    if not y.any() or y.all():
        return float("nan")
    return float(roc_auc_score(y, s))


def _partial_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` (``x`` non-decreasing, starting at 0) up to ``x_max``.

    Like MVTec's reference ``trapezoid``: the curve is linearly interpolated at ``x_max``
    between the last point at or before it and the first point after it.
    """
    i = int(np.searchsorted(x, x_max, side="right"))
    if i < len(x):
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        x = np.append(x[:i], x_max)
        y = np.append(y[:i], y_at)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)


def _region_weights(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, int]:
    """Per pooled pixel 1 / |its ground-truth region| (0 for normal pixels), and the number of
    regions: regions are each image's 8-connected components, as MVTec AD's AU-PRO counts them."""
    parts, n_regions = [], 0
    for i, (s, m) in enumerate(pairs):
        if s.ndim != 2:
            raise InputError(f"image {i}: AU-PRO needs 2-D maps, got shape {s.shape}")
        labeled, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
        flat = labeled.ravel()
        inv_size = np.zeros(n + 1)
        if n:
            inv_size[1:] = 1.0 / np.bincount(flat, minlength=n + 1)[1:]
        parts.append(inv_size[flat])
        n_regions += n
    return (np.concatenate(parts) if parts else np.zeros(0)), n_regions


def _pro_from(counts: np.ndarray, positives: np.ndarray, covered: np.ndarray,
              n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve ``(fpr, pro)`` from per-score counts and summed region weights (highest
    score first): one point per distinct score, starting at (0, 0). Each pixel carries
    1/|its region|, so the cumulative sum over the number of regions is the mean covered
    fraction over regions at every threshold."""
    negatives = counts - positives
    # Clipping removes float round-off above 1 in the cumulative sums.
    fpr = np.concatenate(([0.0], np.minimum(np.cumsum(negatives, dtype=np.float64) / negatives.sum(), 1.0)))
    pro = np.concatenate(([0.0], np.minimum(np.cumsum(covered) / n_regions, 1.0)))
    return fpr, pro


def pro_curve(scores: MapsLike, masks: MapsLike) -> tuple[np.ndarray, np.ndarray, int]:
    """The exact PRO curve over all thresholds: ``(fpr, pro, n_regions)``, starting at (0, 0).

    One point per distinct score (threshold ``score >= t``), from the highest score down.
    Empty arrays when there is no region or no normal pixel.
    """
    pairs = _as_pairs(scores, masks)
    weight, n_regions = _region_weights(pairs)
    if not pairs:
        return np.zeros(0), np.zeros(0), 0
    s, m = _pooled_pairs(pairs)
    if n_regions == 0 or m.all():
        return np.zeros(0), np.zeros(0), n_regions
    fpr, pro = _pro_from(*_sums_per_score(s, m, weight=weight), n_regions)
    return fpr, pro, n_regions


def aupro(scores: MapsLike, masks: MapsLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's official AU-PRO).

    Regions are the 8-connected components of each image's mask; PRO at a threshold is the
    mean over all regions of all images of the fraction of the region at or above it; FPR is
    over all normal pixels. Exact (every distinct score is a threshold) and vectorised.
    NaN when there is no region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise InputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro, _ = pro_curve(scores, masks)
    return _aupro_of(fpr, pro, fpr_limit)


def _aupro_of(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    if fpr.size == 0:
        return float("nan")
    return _partial_trapezoid(fpr, pro, fpr_limit) / fpr_limit


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    p, g = _as_mask(pred), _as_mask(gt)
    if p.shape != g.shape:
        raise InputError(f"prediction shape {p.shape} != ground-truth shape {g.shape}")
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def noc(ious_per_click: Sequence[float], target: float, max_clicks: int = 20) -> int:
    """Number of clicks to reach ``target`` IoU: 1-based index of the first click with
    IoU >= target among the first ``max_clicks``, else ``max_clicks`` (NoC@tau)."""
    for k, value in enumerate(list(ious_per_click)[:max_clicks], start=1):
        if value >= target:
            return k
    return max_clicks


def mean_iou_at(ious_per_image_per_click: Sequence[Sequence[float]], k: int) -> float:
    """Mean over images of the IoU after ``k`` clicks (mIoU@k).

    An image whose list is shorter than ``k`` stopped early (nothing left to click on), so
    its last IoU stands. NaN for no images.
    """
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    values = []
    for i, ious in enumerate(ious_per_image_per_click):
        ious = list(ious)
        if not ious:
            raise InputError(f"image {i} has no IoU values")
        values.append(float(ious[min(k, len(ious)) - 1]))
    return float(np.mean(values)) if values else float("nan")


def best_f1_threshold(scores: MapsLike, masks: MapsLike) -> tuple[float, float]:
    """(threshold, F1) maximising pixel F1 of ``score >= threshold`` over the pooled pixels.

    Ties keep the lowest such threshold; (0.5, 0.0) when there is no positive pixel."""
    s, m = _pooled(scores, masks)
    if not m.any():
        return 0.5, 0.0
    precision, recall, thresholds = precision_recall_curve(m, s)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    i = int(np.argmax(f1))
    return float(thresholds[i]), float(f1[i])


def segmentation_report(scores: MapsLike, masks: MapsLike) -> dict[str, float]:
    """The usual bundle for evaluation commands: ``{"ap", "aupro", "pixel_auroc"}``, from one
    grouping of the pooled pixels by score."""
    pairs = _as_pairs(scores, masks)
    weight, n_regions = _region_weights(pairs)
    s, m = _pooled_pairs(pairs)
    if not m.any():
        return {"ap": float("nan"), "aupro": float("nan"), "pixel_auroc": float("nan")}
    counts, positives, covered = _sums_per_score(s, m, weight=weight)
    if m.all():
        return {"ap": _ap_from(counts, positives), "aupro": float("nan"), "pixel_auroc": float("nan")}
    return {
        "ap": _ap_from(counts, positives),
        "aupro": _aupro_of(*_pro_from(counts, positives, covered, n_regions), 0.3),
        "pixel_auroc": _auroc_from(counts, positives),
    }
