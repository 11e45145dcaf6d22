"""Zoom-in: the crop rule (zoom.py) and ClickPredictor answering small defects on a crop."""
from __future__ import annotations

import numpy as np
import pytest

from adclick_core.features.backbone import BackboneConfig
from adclick_core.inference.clicks import Click
from adclick_core.inference.predictor import ClickPredictor
from adclick_core.features.reference import ReferenceBank
from adclick_core.features.residuals import ResidualConfig
from adclick_core.inference.zoom import (ZoomConfig, canvas_shape, clicked_parts, relative_crop, spills_over, to_canvas, zoom_box,
                                        zoom_boxes)
from tests.images import texture, write_mvtec
from tests.tiny_click import train_tiny_click

BACKBONE = BackboneConfig(input_size=64)
RESIDUAL = ResidualConfig(k=3, radius=2.0)
WIDE = (96, 384)  # a wide part: squashed 6x across into the 64 px model input


# ---------------------------------------------------------------- the crop rule


def _region(hw, box):
    m = np.zeros(hw, bool)
    m[box[0]:box[1], box[2]:box[3]] = True
    return m


def test_the_crop_is_a_square_around_mask_and_clicks_never_smaller_than_the_model_input():
    cfg = ZoomConfig()
    box = zoom_box(_region((400, 1000), (200, 210, 500, 512)), [Click(505, 204, True)], (400, 1000), cfg, 256)
    y0, x0, h, w = box
    assert h == w == 256  # 12 px of defect x 2 is less than the input: no magnification past native
    assert y0 <= 200 and y0 + h >= 210 and x0 <= 500 and x0 + w >= 512
    big = zoom_box(_region((1000, 1000), (100, 300, 100, 300)), [Click(200, 200, True)], (1000, 1000), cfg, 256)
    assert big[2] == big[3] >= 2 * 200  # expansion x the box's larger side


def test_nearby_answers_share_one_crop_and_a_negative_click_does_not_move_it():
    cfg = ZoomConfig()
    hw = (400, 1000)
    a = zoom_box(_region(hw, (200, 210, 500, 512)), [Click(505, 204, True)], hw, cfg, 256)
    b = zoom_box(_region(hw, (199, 212, 499, 514)), [Click(505, 204, True), Click(508, 210, True)], hw, cfg, 256)
    c = zoom_box(_region(hw, (200, 210, 500, 512)), [Click(505, 204, True), Click(900, 50, False)], hw, cfg, 256)
    assert a == b == c


def test_the_crop_stays_inside_the_canvas_and_is_cut_where_the_canvas_is_narrower():
    cfg = ZoomConfig()
    y0, x0, h, w = zoom_box(None, [Click(3, 3, True)], (100, 1000), cfg, 64)
    assert (y0, x0) == (0, 0) and h == w == 64
    y0, x0, h, w = zoom_box(None, [Click(990, 50, True)], (100, 1000), cfg, 128)
    assert h == 100 and w == 128 and x0 + w == 1000 and y0 == 0


def test_no_crop_without_a_positive_click_or_when_it_would_cover_most_of_the_image():
    cfg = ZoomConfig()
    assert zoom_box(None, [Click(5, 5, False)], (100, 100), cfg, 32) is None
    assert zoom_box(None, [Click(50, 50, True)], (300, 300), cfg, 256) is None  # 256^2 > 0.25 x 300^2
    # A 470 x 369 tile gains less than 2x resolution from a 256 crop: whole image; a 1024 x 417 spindle zooms.
    assert zoom_box(None, [Click(200, 200, True)], (369, 470), cfg, 256) is None
    assert zoom_box(None, [Click(500, 200, True)], (417, 1024), cfg, 256) is not None
    assert zoom_box(_region((1000, 1000), (0, 900, 0, 900)), [Click(1, 1, True)], (1000, 1000), cfg, 256) is None


def test_parts_of_the_answer_no_click_touches_do_not_widen_the_crop():
    hw = (400, 1000)
    answer = _region(hw, (200, 210, 500, 512)) | _region(hw, (20, 60, 20, 60)) | _region(hw, (300, 390, 900, 990))
    clicks = [Click(505, 204, True), Click(40, 40, False)]  # a negative click on a stray part
    assert np.array_equal(clicked_parts(answer, clicks), _region(hw, (200, 210, 500, 512)))
    assert zoom_box(answer, clicks, hw, ZoomConfig(), 256) == zoom_box(_region(hw, (200, 210, 500, 512)), clicks, hw,
                                                                      ZoomConfig(), 256)
    near = clicked_parts(_region(hw, (200, 210, 500, 512)), [Click(513.5, 205, True)])  # 2.5 px from column 511
    assert near.sum() == 120 and not clicked_parts(answer, [Click(530, 205, True)]).any()


def test_clicks_on_two_parts_too_far_apart_for_one_crop_get_one_crop_each():
    cfg, hw = ZoomConfig(), (417, 1024)
    pits = _region(hw, (190, 230, 380, 420)) | _region(hw, (150, 180, 600, 640))
    clicks = [Click(400, 210, True), Click(620, 165, True), Click(630, 175, True)]
    assert zoom_box(pits, clicks, hw, cfg, 256) is None  # 260 px apart: one crop would be most of the image
    a, b = zoom_boxes(pits, clicks, hw, cfg, 256)
    for (y0, x0, h, w), (px, py) in zip((a, b), ((400, 210), (620, 165))):
        assert h == w == 256 and x0 <= px <= x0 + w and y0 <= py <= y0 + h
    assert not (a[1] <= 620 <= a[1] + 256 and b[1] <= 400 <= b[1] + 256)  # each crop holds one pit
    # One part (or clicks that fit one crop) keeps the single crop; a too-large part has none.
    near = [Click(400, 210, True), Click(470, 200, True)]
    assert zoom_boxes(None, near, hw, cfg, 256) == [zoom_box(None, near, hw, cfg, 256)]
    flood = _region(hw, (100, 400, 100, 900))
    assert zoom_boxes(flood, clicks, hw, cfg, 256) is None
    assert len(zoom_boxes(None, clicks, hw, cfg, 256)) == 2  # the clicks alone still split


def test_a_crop_answer_spills_only_over_edges_inside_the_canvas():
    box = (0, 100, 64, 64)  # on the canvas's top edge, inside it elsewhere
    mask = np.zeros((64, 64), bool)
    mask[0:2, 20:40] = True  # along the canvas's own top edge: a defect may touch the image's edge
    assert not spills_over(mask, box, (400, 1000), band=2, fraction=0.02)
    mask[-2:, 20:40] = True  # across the bottom edge, which lies inside the canvas
    assert spills_over(mask, box, (400, 1000), band=2, fraction=0.02)
    assert not spills_over(mask, box, (400, 1000), band=2, fraction=0.5)
    centre = np.zeros((64, 64), bool)
    centre[20:40, 20:40] = True
    assert not spills_over(centre, (100, 100, 64, 64), (400, 1000), band=2, fraction=0.0)


def test_canvas_keeps_small_images_and_shrinks_large_ones():
    small = texture(0, (50, 80))
    assert to_canvas(small, 1024) is small
    big = texture(1, (300, 1200))
    c = to_canvas(big, 600)
    assert c.shape == (150, 600, 3) == (*canvas_shape((300, 1200), 600), 3)
    assert abs(float(c.mean()) - float(big.mean())) < 2


def test_a_reference_of_another_size_is_cropped_at_the_same_place():
    ref = np.arange(200 * 400).reshape(200, 400)
    part = relative_crop(ref, (50, 100, 25, 50), (100, 200))  # canvas 100 x 200, the reference 2x larger
    assert part.shape == (50, 100) and part[0, 0] == ref[100, 200]


# ---------------------------------------------------------------- the predictor


@pytest.fixture(scope="module")
def wide_world(tmp_path_factory):
    """Wide textured parts (96 x 384) as references and a tiny click model trained on them."""
    root = write_mvtec(tmp_path_factory.mktemp("wide") / "parts", [texture(i, WIDE) for i in range(5)], {})
    ckpt = root.parent / "click.pt"
    bank = train_tiny_click(root, ckpt, BACKBONE, RESIDUAL, random_init=False, iterations=2)
    # zoom-in's own answer: the seeded boundary step after it may touch pixels around the crop
    # (tests/test_core_refinement.py)
    pred = ClickPredictor.from_checkpoint(ckpt, bank, device="cpu", residual_config=RESIDUAL).with_boundary(None)
    image = texture(40, WIDE)
    image[40:48, 200:208] = 250  # an 8 px defect: under one cell of the squashed whole image
    return pred, bank, image


SMALL = _region(WIDE, (40, 48, 200, 208))  # the previous answer: the 8 px defect itself
CLICKS = [Click(203.5, 43.5, True), Click(205.5, 45.5, True)]


def test_a_small_defect_is_answered_on_a_crop_and_nothing_outside_it(wide_world):
    pred, _, image = wide_world
    state = pred.set_image(image)
    prob = pred.predict(state, CLICKS, prev_mask=SMALL)
    assert prob.shape == WIDE and len(state.zooms) == 1
    (y0, x0, h, w), = state.zooms.keys()
    assert (h, w) == (64, 64) and x0 <= 200 and 208 <= x0 + w  # the model input size on the canvas
    outside = np.ones(WIDE, bool)
    outside[y0:y0 + h, x0:x0 + w] = False
    assert prob[outside].max() == 0.0 and prob[~outside].max() > 0.5
    whole = pred.with_zoom(None)
    assert not np.allclose(prob, whole.predict(whole.set_image(image), CLICKS, prev_mask=SMALL))


def test_two_small_defects_far_apart_are_answered_on_a_crop_each(wide_world):
    pred, _, image = wide_world
    image = image.copy()
    image[40:48, 330:338] = 250
    state = pred.set_image(image)
    two = SMALL | _region(WIDE, (40, 48, 330, 338))
    prob = pred.predict(state, [CLICKS[0], Click(333.5, 43.5, True)], prev_mask=two)
    boxes = list(state.zooms.keys())
    assert len(boxes) == 2 and all((h, w) == (64, 64) for _, _, h, w in boxes)
    inside = np.zeros(WIDE, bool)
    for y0, x0, h, w in boxes:
        inside[y0:y0 + h, x0:x0 + w] = True
    assert inside[43, 203] and inside[43, 333] and prob[~inside].max() == 0.0
    assert prob[43, 203] > 0.5 and prob[43, 333] > 0.5


def test_the_next_clicks_reuse_the_crop_state(wide_world):
    pred, _, image = wide_world
    state = pred.set_image(image)
    first = pred.predict(state, CLICKS[:1], prev_mask=SMALL)
    crop = next(iter(state.zooms.values()))
    second = pred.predict(state, CLICKS, prev_mask=np.minimum(first, SMALL))
    assert second.shape == WIDE and len(state.zooms) == 1 and next(iter(state.zooms.values())) is crop
    assert state.nbytes > crop.nbytes  # the crop counts in the image's memory


def _flooding(pred, monkeypatch, crop_answer: str):
    """``pred`` whose whole-image answers flood the image and whose crop answers are ``crop_answer``:
    "spot" (a small part under the clicks) or "flood" (the whole crop)."""
    def fake(self, state, clicks, prev, gray):
        prob = np.zeros(state.original_hw, np.float32)
        if state.original_hw == WIDE or crop_answer == "flood":
            return np.full_like(prob, 0.9)
        spot = np.zeros_like(prob)
        for c in clicks:
            spot[max(0, int(c.y) - 3):int(c.y) + 4, max(0, int(c.x) - 3):int(c.x) + 4] = 0.9
        return spot

    monkeypatch.setattr(ClickPredictor, "_answer", fake)
    return pred


def test_a_first_answer_flooding_the_image_is_answered_on_a_crop_around_the_clicks(wide_world, monkeypatch):
    pred, _, image = wide_world
    pred = _flooding(pred.with_refinement(None), monkeypatch, "spot")
    state = pred.set_image(image)
    prob = pred.predict(state, CLICKS[:1])
    (y0, x0, h, w), = state.zooms.keys()
    assert (h, w) == (64, 64) and x0 <= 203.5 <= x0 + w and y0 <= 43.5 <= y0 + h
    assert prob[43, 203] > 0.5 and (prob > 0.5).sum() < 100  # the spot, not the flood
    off = pred.with_zoom(ZoomConfig(local_first=False))
    assert (off.predict(off.set_image(image), CLICKS[:1]) > 0.5).mean() > 0.9


def test_a_crop_answer_spilling_over_the_crop_leaves_the_whole_image_answer(wide_world, monkeypatch):
    pred, _, image = wide_world
    pred = _flooding(pred.with_refinement(None), monkeypatch, "flood")
    state = pred.set_image(image)
    prob = pred.predict(state, CLICKS[:1])
    assert (prob > 0.5).mean() > 0.9  # the defect is larger than the crop: the whole answer stands


def test_a_small_whole_image_answer_stands_without_a_local_crop(wide_world):
    pred, _, image = wide_world  # this barely trained model answers a quarter of the image at first
    never = pred.with_zoom(ZoomConfig(flood_fraction=1.0))
    state = never.set_image(image)
    prob = never.predict(state, CLICKS[:1])
    whole = pred.with_zoom(None)
    np.testing.assert_array_equal(prob, whole.predict(whole.set_image(image), CLICKS[:1]))
    assert not state.zooms


def test_the_crop_residual_is_the_crop_matched_against_the_same_crop_of_the_references(wide_world):
    pred, bank, _ = wide_world
    reference = bank.source(2)  # a reference itself, as a query: its own crop matches it
    state = pred.set_image(reference)
    assert 2 in state.neighbours
    pred.predict(state, CLICKS, prev_mask=SMALL)
    crop = next(iter(state.zooms.values()))
    elsewhere = pred.set_image(texture(41, WIDE))
    pred.predict(elsewhere, CLICKS, prev_mask=SMALL)
    other = next(iter(elsewhere.zooms.values()))
    assert float(crop.distance.mean()) < 0.2 * float(other.distance.mean())


def test_a_bank_without_reference_pixels_answers_on_the_whole_image(wide_world):
    pred, bank, image = wide_world
    no_pixels = ReferenceBank(bank.backbone, bank.features, bank.descriptors, bank.names, bank.hashes)
    old = pred.with_bank(no_pixels)
    state = old.set_image(image)
    prob = old.predict(state, CLICKS, prev_mask=SMALL)
    whole = old.with_zoom(None)
    np.testing.assert_array_equal(prob, whole.predict(whole.set_image(image), CLICKS, prev_mask=SMALL))
    assert not state.zooms
