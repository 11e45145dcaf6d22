"""ml_backend.convert: label config parsing, context -> clicks, mask -> RLE, EXIF-aware decoding."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from ml_backend.convert import (
    brush_label_for,
    context_clicks,
    decode_image,
    image_size,
    mask_to_result,
    parse_label_config,
    verdict_of,
)
from ml_backend.errors import BadRequest

REPO = Path(__file__).resolve().parents[1]
DEFECTS = ("blowhole", "break", "crack", "fray", "uneven")


def kp(x, y, label="crack", positive=None, from_name="click", **extra):
    item = {
        "original_width": 200, "original_height": 100, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
        "id": f"p{x}-{y}", "from_name": from_name, "to_name": "image", "type": "keypointlabels",
    }
    if positive is not None:
        item["is_positive"] = positive
    item.update(extra)
    return item


@pytest.fixture(scope="module")
def weak_cfg():
    return parse_label_config((REPO / "label_config" / "interactive_weak.xml").read_text())


# ---------------------------------------------------------------- label config


def test_shipped_configs_parse():
    cfg = parse_label_config((REPO / "label_config" / "interactive.xml").read_text())
    assert cfg.image_name == "image" and cfg.data_key == "image"
    assert cfg.keypoint.name == "click" and cfg.keypoint.smart
    assert cfg.brush.name == "defect"
    assert cfg.brush.labels == DEFECTS and cfg.keypoint.labels == DEFECTS
    assert cfg.rectangle is None and cfg.choices is None and not cfg.warnings


def test_weak_config_has_boxes_and_verdict(weak_cfg):
    assert weak_cfg.rectangle is not None and weak_cfg.rectangle.labels == DEFECTS
    assert weak_cfg.choices is not None and weak_cfg.choices.name == "verdict"
    assert weak_cfg.ok_choices == ("OK",)


def test_names_are_read_not_hardcoded():
    xml = """<View><Image name="photo" value="$img_url"/>
      <BrushLabels name="paint" toName="photo"><Label value="scratch"/><Label value="dent"/></BrushLabels>
      <KeyPointLabels name="pts" toName="photo"><Label value="dent" smart="true"/></KeyPointLabels>
      <Choices name="quality" toName="photo"><Choice value="Good"/><Choice value="Bad"/></Choices></View>"""
    cfg = parse_label_config(xml)
    assert (cfg.image_name, cfg.data_key, cfg.keypoint.name, cfg.brush.name) == ("photo", "img_url", "pts", "paint")
    assert cfg.keypoint.smart  # smart on a Label counts
    assert cfg.choices.name == "quality" and cfg.ok_choices == ("Good",)


def test_smart_keypoint_preferred_and_same_image_pairing():
    xml = """<View><Image name="a" value="$a"/><Image name="b" value="$b"/>
      <KeyPointLabels name="plain" toName="a"><Label value="x"/></KeyPointLabels>
      <KeyPointLabels name="smartone" toName="b" smart="true"><Label value="x"/></KeyPointLabels>
      <BrushLabels name="ma" toName="a"><Label value="x"/></BrushLabels>
      <BrushLabels name="mb" toName="b"><Label value="x"/></BrushLabels></View>"""
    cfg = parse_label_config(xml)
    assert (cfg.keypoint.name, cfg.brush.name, cfg.image_name) == ("smartone", "mb", "b")


def test_not_smart_keypoints_give_a_warning():
    xml = """<View><Image name="i" value="$i"/><KeyPointLabels name="k" toName="i"><Label value="d"/></KeyPointLabels>
      <BrushLabels name="m" toName="i"><Label value="d"/></BrushLabels></View>"""
    cfg = parse_label_config(xml)
    assert any("smart" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    "xml, words",
    [
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        ('<View><Text name="t" value="$t"/></View>', "no <Image>"),
        ('<View><Image name="i" value="$i"/><BrushLabels name="m" toName="i"><Label value="d"/></BrushLabels></View>',
         "KeyPointLabels"),
        ('<View><Image name="i" value="$i"/><KeyPointLabels name="k" toName="i" smart="true"><Label value="d"/>'
         "</KeyPointLabels></View>", "BrushLabels"),
        ('<View><Image name="i" value="$i"/><Image name="j" value="$j"/><KeyPointLabels name="k" toName="i" '
         'smart="true"><Label value="d"/></KeyPointLabels><BrushLabels name="m" toName="j"><Label value="d"/>'
         "</BrushLabels></View>", "different images"),
        ('<View><Image name="i" value="$i"/><KeyPointLabels name="k" toName="other" smart="true"><Label value="d"/>'
         '</KeyPointLabels><BrushLabels name="m" toName="i"><Label value="d"/></BrushLabels></View>', "KeyPointLabels"),
        ('<View><Image name="i" value="$i"/><KeyPointLabels name="k" toName="i" smart="true"/>'
         '<BrushLabels name="m" toName="i"><Label value="d"/></BrushLabels></View>', "no <Label"),
        ('<View><Image name="i" value="https://x/y.png"/><KeyPointLabels name="k" toName="i" smart="true">'
         '<Label value="d"/></KeyPointLabels><BrushLabels name="m" toName="i"><Label value="d"/></BrushLabels></View>',
         "$image"),
    ],
)
def test_config_errors_are_clear(xml, words):
    with pytest.raises(BadRequest) as e:
        parse_label_config(xml)
    assert words in e.value.message
    assert e.value.status == 400


# ---------------------------------------------------------------- clicks


def test_percent_to_pixels_keeps_order_and_signs(weak_cfg):
    ctx = {"result": [kp(10, 20), kp(50, 50, positive=False), kp(99.5, 0, positive=True)]}
    cc = context_clicks(ctx, weak_cfg, 200, 100)
    assert cc.label == "crack"
    # percent * size / 100 is a continuous position; pixel centres are at integers (-0.5)
    assert [(c.x, c.y, c.positive) for c in cc.clicks] == [
        (pytest.approx(19.5), pytest.approx(19.5), True),
        (pytest.approx(99.5), pytest.approx(49.5), False),
        (pytest.approx(198.5), pytest.approx(0.0), True),
    ]


def test_pixel_centre_round_trip(weak_cfg):
    # what the browser sends for a click on the centre of pixel (x=7, y=3) of a 200x100 image
    cc = context_clicks({"result": [kp((7 + 0.5) / 200 * 100, (3 + 0.5) / 100 * 100)]}, weak_cfg, 200, 100)
    assert (cc.clicks[0].x, cc.clicks[0].y) == (pytest.approx(7.0), pytest.approx(3.0))


def test_missing_is_positive_means_positive(weak_cfg):
    ctx = {"result": [kp(10, 10), kp(20, 20, positive=False), kp(30, 30, positive="false"), kp(40, 40, positive="true")]}
    cc = context_clicks(ctx, weak_cfg, 100, 100)
    assert [c.positive for c in cc.clicks] == [True, False, False, True]


def test_right_and_bottom_edges_stay_inside(weak_cfg):
    cc = context_clicks({"result": [kp(100, 100)]}, weak_cfg, 200, 100)
    c = cc.clicks[0]
    assert (c.x, c.y) == (199.0, 99.0)


def test_newest_label_wins_and_other_tags_are_ignored(weak_cfg):
    ctx = {"result": [kp(10, 10, "crack"), kp(20, 20, "fray"), kp(30, 30, "fray"),
                      kp(40, 40, "fray", from_name="someone_else"),
                      {"type": "rectanglelabels", "from_name": "box", "value": {}}]}
    cc = context_clicks(ctx, weak_cfg, 100, 100)
    assert cc.label == "fray"
    assert [(c.x, c.y) for c in cc.clicks] == [(19.5, 19.5), (29.5, 29.5)]


@pytest.mark.parametrize(
    "ctx, words",
    [
        (None, "params.context"),
        ({}, "result"),
        ({"result": []}, "empty context"),
        ({"result": [{"type": "rectanglelabels", "value": {}}]}, "empty context"),
        ({"result": [kp(101, 50)]}, "outside the image"),
        ({"result": [kp(-0.1, 50)]}, "outside the image"),
        ({"result": [kp("abc", 50)]}, "must be a number"),
        ({"result": [kp(float("nan"), 50)]}, "not finite"),
        ({"result": ["nope"]}, "objects"),
    ],
)
def test_bad_contexts(weak_cfg, ctx, words):
    with pytest.raises(BadRequest) as e:
        context_clicks(ctx, weak_cfg, 100, 100)
    assert words in e.value.message


def test_brush_label_matches_by_name_else_first(weak_cfg):
    assert brush_label_for("fray", weak_cfg) == "fray"
    assert brush_label_for("FRAY", weak_cfg) == "fray"
    assert brush_label_for("scratch", weak_cfg) == "blowhole"


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_mask_rle_round_trip(weak_cfg, dtype):
    h, w = 37, 53
    rng = np.random.default_rng(0)
    mask = rng.random((h, w)) > 0.7
    m = mask.astype(dtype) * (255 if dtype is np.uint8 else 1)
    item = mask_to_result(m, weak_cfg, "crack", 0.87, w, h)
    assert item["from_name"] == "defect" and item["to_name"] == "image" and item["type"] == "brushlabels"
    assert (item["original_width"], item["original_height"]) == (w, h)
    assert item["value"]["format"] == "rle" and item["value"]["brushlabels"] == ["crack"]
    assert item["score"] == pytest.approx(0.87)
    back = decode_rle(item["value"]["rle"]).reshape(h, w, 4)[:, :, 3]
    assert np.array_equal(back > 127, mask)


def test_mask_size_must_match_the_image(weak_cfg):
    with pytest.raises(ValueError):
        mask_to_result(np.zeros((10, 20), bool), weak_cfg, "crack", 1.0, 10, 20)


# ---------------------------------------------------------------- images


def _jpeg_with_orientation(w, h, orientation):
    im = Image.new("RGB", (w, h), (10, 20, 30))
    im.paste((250, 0, 0), (0, 0, 5, 5))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_gives_the_displayed_size(orientation, size):
    data = _jpeg_with_orientation(40, 20, orientation)
    arr = decode_image(data)
    assert (arr.shape[1], arr.shape[0]) == size
    assert arr.dtype == np.uint8 and arr.shape[2] == 3
    assert image_size(data) == size


def test_exif_rotation_moves_the_pixels():
    arr = decode_image(_jpeg_with_orientation(40, 20, 6))  # rotate 90 deg clockwise for display
    # the stored top-left marker is now at the top-right
    assert arr[1, -2, 0] > 200 and arr[1, 1, 0] < 100


def test_grayscale_and_16bit_images_become_rgb():
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 32).reshape(32, 64) * 7).astype(np.uint16)).save(buf, format="PNG")
    arr = decode_image(buf.getvalue())
    assert arr.shape == (32, 64, 3) and arr.dtype == np.uint8 and arr.max() > 200


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_corrupt_images_are_bad_requests(data):
    with pytest.raises(BadRequest) as e:
        decode_image(data)
    assert e.value.status == 400


def test_truncated_jpeg_is_a_bad_request():
    data = _jpeg_with_orientation(64, 64, 1)
    with pytest.raises(BadRequest):
        decode_image(data[: len(data) // 3])


# ---------------------------------------------------------------- verdicts


def test_verdict(weak_cfg):
    ok = [{"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": ["OK"]}}]
    ng = [{"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": ["NG"]}}]
    assert verdict_of(ok, weak_cfg) == "OK"
    assert verdict_of(ng, weak_cfg) == "NG"
    assert verdict_of([], weak_cfg) is None
    other = [{"type": "choices", "from_name": "other", "value": {"choices": ["OK"]}}]
    assert verdict_of(other, weak_cfg) is None
