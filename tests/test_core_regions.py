"""Anomaly map -> one region per blob, each with its own score."""
from __future__ import annotations

import numpy as np
import pytest

from adclick_core.inference.regions import defect_regions


def test_two_blobs_become_two_regions_ranked_by_score():
    prob = np.zeros((40, 40), np.float32)
    prob[2:8, 2:8] = 0.6  # weak, 36 px
    prob[20:30, 20:30] = 0.9  # strong, 100 px
    prob[35, 35] = 0.95  # a 1-px speck: dropped (min_area)
    regions = defect_regions(prob, 0.5)
    assert [r.area for r in regions] == [100, 36]
    assert regions[0].score == pytest.approx(0.9) and regions[1].score == pytest.approx(0.6)
    assert not (regions[0].mask & regions[1].mask).any()


def test_diagonal_pixels_are_one_region_and_tiny_defect_is_kept_alone():
    prob = np.zeros((10, 10), np.float32)
    prob[2, 2] = prob[3, 3] = 0.8  # 8-connected
    regions = defect_regions(prob, 0.5)
    assert len(regions) == 1 and regions[0].area == 2  # smaller than min_area but the only one


def test_nothing_above_threshold_and_bad_shape():
    assert defect_regions(np.full((5, 5), 0.2), 0.5) == []
    with pytest.raises(ValueError):
        defect_regions(np.zeros((2, 2, 2)), 0.5)


def test_max_regions():
    prob = np.zeros((50, 50), np.float32)
    for i in range(5):
        prob[i * 10 : i * 10 + 5, 0:5] = 0.5 + i * 0.1
    regions = defect_regions(prob, 0.5, max_regions=3)
    assert [round(r.score, 1) for r in regions] == [0.9, 0.8, 0.7]
