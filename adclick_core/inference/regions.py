"""Anomaly map -> defect regions: one region per connected blob above the threshold, each with
its own confidence, so a stray blob does not share the score of a real defect (and a reviewer can
reject it alone)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["DefectRegion", "defect_regions"]


@dataclass(frozen=True)
class DefectRegion:
    mask: np.ndarray  # H x W bool
    score: float  # mean probability inside the region, in [0, 1]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def defect_regions(prob: np.ndarray, threshold: float, min_area: int = 16, max_regions: int = 20) -> list[DefectRegion]:
    """Connected components (8-connectivity) of ``prob >= threshold``, highest score first.

    Blobs smaller than ``min_area`` pixels are dropped unless nothing larger exists (a tiny
    blowhole is still a defect); at most ``max_regions`` are kept."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"expected an H x W probability map, got shape {prob.shape}")
    labels, n = ndimage.label(prob >= threshold, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(prob), labels, index)
    means = ndimage.mean(prob, labels, index)
    keep = [i for i in range(n) if areas[i] >= min_area] or [int(np.argmax(areas))]
    keep.sort(key=lambda i: -means[i])
    return [DefectRegion(labels == index[i], float(means[i])) for i in keep[:max_regions]]
