"""Boxes as prompts (``adclick_core.inference.box_prompts``): click placement, leak correction, cut to the box."""
from __future__ import annotations

import numpy as np
import pytest

from adclick_core.inference.box_prompts import box_clicks_and_probability, box_prompted_item, box_region
from adclick_core.inference.clicks import Click
from adclick_core.training.seg import SegItem, item_label_kind

HW = (60, 80)


class DiskPredictor:
    """Stands in for ClickPredictor: the anomaly map is one bright spot; an answer is a disk of
    ``radius`` around each positive click minus a disk of ``radius`` around each negative one."""

    def __init__(self, spot=(30, 20), radius=12.0):
        self.spot, self.radius, self.calls, self.refinement = spot, radius, [], "default"

    def with_refinement(self, config):
        self.refinement = config  # box prompts must ask for the raw answers
        return self

    def anomaly_map(self, state):
        m = np.zeros(HW, np.float32)
        m[self.spot[1], self.spot[0]] = 1.0
        return m

    def set_image(self, image):
        return type("State", (), {"original_hw": HW})()

    def predict(self, state, clicks, prev_mask=None, defect_type=None):
        self.calls.append((list(clicks), defect_type))
        yy, xx = np.mgrid[0:HW[0], 0:HW[1]]
        out = np.zeros(HW, bool)
        for c in clicks:
            disk = (xx - c.x) ** 2 + (yy - c.y) ** 2 <= self.radius ** 2
            out = out | disk if c.positive else out & ~disk
        return out.astype(np.float32)


def test_box_region_union_and_clipping():
    r = box_region(HW, [(10, 5, 20, 15), (75, 55, 90, 70)])
    assert r[5:15, 10:20].all() and r.sum() == 100 + 5 * 5
    assert not box_region(HW, [(30, 30, 30, 40)]).any()  # empty box


def test_positive_click_at_in_box_peak_and_answer_cut_to_box():
    pred = DiskPredictor(spot=(30, 20), radius=6)
    state = pred.set_image(None)
    prob, clicks = box_clicks_and_probability(pred, state, [(22.0, 12.0, 40.0, 30.0)], "crack")
    assert clicks[0] == Click(30.0, 20.0, True)
    assert len(clicks) == 1  # the disk fits the box: nothing leaks, no negative click
    assert prob.shape == HW and prob.dtype == np.float32
    assert prob[20, 30] == 1.0 and not prob[~box_region(HW, [(22, 12, 40, 30)])].any()
    assert pred.calls[0][1] == "crack"  # the defect type reaches the click model (its prompt)
    assert pred.refinement is None  # raw answers: the box bounds the defect already


def test_peak_outside_the_box_is_not_used():
    pred = DiskPredictor(spot=(70, 50), radius=4)  # hottest pixel far outside the box
    _, clicks = box_clicks_and_probability(pred, pred.set_image(None), [(5.0, 5.0, 15.0, 15.0)])
    assert 5 <= clicks[0].x < 15 and 5 <= clicks[0].y < 15 and clicks[0].positive


def test_leaking_answer_gets_negative_clicks_outside_the_box():
    pred = DiskPredictor(spot=(30, 20), radius=15)  # the disk spills far out of a narrow box
    box = (26.0, 10.0, 34.0, 30.0)
    prob, clicks = box_clicks_and_probability(pred, pred.set_image(None), [box], max_negative=2)
    negatives = [c for c in clicks if not c.positive]
    assert 1 <= len(negatives) <= 2
    inside = box_region(HW, [box])
    assert all(not inside[int(c.y), int(c.x)] for c in negatives)
    assert not prob[~inside].any()


def test_one_positive_click_per_box():
    pred = DiskPredictor(spot=(30, 20), radius=3)
    _, clicks = box_clicks_and_probability(pred, pred.set_image(None), [(25, 15, 35, 25), (50, 40, 70, 55)])
    assert sum(c.positive for c in clicks) == 2


def test_box_prompted_item_only_changes_box_only_items():
    pred = DiskPredictor(spot=(30, 20), radius=5)
    img = np.zeros((*HW, 3), np.uint8)
    boxed = box_prompted_item(pred, SegItem(img, "crack", boxes=[(22.0, 12.0, 40.0, 30.0)]))
    assert item_label_kind(boxed) == "clicks" and boxed.click_prob.shape == HW and len(boxed.clicks) == 1
    assert boxed.boxes == [(22.0, 12.0, 40.0, 30.0)] and boxed.defect_type == "crack"
    masked = SegItem(img, "crack", mask=np.ones(HW, bool), boxes=[(0, 0, 5, 5)])
    tagged = SegItem(img, None, tag="NG")
    assert box_prompted_item(pred, masked) is masked and box_prompted_item(pred, tagged) is tagged


@pytest.mark.parametrize("box", [(0.0, 0.0, 0.0, 10.0)])
def test_empty_box_leaves_the_item_as_a_box(box):
    pred = DiskPredictor()
    item = SegItem(np.zeros((*HW, 3), np.uint8), "crack", boxes=[box])
    assert box_prompted_item(pred, item) is item
