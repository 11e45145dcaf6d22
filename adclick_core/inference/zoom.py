"""Zoom-in for the residual click model (RITM / SimpleClick "ZoomIn"), and the reference pixels it needs.

The click model sees every image as a 256 x 256 input: a 1024 x 417 spindle photo is squashed 4x
across, so a 26 px pitting becomes one or two feature cells and no model can trace it. Once the
user has clicked, the defect's neighbourhood is known: the answer is recomputed on a square crop
around the clicks and the current mask, at up to the image's own resolution (never magnified past
it), and pasted back. The residual of a crop needs the *same* crop of the reference images, so a
``ReferenceBank`` keeps each reference's pixels (``encode_source``) beside its features.

All crops live on the *canvas*: the image downscaled to a longer side of at most
``ZoomConfig.canvas_side``, the size the bank stores its references at, so query and reference
crops always have the same resolution.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from .clicks import Click

__all__ = ["ZoomConfig", "Box", "canvas_shape", "to_canvas", "zoom_box", "zoom_boxes", "clicked_parts", "relative_crop",
           "spills_over", "encode_source",
           "decode_source", "SOURCE_SIDE"]

SOURCE_SIDE = 1024  # longer side at which a bank stores reference pixels (and the default canvas)
_SOURCE_QUALITY = 95

Box = tuple[int, int, int, int]  # (y0, x0, height, width) on the canvas


@dataclass(frozen=True)
class ZoomConfig:
    """When and where the click answer is recomputed on a crop."""

    canvas_side: int = SOURCE_SIDE  # work on the image at a longer side of at most this
    expansion: float = 2.0  # crop side = this x the larger side of the box around mask and clicks
    min_side: int | None = None  # crop side at least this (canvas px; None: the model input, never magnify)
    k: int = 5  # reference crops the crop is matched against (the image's nearest references)
    # A crop covering more of the canvas than this answers on the whole image: below ~4x fewer
    # pixels the crop gains less than 2x resolution and loses the context the model was trained
    # with (on 300-500 px MTD photos, 0.6 lowered the e2e IoU after 3 clicks from 0.65 to 0.57).
    max_cover: float = 0.25
    # Where the answer's clicked part is too large to zoom on (a first answer flooding an unfamiliar
    # product), the positive clicks alone set the crop; its answer is kept unless it spills over the
    # crop's inner border (the defect is larger than the crop, and the whole-image answer stands).
    local_first: bool = True
    # A whole-image answer whose clicked part covers at most this share of the image stands as is.
    flood_fraction: float = 0.01
    spill_band: int = 2  # px along each inner edge of the crop checked for a spill
    # Share of that band in the mask that makes a spill: a defect larger than the crop crosses
    # whole edges, while a small answer's stray tongue touches only a few per cent of them.
    spill_fraction: float = 0.15
    cache: int = 4  # crop states kept per image

    def to_dict(self) -> dict:
        return asdict(self)


def canvas_shape(hw: tuple[int, int], side: int) -> tuple[int, int]:
    """The canvas size of an ``hw`` image: longer side at most ``side``, aspect kept, never enlarged."""
    h, w = hw
    scale = min(1.0, side / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def to_canvas(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` (H x W x 3 uint8) at its canvas size (antialiased); the image itself if it fits."""
    ch, cw = canvas_shape(image.shape[:2], side)
    if (ch, cw) == image.shape[:2]:
        return image
    # np.require copies only a read-only array (a decoded PIL image): torch warns on those.
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(ch, cw), mode="bilinear", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def encode_source(image: np.ndarray, side: int = SOURCE_SIDE) -> np.ndarray:
    """A reference image's pixels as stored in a bank: its canvas, JPEG-encoded (uint8 bytes).

    JPEG at quality 95 keeps a 1024 x 417 photo at ~100-200 kB (a bank of 200 references: tens of
    MB) and changes the backbone's features far less than the residuals it has to find."""
    buf = io.BytesIO()
    Image.fromarray(to_canvas(image, side)).save(buf, format="JPEG", quality=_SOURCE_QUALITY)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def decode_source(data: np.ndarray | torch.Tensor) -> np.ndarray:
    """``encode_source``'s bytes -> H x W x 3 uint8."""
    raw = data.numpy().tobytes() if isinstance(data, torch.Tensor) else np.asarray(data, np.uint8).tobytes()
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("RGB"))


def _side_ladder(side: float, base: int) -> int:
    """``side`` rounded up to base x 1.25^n: nearby requests share one crop (and its cached state)."""
    if side <= base:
        return base
    return int(math.ceil(base * 1.25 ** math.ceil(math.log(side / base, 1.25) - 1e-9)))


def zoom_box(
    region: np.ndarray | None,
    clicks: Sequence[Click],
    canvas_hw: tuple[int, int],
    config: ZoomConfig,
    input_size: int,
) -> Box | None:
    """The crop to answer on: a square around the parts of ``region`` (canvas-size bool mask of
    the current answer, or None) that a positive click touches, and the positive ``clicks``
    (canvas px); ``config.expansion`` x their larger side and at least ``config.min_side``, snapped
    to a coarse grid so that the next clicks reuse it; shifted inside the canvas and cut to it
    where the canvas is narrower. None where there is nothing to zoom on or the crop would cover
    more than ``config.max_cover`` of the canvas.

    Parts no click touches do not count: a first answer on an unfamiliar product is often
    scattered over the whole image, and its stray parts would make every crop the whole image."""
    ys = [c.y for c in clicks if c.positive]
    xs = [c.x for c in clicks if c.positive]
    if region is not None:
        region = clicked_parts(region, clicks)
    if region is not None and region.any():
        rows = np.flatnonzero(region.any(axis=1))
        cols = np.flatnonzero(region.any(axis=0))
        ys += [float(rows[0]), float(rows[-1] + 1)]
        xs += [float(cols[0]), float(cols[-1] + 1)]
    return _square_box(ys, xs, canvas_hw, config, input_size)


def _square_box(ys: Sequence[float], xs: Sequence[float], canvas_hw: tuple[int, int], config: ZoomConfig,
                input_size: int) -> Box | None:
    """``zoom_box``'s square around the points ``ys``, ``xs`` (canvas px); None as there."""
    ch, cw = canvas_hw
    if not ys:
        return None
    base = config.min_side or input_size
    side = _side_ladder(config.expansion * max(max(ys) - min(ys), max(xs) - min(xs), 1.0), base)
    h, w = min(side, ch), min(side, cw)
    if h * w > config.max_cover * ch * cw:
        return None
    step = max(1, side // 8)
    cy, cx = (min(ys) + max(ys)) / 2.0, (min(xs) + max(xs)) / 2.0
    y0 = int(np.clip(round((cy - h / 2.0) / step) * step, 0, ch - h))
    x0 = int(np.clip(round((cx - w / 2.0) / step) * step, 0, cw - w))
    return y0, x0, h, w


def zoom_boxes(
    region: np.ndarray | None,
    clicks: Sequence[Click],
    canvas_hw: tuple[int, int],
    config: ZoomConfig,
    input_size: int,
) -> list[Box] | None:
    """The crops to answer on: ``zoom_box``'s one crop where it exists; else, where the positive
    clicks lie on parts too far apart for one crop (two pits on one photo), one crop per group of
    clicks, each group the clicks that share a clicked part of ``region`` or fit one crop together.
    None where some group alone does not fit a crop.

    The single crop comes first so that one compact defect is answered exactly as before."""
    box = zoom_box(region, clicks, canvas_hw, config, input_size)
    if box is not None:
        return [box]
    positive = [c for c in clicks if c.positive]
    if len(positive) < 2:
        return None
    labels = None if region is None else ndimage.label(region, structure=np.ones((3, 3), bool))[0]
    parts = [] if labels is None else ndimage.find_objects(labels)
    touched = [set() if labels is None else _touched_labels(labels, c) for c in positive]
    # A group: its clicks and the parts they touch; clicks on one part start in one group.
    groups: list[tuple[list[Click], set[int]]] = []
    by_part: dict[int, tuple[list[Click], set[int]]] = {}
    for c, t in zip(positive, touched):
        if t:
            g = by_part.setdefault(min(t), ([], set()))
            g[0].append(c)
            g[1].update(t)
        else:
            groups.append(([c], set()))
    groups += list(by_part.values())

    def box_of(g: tuple[list[Click], set[int]]) -> Box | None:
        ys, xs = [c.y for c in g[0]], [c.x for c in g[0]]
        for label in g[1]:
            rows, cols = parts[label - 1]
            ys += [float(rows.start), float(rows.stop)]
            xs += [float(cols.start), float(cols.stop)]
        return _square_box(ys, xs, canvas_hw, config, input_size)

    merged = True
    while merged and len(groups) > 1:  # join groups that share a crop, nearest first
        merged = False
        pairs = sorted((_gap(a[0], b[0]), i, j) for i, a in enumerate(groups) for j, b in enumerate(groups) if i < j)
        for _, i, j in pairs:
            joined = (groups[i][0] + groups[j][0], groups[i][1] | groups[j][1])
            if box_of(joined) is not None:
                groups[i] = joined
                del groups[j]
                merged = True
                break
    if len(groups) < 2:
        return None
    boxes = [box_of(g) for g in groups]
    return None if any(b is None for b in boxes) else boxes  # type: ignore[return-value]


def _gap(a: Sequence[Click], b: Sequence[Click]) -> float:
    return min(math.hypot(p.x - q.x, p.y - q.y) for p in a for q in b)


def _touched_labels(labels: np.ndarray, click: Click, reach: float = 3.0) -> set[int]:
    """The labels (> 0) of ``labels`` within ``reach`` px of ``click``."""
    h, w = labels.shape
    r = int(math.ceil(reach))
    y, x = int(click.y), int(click.x)
    win = labels[max(0, y - r):min(h, y + r + 1), max(0, x - r):min(w, x + r + 1)]
    yy, xx = np.mgrid[max(0, y - r):min(h, y + r + 1), max(0, x - r):min(w, x + r + 1)]
    near = (yy - click.y) ** 2 + (xx - click.x) ** 2 <= reach * reach  # pixel (row i, column j) sits at (j, i), as in click_maps
    return {int(v) for v in np.unique(win[near]) if v}


def clicked_parts(mask: np.ndarray, clicks: Sequence[Click], reach: float = 3.0) -> np.ndarray:
    """The 8-connected parts of ``mask`` that lie within ``reach`` px of a positive click."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    touched: set[int] = set()
    for c in clicks:
        if c.positive:
            touched |= _touched_labels(labels, c, reach)
    return np.isin(labels, sorted(touched)) if touched else np.zeros_like(mask, dtype=bool)


def relative_crop(image: np.ndarray, box: Box, canvas_hw: tuple[int, int]) -> np.ndarray:
    """The part of ``image`` (any size) that ``box`` covers on a canvas of ``canvas_hw``: how a
    reference of another size is cropped at the same place as the query."""
    y0, x0, h, w = box
    ch, cw = canvas_hw
    ih, iw = image.shape[:2]
    ry0, rx0 = int(round(y0 * ih / ch)), int(round(x0 * iw / cw))
    ry1 = max(ry0 + 1, min(ih, int(round((y0 + h) * ih / ch))))
    rx1 = max(rx0 + 1, min(iw, int(round((x0 + w) * iw / cw))))
    return image[ry0:ry1, rx0:rx1]


def spills_over(mask: np.ndarray, box: Box, canvas_hw: tuple[int, int], band: int, fraction: float) -> bool:
    """Whether ``mask`` (the crop's answer, box-size bool) reaches the crop's inner border: more than
    ``fraction`` of the ``band`` px along the edges that lie inside the canvas are in the mask.
    Edges on the canvas's own border do not count: a defect may touch the image's edge."""
    y0, x0, h, w = box
    ch, cw = canvas_hw
    b = max(1, min(band, h // 2, w // 2))
    edge = np.zeros(mask.shape, bool)
    if y0 > 0:
        edge[:b] = True
    if y0 + h < ch:
        edge[-b:] = True
    if x0 > 0:
        edge[:, :b] = True
    if x0 + w < cw:
        edge[:, -b:] = True
    n = int(edge.sum())
    return n > 0 and float(mask[edge].sum()) > fraction * n
