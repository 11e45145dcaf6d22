"""Label Studio JSON <-> core types. No model maths here.

* ``parse_label_config``: finds the Image tag, the smart KeyPointLabels tag (clicks), the
  BrushLabels tag (masks) and optional RectangleLabels / Choices (weak labels, OK/NG verdict),
  all by their role, never by a hard-coded name.
* ``context_clicks``: the interactive context (KeyPoints in percent of the image) -> ``Click``s in
  pixels of the original image, in click order; a point without ``is_positive`` is positive.
* ``mask_to_result``: a boolean mask -> a ``brushlabels`` result item (RLE) with the config's
  ``from_name``/``to_name`` and the real image size.
* ``decode_image``: image bytes -> HxWx3 uint8 RGB with EXIF orientation applied (the size the
  browser shows, hence the size percent coordinates refer to).
"""
from __future__ import annotations

import io
import logging
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from label_studio_sdk.converter.brush import mask2rle  # ~1.5 s import: paid at start, not per click
from PIL import Image, ImageOps, UnidentifiedImageError

from adclick_core.inference.clicks import Click

from .budget import charge_pixels
from .errors import BadRequest, TooLarge

# Bounds on what one request may make the backend decode (each a clear 4xx when passed).
MAX_CLICKS = int(float(os.environ.get("ADCLICK_MAX_CLICKS", "100")))
MAX_IMAGE_PIXELS = int(float(os.environ.get("ADCLICK_MAX_IMAGE_PIXELS", "50e6")))
# A 8 x 6,000,000 image is under the pixel bound yet costs minutes in every step sized by its long side.
MAX_IMAGE_SIDE = int(float(os.environ.get("ADCLICK_MAX_IMAGE_SIDE", "30000")))
MAX_IMAGE_ASPECT = float(os.environ.get("ADCLICK_MAX_IMAGE_ASPECT", "20"))
# A label config is a few kB with a handful of defect types; these bound the work of parsing one.
MAX_CONFIG_CHARS = 200_000
MAX_LABELS = 1000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's decompression-bomb guard stays on, at our bound

logger = logging.getLogger(__name__)

__all__ = [
    "TagInfo",
    "LabelConfig",
    "parse_label_config",
    "ContextClicks",
    "context_clicks",
    "brush_label_for",
    "mask_to_result",
    "decode_image",
    "image_size",
    "verdict_of",
    "has_brush_mask",
    "first_image_url",
    "OK_CHOICE_NAMES",
    "TaskLabels",
    "latest_annotation",
    "task_labels",
    "decode_brush",
    "seg_items_of",
]

#: Choice values that mean "defect-free" (case-insensitive) when the config has a Choices tag.
OK_CHOICE_NAMES = ("ok", "good", "normal", "defect-free", "defect free", "no defect", "pass")
#: Choice values that mean "defective".
NG_CHOICE_NAMES = ("ng", "bad", "defect", "defective", "anomaly", "anomalous", "fail", "not ok")


@dataclass(frozen=True)
class TagInfo:
    """One control tag of the label config."""

    name: str
    to_name: str
    labels: tuple[str, ...]
    smart: bool = False


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs to know about a project's label config."""

    image_name: str  # <Image name=...>, the to_name of every result
    data_key: str  # task["data"][data_key] holds the image URL (<Image value="$data_key">)
    keypoint: TagInfo  # smart KeyPointLabels: the clicks
    brush: TagInfo  # BrushLabels: the masks we answer with
    rectangle: TagInfo | None = None  # optional weak boxes
    choices: TagInfo | None = None  # optional OK/NG verdict
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok_choices(self) -> tuple[str, ...]:
        if self.choices is None:
            return ()
        return tuple(c for c in self.choices.labels if c.strip().lower() in OK_CHOICE_NAMES)

    @property
    def defect_types(self) -> tuple[str, ...]:
        return self.brush.labels


def _truthy(v: str | None) -> bool:
    return v is not None and v.strip().lower() in ("true", "1", "yes")


def _labels(tag: ET.Element, child: str) -> tuple[str, ...]:
    out = []
    for el in tag.iter():
        if el.tag.lower() == child and el.get("value") is not None:
            out.append(el.get("value"))
    return tuple(out)


def _to_names(tag: ET.Element) -> list[str]:
    return [t.strip() for t in (tag.get("toName") or "").split(",") if t.strip()]


def parse_label_config(xml: str | None) -> LabelConfig:
    """Parse a Label Studio label config; raise ``BadRequest`` with a clear message when it lacks
    a KeyPointLabels -> Image or BrushLabels -> Image pair."""
    if not xml or not isinstance(xml, str) or not xml.strip():
        raise BadRequest("the label config is empty: send the project's label config (XML)")
    if len(xml) > MAX_CONFIG_CHARS:
        raise BadRequest(f"the label config is {len(xml)} characters long; at most {MAX_CONFIG_CHARS}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise BadRequest(f"the label config is not valid XML: {e}") from None

    images: dict[str, str] = {}
    by_kind: dict[str, list[ET.Element]] = {}
    for el in root.iter():
        kind = el.tag.lower()
        if kind == "image" and el.get("name"):
            images[el.get("name")] = el.get("value") or ""
        elif kind in ("keypointlabels", "brushlabels", "rectanglelabels", "choices"):
            by_kind.setdefault(kind, []).append(el)

    example = (
        '<Image name="image" value="$image"/> '
        '<BrushLabels name="defect" toName="image"><Label value="crack"/></BrushLabels> '
        '<KeyPointLabels name="click" toName="image" smart="true"><Label value="crack" smart="true"/>'
        "</KeyPointLabels>"
    )
    if not images:
        raise BadRequest(f"the label config has no <Image> tag; ADClick needs e.g. {example}")

    def targets_image(tag: ET.Element) -> str | None:
        for t in _to_names(tag):
            if t in images:
                return t
        return None

    kps = [t for t in by_kind.get("keypointlabels", []) if targets_image(t)]
    brushes = [t for t in by_kind.get("brushlabels", []) if targets_image(t)]
    if not kps:
        raise BadRequest(
            "the label config has no <KeyPointLabels> tag pointing at an <Image> (toName): "
            f"ADClick needs smart KeyPoint clicks, e.g. {example}"
        )
    if not brushes:
        raise BadRequest(
            "the label config has no <BrushLabels> tag pointing at an <Image> (toName): "
            f"ADClick answers clicks with brush masks, e.g. {example}"
        )

    def is_smart(tag: ET.Element) -> bool:
        if _truthy(tag.get("smart")) or _truthy(tag.get("smartOnly")):
            return True
        return any(_truthy(el.get("smart")) for el in tag.iter() if el.tag.lower() == "label")

    warnings: list[str] = []
    smart = [t for t in kps if is_smart(t)]
    chosen: tuple[ET.Element, ET.Element] | None = None
    for kp in smart + [t for t in kps if t not in smart]:
        img = targets_image(kp)
        for br in brushes:
            if targets_image(br) == img:
                chosen = (kp, br)
                break
        if chosen:
            break
    if chosen is None:
        raise BadRequest(
            "the label config's <KeyPointLabels> and <BrushLabels> point at different images; "
            "both need the same toName (the <Image> name)"
        )
    kp, br = chosen
    img = targets_image(kp)
    if not is_smart(kp):
        warnings.append(
            f'<KeyPointLabels name="{kp.get("name")}"> is not smart="true": Label Studio only sends '
            "smart KeyPoints to the ML backend, so clicks will never reach ADClick"
        )
    kp_labels = _labels(kp, "label")
    br_labels = _labels(br, "label")
    if not kp_labels:
        raise BadRequest(f'<KeyPointLabels name="{kp.get("name")}"> has no <Label value="..."/>')
    if not br_labels:
        raise BadRequest(f'<BrushLabels name="{br.get("name")}"> has no <Label value="..."/>')
    for tag, labels in ((kp, kp_labels), (br, br_labels)):
        if len(labels) > MAX_LABELS:
            raise BadRequest(f'<{tag.tag} name="{tag.get("name")}"> has {len(labels)} labels; at most {MAX_LABELS}')
    brush_names = {b.lower() for b in br_labels}
    unmatched = [l for l in kp_labels if l.lower() not in brush_names]
    if unmatched and len(br_labels) > 1:
        warnings.append(
            f"KeyPoint label(s) {unmatched} have no BrushLabels label of the same name: their masks "
            f'are labelled "{br_labels[0]}"'
        )

    value = images[img]
    if not value.startswith("$") or len(value) < 2:
        raise BadRequest(
            f'<Image name="{img}"> has value="{value}": ADClick needs the image URL from the task '
            'data, e.g. value="$image"'
        )

    rect = next((t for t in by_kind.get("rectanglelabels", []) if targets_image(t) == img), None)
    choices_tags = by_kind.get("choices", [])
    choice = next((t for t in choices_tags if (t.get("name") or "").lower() == "verdict"), None)
    if choice is None:
        choice = next(
            (
                t
                for t in choices_tags
                if any(c.strip().lower() in OK_CHOICE_NAMES for c in _labels(t, "choice"))
            ),
            None,
        )

    return LabelConfig(
        image_name=img,
        data_key=value[1:],
        keypoint=TagInfo(kp.get("name"), img, kp_labels, is_smart(kp)),
        brush=TagInfo(br.get("name"), img, br_labels),
        rectangle=(
            TagInfo(rect.get("name"), img, _labels(rect, "label")) if rect is not None else None
        ),
        choices=(
            TagInfo(choice.get("name"), _to_names(choice)[0] if _to_names(choice) else img,
                    _labels(choice, "choice"))
            if choice is not None
            else None
        ),
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------- clicks


@dataclass(frozen=True)
class ContextClicks:
    clicks: list[Click]
    label: str  # the KeyPoint label of this click history (selects the defect type)


def _as_bool(v: Any) -> bool:
    if v is None:
        return True  # a point restored from a draft has no is_positive: it was a positive click
    if isinstance(v, str):
        return v.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(v)


def _percent(value: dict, key: str, idx: int) -> float:
    v = value.get(key)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise BadRequest(f"click #{idx + 1}: value.{key} must be a number (percent), got {v!r}") from None
    if not math.isfinite(f):
        raise BadRequest(f"click #{idx + 1}: value.{key} is not finite")
    return f


def context_clicks(context: Any, cfg: LabelConfig, width: int | None, height: int | None) -> ContextClicks:
    """Turn ``params.context`` into pixel clicks on the original (EXIF-oriented) image.

    Label Studio sends every smart KeyPoint of the clicked label each time, oldest first, so the
    list is the whole click history. If several labels are present, the label of the newest point
    wins and only its points are used (one object per label). With ``width``/``height`` None the
    context is only validated (cheap check before the image is fetched); clicks keep percents.
    """
    if not isinstance(context, dict):
        raise BadRequest("params.context must be an object with a 'result' list of KeyPoints")
    result = context.get("result")
    if not isinstance(result, list):
        raise BadRequest("params.context.result must be a list of KeyPoint regions")
    points = []
    for item in result:
        if not isinstance(item, dict):
            raise BadRequest("params.context.result items must be objects")
        typ = str(item.get("type", "")).lower()
        if typ != "keypointlabels":
            continue
        if item.get("from_name") not in (None, cfg.keypoint.name):
            continue
        points.append(item)
    if not points:
        raise BadRequest(
            f'empty context: no KeyPoint click from "{cfg.keypoint.name}" in params.context.result; '
            "select the smart KeyPoint label, then click the image (Alt+click = negative)"
        )

    def label_of(item: dict) -> str:
        value = item.get("value")
        labels = (value.get("keypointlabels") if isinstance(value, dict) else None) or []
        return str(labels[0]) if isinstance(labels, list) and labels else cfg.keypoint.labels[0]

    if len(points) > MAX_CLICKS:
        raise BadRequest(f"{len(points)} clicks in one request, above ADCLICK_MAX_CLICKS ({MAX_CLICKS})")
    label = label_of(points[-1])
    clicks: list[Click] = []
    for idx, item in enumerate(points):
        if label_of(item) != label:
            continue
        value = item.get("value")
        if not isinstance(value, dict):
            raise BadRequest(f"click #{idx + 1}: 'value' must be an object with x and y in percent")
        x = _percent(value, "x", idx)
        y = _percent(value, "y", idx)
        if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
            raise BadRequest(
                f"click #{idx + 1} at x={x:.2f}%, y={y:.2f}% is outside the image "
                "(coordinates must be within 0-100 %)"
            )
        if width is None or height is None:
            clicks.append(Click(x, y, _as_bool(item.get("is_positive"))))
            continue
        if item.get("image_rotation"):
            logger.warning("click #%d: image_rotation=%s is ignored", idx + 1, item.get("image_rotation"))
        ow, oh = item.get("original_width"), item.get("original_height")
        if isinstance(ow, (int, float)) and isinstance(oh, (int, float)) and ow and oh:
            if (ow, oh) != (width, height):
                logger.info(
                    "click #%d: Label Studio saw the image as %sx%s, the backend decodes %dx%d "
                    "(percent coordinates are used, so the click stays in place)",
                    idx + 1, ow, oh, width, height,
                )
        # Percent of the image -> pixels of the original image. Label Studio's percent is a
        # continuous position (0 = left edge of pixel 0, 100 = right edge of the last pixel); Click
        # uses pixel centres at integers (x = column index), hence the half-pixel shift.
        px = min(max(x * width / 100.0 - 0.5, 0.0), width - 1.0)
        py = min(max(y * height / 100.0 - 0.5, 0.0), height - 1.0)
        clicks.append(Click(px, py, _as_bool(item.get("is_positive"))))
    return ContextClicks(clicks, label)


def brush_label_for(keypoint_label: str, cfg: LabelConfig) -> str:
    """The BrushLabels label with the KeyPoint label's name (case-insensitive), else the first."""
    for b in cfg.brush.labels:
        if b == keypoint_label:
            return b
    for b in cfg.brush.labels:
        if b.lower() == keypoint_label.lower():
            return b
    return cfg.brush.labels[0]


# ---------------------------------------------------------------- masks


def mask_to_result(
    mask: np.ndarray, cfg: LabelConfig, label: str, score: float, width: int, height: int,
    region_id: str | None = None,
) -> dict:
    """A boolean (or 0/1, 0/255) HxW mask -> one ``brushlabels`` result item (format rle)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if m.shape != (height, width):
        raise ValueError(f"mask shape {m.shape} differs from the image size {(height, width)}")
    m8 = np.where(m > (127 if m.dtype == np.uint8 else 0), 255, 0).astype(np.uint8)
    item = {
        "from_name": cfg.brush.name,
        "to_name": cfg.image_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": float(score),
        "readonly": False,
        "value": {"format": "rle", "rle": [int(v) for v in mask2rle(m8)], "brushlabels": [label]},
    }
    if region_id:
        item["id"] = region_id
    return item


# ---------------------------------------------------------------- images


def _open(data: bytes, load: bool = True) -> Image.Image:
    if not data:
        raise BadRequest("the image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise TooLarge(f"the image is too large: {e} (ADCLICK_MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadRequest(f"the image is corrupt or not a supported format: {e}") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise TooLarge(f"the image is {w}x{h} = {w * h:,} pixels, above ADCLICK_MAX_IMAGE_PIXELS "
                       f"({MAX_IMAGE_PIXELS:,})")
    if max(w, h) > MAX_IMAGE_SIDE:
        raise TooLarge(f"the image is {w}x{h}: a side above ADCLICK_MAX_IMAGE_SIDE ({MAX_IMAGE_SIDE:,} px)")
    if max(w, h) > MAX_IMAGE_ASPECT * min(w, h):
        raise TooLarge(f"the image is {w}x{h}: longer than ADCLICK_MAX_IMAGE_ASPECT ({MAX_IMAGE_ASPECT:g}) "
                       "times its width")
    if not load:
        return im
    charge_pixels(w * h)
    try:
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"the image is corrupt or not a supported format: {e}") from None


def check_image(data: bytes) -> None:
    """The bounds on an image's format and size, from its header alone (no pixel decoded): what a
    request checks before it starts any other work for the image."""
    _open(data, load=False)


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB, EXIF orientation applied (what the browser shows)."""
    im = _open(data)
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            hi = float(arr.max()) or 1.0
            im = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise BadRequest(f"the image is corrupt or not a supported format: {e}") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadRequest(f"the image has an unusable shape {arr.shape}")
    return np.ascontiguousarray(arr)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without decoding pixels twice."""
    im = _open(data)
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF = no rotation, as the browser does
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# ---------------------------------------------------------------- verdicts


def has_brush_mask(results: Iterable[dict], cfg: LabelConfig) -> bool:
    """Whether an annotation's result list holds a brush region of the config's BrushLabels tag."""
    return any(isinstance(r, dict) and r.get("type") == "brushlabels" and r.get("from_name") in (None, cfg.brush.name)
               for r in results or [])


def verdict_of(results: Iterable[dict], cfg: LabelConfig) -> str | None:
    """'OK' / 'NG' from an annotation's result list (the config's Choices tag), else None.

    Without a Choices tag (or with no choice made) an annotation whose result has no region at
    all is not taken as OK: an empty annotation may simply be unfinished.
    """
    if cfg.choices is None:
        return None
    verdict = None
    for r in results or []:
        if not isinstance(r, dict) or r.get("type") != "choices":
            continue
        if r.get("from_name") not in (None, cfg.choices.name):
            continue
        vals = [str(v).strip().lower() for v in (r.get("value") or {}).get("choices") or []]
        if any(v in OK_CHOICE_NAMES for v in vals):
            verdict = "OK"
        elif any(v in NG_CHOICE_NAMES for v in vals):
            verdict = "NG"
    return verdict


def first_image_url(task: dict, cfg: LabelConfig) -> str:
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict):
        raise BadRequest("each task needs a 'data' object")
    url = data.get(cfg.data_key)
    if not isinstance(url, str) or not url.strip():
        raise BadRequest(
            f"task {task.get('id')} has no image URL in data.{cfg.data_key} "
            f'(the <Image name="{cfg.image_name}"> value)'
        )
    return url.strip()



# ---------------------------------------------------------------- training data (ADClick-Seg)


@dataclass
class TaskLabels:
    """The usable labels of one annotated task, before its image is downloaded.

    ``masks``: defect type -> list of RLE brush items (decoded once the image size is known);
    ``boxes``: defect type -> list of (x, y, w, h) in percent; ``tag``: "OK" / "NG" / None.
    """

    task: dict
    masks: dict[str, list[dict]] = field(default_factory=dict)
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    tag: str | None = None
    #: defect type -> the smart KeyPoints of that type, for labels whose brush regions are unedited
    #: ADClick suggestions (``origin: "prediction"``): their masks came from these clicks.
    clicks: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.masks and not self.boxes and self.tag is None


def latest_annotation(task: dict) -> dict | None:
    """The task's newest non-cancelled annotation (by update time, then id)."""
    anns = [a for a in (task.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")]
    if not anns:
        return None
    anns.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
    return anns[-1]


def _defect_label(labels: list, cfg: LabelConfig) -> str | None:
    if not labels:
        return None
    return brush_label_for(str(labels[0]), cfg)


def task_labels(task: dict, cfg: LabelConfig) -> tuple[TaskLabels | None, str]:
    """Read the training labels of one exported task (its latest annotation): BrushLabels RLE masks
    per defect label, RectangleLabels boxes per label, the Choices verdict (OK / NG).
    Returns (labels, "") or (None, why the task is not usable)."""
    if not isinstance(task, dict):
        return None, "not a task object"
    ann = latest_annotation(task)
    if ann is None:
        return None, "no finished (non-cancelled) annotation"
    out = TaskLabels(task)
    points: dict[str, list[dict]] = {}
    for r in ann.get("result") or []:
        if not isinstance(r, dict):
            continue
        typ = str(r.get("type", "")).lower()
        value = r.get("value") if isinstance(r.get("value"), dict) else {}
        if typ == "brushlabels" and r.get("from_name") in (None, cfg.brush.name):
            label = _defect_label(value.get("brushlabels") or [], cfg)
            if value.get("format", "rle") != "rle" or not value.get("rle"):
                logger.info("task %s: a brush region without RLE is ignored", task.get("id"))
                continue
            out.masks.setdefault(label or cfg.defect_types[0], []).append(r)
        elif typ == "keypointlabels" and r.get("from_name") in (None, cfg.keypoint.name):
            label = _defect_label(value.get("keypointlabels") or [], cfg)
            points.setdefault(label or cfg.defect_types[0], []).append(r)
        elif typ == "rectanglelabels" and cfg.rectangle is not None and r.get("from_name") in (None, cfg.rectangle.name):
            try:
                box = tuple(float(value[k]) for k in ("x", "y", "width", "height"))
            except (KeyError, TypeError, ValueError):
                logger.info("task %s: a rectangle without x/y/width/height is ignored", task.get("id"))
                continue
            if box[2] <= 0 or box[3] <= 0:
                continue
            label = _defect_label(value.get("rectanglelabels") or [], cfg)
            out.boxes.setdefault(label or cfg.defect_types[0], []).append(box)  # type: ignore[arg-type]
    out.tag = verdict_of(ann.get("result") or [], cfg)
    # Label Studio marks each region's origin: "manual" (painted), "prediction" (an accepted
    # suggestion, unedited), "prediction-changed" (edited after accepting). An unedited suggestion
    # next to the smart clicks of the same label is an ADClick answer to those clicks.
    for label, regions in out.masks.items():
        if label in points and all(r.get("origin") == "prediction" for r in regions):
            out.clicks[label] = points[label]
    if out.empty:
        return None, "the latest annotation has no brush mask, rectangle or OK/NG verdict"
    return out, ""


def decode_brush(item: dict, width: int, height: int) -> np.ndarray:
    """One brushlabels RLE result -> H x W bool mask at the image size (resized if Label Studio saw
    another size)."""
    from label_studio_sdk.converter.brush import decode_rle

    value = item.get("value") or {}
    ow, oh = item.get("original_width"), item.get("original_height")
    ow = int(ow) if isinstance(ow, (int, float)) and 0 < ow < 1e6 else width
    oh = int(oh) if isinstance(oh, (int, float)) and 0 < oh < 1e6 else height
    if ow * oh > min(MAX_IMAGE_PIXELS, 4 * width * height):
        raise ValueError(f"the brush mask claims {ow}x{oh} pixels for a {width}x{height} image")
    rle = value.get("rle") if isinstance(value, dict) else None
    if not isinstance(rle, list) or len(rle) < 4 or not all(isinstance(b, int) and 0 <= b < 256 for b in rle):
        raise ValueError("the brush mask has no RLE byte list")
    # The RLE's first 32 bits say how many values it decodes to: checked before decoding, so a
    # small annotation cannot make the decoder expand to hundreds of MB.
    declared = int.from_bytes(bytes(rle[:4]), "big")
    if declared != ow * oh * 4:
        raise ValueError(f"the RLE declares {declared} values, not {ow}x{oh}x4")
    flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    if flat.size != ow * oh * 4:
        raise ValueError(f"the RLE holds {flat.size} values, not {ow}x{oh}x4")
    mask = flat.reshape(oh, ow, 4)[:, :, 3] > 127
    if (ow, oh) != (width, height):
        im = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        mask = np.asarray(im) > 127
    return mask


def seg_items_of(labels: TaskLabels, image: np.ndarray, click_prob=None) -> list:
    """``TaskLabels`` + the decoded image -> ``SegItem``s (original pixels): one item per defect
    type with its exact mask and/or boxes; an OK / NG verdict without regions -> one tag item.

    A brush mask is an exact mask, except an unedited ADClick suggestion with its clicks
    (``labels.clicks``) when ``click_prob(image, clicks, defect_type) -> H x W probabilities`` is
    given: that item carries ``click_prob`` + ``clicks`` (pixels) instead, so training treats the
    uncertain band of the click answer as such.
    """
    from adclick_core.training.seg import SegItem

    h, w = image.shape[:2]
    items = []
    for label in sorted(set(labels.masks) | set(labels.boxes)):
        mask = None
        if label in labels.masks:
            mask = np.zeros((h, w), bool)
            for r in labels.masks[label]:
                mask |= decode_brush(r, w, h)
        boxes = []
        for x, y, bw, bh in labels.boxes.get(label, []):
            x0, y0 = max(0.0, x * w / 100.0), max(0.0, y * h / 100.0)
            x1, y1 = min(float(w), (x + bw) * w / 100.0), min(float(h), (y + bh) * h / 100.0)
            if x1 > x0 and y1 > y0:
                boxes.append((x0, y0, x1, y1))
        if mask is None and not boxes:
            continue
        tag = "NG" if labels.tag == "NG" else None
        if mask is not None and click_prob is not None and label in labels.clicks:
            try:
                clicks = context_clicks({"result": labels.clicks[label]}, _any_cfg(labels.clicks[label]), w, h).clicks
                prob = np.asarray(click_prob(image, clicks, label), dtype=np.float32)
                if prob.shape != (h, w):
                    raise ValueError(f"click map of shape {prob.shape} for a {h}x{w} image")
                items.append(SegItem(image=image, defect_type=label, click_prob=prob, clicks=tuple(clicks),
                                     boxes=tuple(boxes), tag=tag))
                continue
            except (BadRequest, ValueError) as e:
                logger.warning("task %s: the clicks of %r cannot be replayed (%s): using the mask as exact",
                               labels.task.get("id"), label, getattr(e, "message", e))
        items.append(SegItem(image=image, defect_type=label, mask=mask, boxes=tuple(boxes), tag=tag))
    if not items and labels.tag in ("OK", "NG"):
        items.append(SegItem(image=image, defect_type=None, tag=labels.tag))
    return items


def _any_cfg(points: list[dict]) -> LabelConfig:
    """A minimal config for ``context_clicks`` over already selected KeyPoints."""
    name = points[0].get("from_name") or "click"
    labels = tuple({str(l) for p in points for l in ((p.get("value") or {}).get("keypointlabels") or ["defect"])})
    tag = TagInfo(name, "image", labels or ("defect",), True)
    return LabelConfig("image", "image", tag, tag)
