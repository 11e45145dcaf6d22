"""ADClick-Seg training: one entry point, ``train_seg``, for every kind of label a project has.

Labels arrive as plain Python / numpy data (:class:`SegItem`), never as Label Studio JSON:

* exact masks (human-painted)            -> targets everywhere, no abandon band
* ADClick masks + the clicks behind them -> pseudo labels: click discs (Eq. 8), tri-valued
                                            labels with a random abandon band (Eq. 9), NFL (Eq. 10)
* boxes                                  -> normal outside, unknown inside (+ "something is inside")
* OK / NG tags                           -> all normal / unknown with "a defect somewhere"
* nothing (unsupervised)                 -> synthetic anomalies on defect-free images
* the reference bank's own images        -> all normal, a share of every batch (``bank_normals``)
* other products' labelled images        -> pre-training (``others``): each product's images against
                                            its own bank, as the paper pre-trains ADClick-Seg on the
                                            other categories' real defects; ``init`` continues from
                                            such a checkpoint on the project's own labels

Unknown pixels are trained semi-supervised (ResMixMatch-style, simplified): the model's own
prediction averaged over two augmented residual views (flip, channel scaling in [0.8, 1.25]),
sharpened, is the target there, with a weight ramped up over training; boxes and NG tags add a
multiple-instance term (the top-k pixels of the unknown region should be anomalous).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..features.backbone import FeatureExtractor, load_image
from ..utils.checkpoint import load_checkpoint, save_checkpoint
from .distributed import Distributed
from ..inference.clicks import Click, encode_clicks, sample_training_clicks, scale_clicks
from .labels import box_cover, box_labels, exact_labels, pseudo_labels, tag_labels
from .losses import normalized_focal_loss, soft_dice_loss
from ..models import ADClick, ADClickConfig
from ..features.reference import ReferenceBank, image_fingerprint
from ..features.residuals import ResidualConfig, Residuals, compute_residuals
from .synthesis import AnomalySynthesizer
from .click import ClickPool, build_synthetic_pool, input_scale, optimizer_and_ema, warmup_cosine_lr

__all__ = ["SegItem", "SegProduct", "SegTrainConfig", "train_seg", "seg_synthetic_pool", "SEG_KIND", "item_label_kind",
           "UNSUPERVISED_PHOTOMETRIC_FRACTION", "seg_synthesizer"]

SEG_KIND = "adclick_seg"
ProgressFn = Callable[[float, str], None]


@dataclass
class SegItem:
    """One training image and whatever labels it has (all in original image pixels)."""

    image: "np.ndarray | str | Path"
    defect_type: str | None = None
    mask: np.ndarray | None = None  # exact (painted) mask, H x W bool
    click_prob: np.ndarray | None = None  # ADClick probability map the clicks produced, H x W
    clicks: Sequence[Click] = ()
    boxes: Sequence[tuple[float, float, float, float]] = ()  # x0, y0, x1, y1
    tag: str | None = None  # "OK" or "NG"

    @property
    def verdict(self) -> str | None:
        """The tag as "OK" / "NG" (case and surrounding spaces ignored), else None."""
        t = (self.tag or "").strip().upper()
        return t if t in ("OK", "NG") else None


def item_label_kind(item: SegItem) -> str:
    if item.mask is not None:
        return "mask"
    if item.click_prob is not None:
        return "clicks"
    if len(item.boxes):
        return "boxes"
    if item.verdict is not None:
        return "tag"
    raise ValueError("SegItem without any label (mask, click_prob, boxes or OK/NG tag)")


@dataclass
class SegProduct:
    """Another product's labelled images and its own reference bank: what pre-training on other
    products' real defects learns from (``train_seg(..., others=[...])``). Residuals are taken
    against the product's own bank, so the model learns what a defect looks like relative to
    *its* normal surface, which is what transfers to a product it has never seen."""

    items: Sequence[SegItem]
    bank: ReferenceBank
    name: str = "product"

    @classmethod
    def from_folder(cls, root: str | Path, extractor: FeatureExtractor, bank_cache: str | Path | None = None,
                    progress: bool = True) -> "SegProduct":
        """Every defective test image of an MVTec-style folder with its painted mask, and the
        folder's reference bank (``train/good``; loaded from / written to ``bank_cache``)."""
        from ..utils.data import MVTecFolder

        folder = MVTecFolder(root)
        bank = folder.reference_bank(extractor, bank_cache, progress=progress)
        items = [SegItem(s.image_path, s.defect_type, mask=s.mask()) for s in folder.test_samples(defective_only=True)]
        return cls(items, bank, Path(root).name)


@dataclass
class SegTrainConfig:
    # 2000: MTD, 5 clicks, pixel AP 0.595 / 0.479 (folds 0 / 1) at 1200 -> 0.607 / 0.496; one fold
    # ~25 min on 2 CPU cores.
    iterations: int = 2000
    batch_size: int = 8
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup: int = 60
    ema_decay: float = 0.99
    synthetic_fraction: float = 0.3  # share of each batch drawn from the synthetic pool (1.0 if no items)
    max_delta: float = 0.1  # abandon band of Eq. 9
    click_radius_pseudo: float = 5.0  # d of Eq. 8, in model-input pixels
    max_train_clicks: int = 3  # IIS-style training; 0 clicks at test
    p_no_clicks: float = 0.5
    unlabelled_weight: float = 1.0
    unlabelled_ramp: float = 0.4  # fraction of training over which the weight ramps up
    mil_top_fraction: float = 0.02
    sharpen_t: float = 0.5
    dice_weight: float = 1.0  # + soft Dice over labelled pixels (see losses.soft_dice_loss)
    # The reference bank's own defect-free images as all-normal samples (residuals against the
    # rest of the bank, from its stored features: no image files needed) when there are labelled
    # images and none of them is OK-tagged: this many of them (capped at the bank's size - 1),
    # ``normal_fraction`` of each batch, taken from the synthetic share (if any). Labelled images
    # are mostly defective, and without real normals the model fires on OK images (MTD, masks:
    # image AUROC 0.83 -> 0.93, pixel AP 0.519 -> 0.526, means over the two folds).
    bank_normals: int = 200
    normal_fraction: float = 0.125
    # The pre-annotation threshold is calibrated on labelled images the model has not trained on
    # yet: this share of the images with known defect pixels sits out the first
    # ``calibration_at`` of training, is calibrated on there, then joins training. Fewer than
    # ``calibration_min_images`` such images: calibrated on the training images. Measured on MTD
    # fold 0, masks, AP of the continuous map: no hold-out 0.586, 10 % until 50 % 0.598, 20 %
    # until 80 % 0.546 (that long an absence costs the final model).
    calibration_holdout: float = 0.1
    calibration_at: float = 0.5
    calibration_min_images: int = 8
    # Inference scales each map by its image's score (predictor.gate_by_image_score); the
    # threshold is calibrated on such maps. Stored with the checkpoint, read by SegPredictor.
    gate_by_image_score: bool = True
    # With no labelled image at all: fuse the answer with the training-free map
    # (predictor.MapFusion), 0 = off. Weight 1.5 and gate exponent 0.5 were chosen on MTD with
    # the finish-patch pool at share 0.2 (fused pixel AP 0.377-0.389 over weights 1-2 and
    # exponents 0.25-0.75), then kept for share 0.35. The model alone ranks large uneven patches
    # better than the map (defect pixels above 86 % vs 80 % of their image's normal pixels), the
    # map small holes, cracks and edge chips (91-98 % vs 88-92 %).
    map_fusion_weight: float = 1.5
    map_fusion_gate: float = 0.5
    language: bool = True
    seed: int = 0
    model: ADClickConfig = field(default_factory=lambda: ADClickConfig(head="token", depth=4, drop_path=0.1))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


@dataclass
class _Prepared:
    residual: torch.Tensor  # N x C x g x g float16
    target: torch.Tensor  # N x S x S float (0/1, or ADClick probability for "clicks")
    valid: torch.Tensor  # N x S x S bool
    mil: torch.Tensor  # N x S x S bool: region that must contain a defect (boxes, NG), else empty
    kind: list[str]
    clicks: list[list[Click]]  # for "clicks": the clicks in model-input pixels
    defect_type: list[str | None]


def _normalized(data: _Prepared, scale: torch.Tensor) -> _Prepared:
    return _Prepared(normalize_residual(data.residual, scale), data.target, data.valid, data.mil, data.kind,
                     data.clicks, data.defect_type)


def _concat(parts: Sequence[_Prepared]) -> _Prepared:
    parts = [p for p in parts if p.kind] or list(parts[:1])
    return _Prepared(torch.cat([p.residual for p in parts]), torch.cat([p.target for p in parts]),
                     torch.cat([p.valid for p in parts]), torch.cat([p.mil for p in parts]),
                     [k for p in parts for k in p.kind], [c for p in parts for c in p.clicks],
                     [t for p in parts for t in p.defect_type])


def _resize(arr: np.ndarray, s: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.asarray(arr, dtype=np.float32))[None, None]
    if mode == "nearest":
        return F.interpolate(t, size=(s, s), mode="nearest")[0, 0].numpy()
    return F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def _scaled_boxes(boxes: Sequence[tuple[float, float, float, float]], hw: tuple[int, int], s: int) -> list:
    """Boxes in image pixels -> boxes in the s x s model input."""
    sx, sy = s / hw[1], s / hw[0]
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]


def _prepare(items: Sequence[SegItem], extractor: FeatureExtractor, bank: ReferenceBank, rcfg: ResidualConfig,
             progress: bool) -> _Prepared:
    s = extractor.config.input_size
    index = {h: i for i, h in enumerate(bank.hashes)}
    res, tgt, val, mil, kinds, clicks, types = [], [], [], [], [], [], []
    for item in tqdm(items, desc="seg residuals", unit="img", disable=not progress):
        img = load_image(item.image)
        h, w = img.shape[:2]
        own = index.get(image_fingerprint(img))
        feats = extractor(extractor.preprocess([img]))
        r = compute_residuals(feats.grid, feats.descriptor, bank, rcfg, exclude=[[own] if own is not None else []])
        res.append(r.residual[0].half().cpu())
        kind = item_label_kind(item)
        region = np.zeros((s, s), dtype=bool)
        if kind == "mask":
            target, valid = exact_labels(_resize(item.mask, s, "nearest") > 0.5)
            cl: list[Click] = []
        elif kind == "clicks":
            target = _resize(item.click_prob, s, "bilinear")
            valid = np.ones((s, s), dtype=bool)
            cl = scale_clicks(list(item.clicks), (h, w), (s, s))
            if len(item.boxes):
                # A click answer that comes with boxes (box_prompts.py, or an annotator's clicks plus
                # rectangles) may cover only a part of a large defect (box prompts on MTD fold 0: 25 % of
                # the boxed defect pixels, against 78 % for 5 clicks): the rest of the box is unknown,
                # not normal (WeakREST), and the box must contain a defect (MIL).
                region = box_cover((s, s), _scaled_boxes(item.boxes, (h, w), s))
                valid = ~(region & (target < 0.5))
        elif kind == "boxes":
            wl = box_labels((s, s), _scaled_boxes(item.boxes, (h, w), s))
            target, valid = wl.target, wl.valid
            region = ~valid.astype(bool)
            cl = []
        else:
            wl = tag_labels((s, s), item.tag)
            target, valid = wl.target, wl.valid
            region = ~valid.astype(bool) if item.verdict == "NG" else region
            cl = []
        tgt.append(torch.from_numpy(np.asarray(target, dtype=np.float32)))
        val.append(torch.from_numpy(np.asarray(valid).astype(bool)))
        mil.append(torch.from_numpy(region))
        kinds.append(kind)
        clicks.append(cl)
        types.append(item.defect_type)
    if not res:
        g = extractor.grid_size
        return _Prepared(torch.zeros(0, extractor.feature_dim, g, g, dtype=torch.float16), torch.zeros(0, s, s),
                         torch.zeros(0, s, s, dtype=torch.bool), torch.zeros(0, s, s, dtype=torch.bool), [], [], [])
    return _Prepared(torch.stack(res), torch.stack(tgt), torch.stack(val), torch.stack(mil), kinds, clicks, types)


def _bank_self_residuals(bank: ReferenceBank, rcfg: ResidualConfig, i: int) -> Residuals:
    """Bank image ``i`` against the rest of the bank (itself excluded), from its stored features."""
    return compute_residuals(bank.features[i:i + 1], bank.descriptors[i:i + 1], bank, rcfg, exclude=[[int(i)]])


def _bank_normals(bank: ReferenceBank, rcfg: ResidualConfig, indices: Sequence[int], s: int) -> _Prepared:
    """The bank's images ``indices`` as all-normal samples: each one's residual against the rest
    of the bank (itself excluded, as for any bank image in ``_prepare``), target 0 everywhere."""
    res = []
    for i in indices:
        res.append(_bank_self_residuals(bank, rcfg, i).residual[0].half().cpu())
    n = len(res)
    zeros = torch.zeros(n, s, s)
    return _Prepared(torch.stack(res), zeros, torch.ones(n, s, s, dtype=torch.bool),
                     torch.zeros(n, s, s, dtype=torch.bool), ["normal"] * n, [[] for _ in range(n)], [None] * n)


# Share of the Seg pool's anomalies that are bands / chips along a side (synthesis.edge_mask).
# Measured on MTD, unsupervised, fold 0: pixel AP 0.205 -> 0.232 (uneven 0.26 -> 0.37).
SEG_EDGE_FRACTION = 0.3


# Share of the pool's composites relit as a whole (synthesis.photometric_jitter) when the model
# trains on synthetic anomalies alone: with no real image of the project in training, this is how
# it learns that a brighter, higher-contrast normal surface is still normal. Measured on MTD,
# unsupervised, 1200 iterations, pixel AP (folds 0 / 1): 0.233 / 0.216 without, 0.286 / 0.245 at
# 0.5, 0.269 / 0.266 at 0.9 (0.301 / 0.321 at 2000 iterations). Labelled modes see real project
# images and keep 0 (not measured).
UNSUPERVISED_PHOTOMETRIC_FRACTION = 0.9

# Unsupervised pool only: share of uneven anomalies (default 0.2) and the share of those that are
# straight-bordered finish patches (synthesis.finish_mask) rather than soft blobs. Measured on MTD,
# 2000 iterations, pixel AP (folds 0 / 1) of the model alone (gated) / fused with the training-free
# map (SegTrainConfig.map_fusion_weight): soft blobs 0.301 /
# 0.321 and 0.358 / 0.342; finish patches 0.238 / 0.281 and 0.403 / 0.375; finish patches at
# share 0.35 0.307 / 0.271 and 0.442 / 0.366. With `train-seg --mode unsupervised` itself (another
# random stream): fused 0.403 / 0.335. On their own the patches make the model fire on bright
# streaky normal areas too; fused with the map they lift the large uneven defects.
# `train-seg --mode unsupervised`, fused, share 0.35 -> 0.4 (all that is left after perlin 0.35 and
# crack 0.25: no spots; a share of 0.5 is cut to 0.4 by the same draw):
# seed 0 0.381 -> 0.395 (eval-seg: 0.416 / 0.373), seed 1 0.346 -> 0.364 (means over the folds).
UNSUPERVISED_UNEVEN_FRACTION = 0.4
UNSUPERVISED_FINISH_FRACTION = 1.0

# Unsupervised pool only: each composite's residuals leave out, besides its own source image, the
# bank images most similar to it. A bank holds near-duplicates (on MTD the same tiles under other
# exposures), so a leave-one-out residual is that of a re-shot part; a production image is a new
# part. MTD, 40 bank images, mean ||r|| over the map reference: 0.49 leaving out itself, 0.69 / 0.78
# / 0.83 leaving out 5 / 20 / 60 more; the normal areas of the defective test images sit at
# 0.76-0.95, the good test images (re-shot parts again) at 0.45. A model that trained on the small
# leave-one-out residuals fires over the whole of a new part.
UNSUPERVISED_EXCLUDE_SIMILAR = 20


# Residuals of several products differ in scale (mean r^2 of a product's normal surface against its
# own references, 24 bank images each: glass edge 0.071, BSD 0.126, lens 0.182, MTD 0.211, metal
# plate 0.284). A model pre-trained on several products sees each product's residuals divided by
# its own scale (``bank_residual_scale``), and so does it on a new product: the checkpoint records
# ``residual_normalization = "per_bank"`` and ``SegPredictor`` divides by the scale of the bank it
# answers with.
PER_BANK = "per_bank"
BANK_SCALE_IMAGES = 24


def bank_residual_scale(bank: ReferenceBank, rcfg: ResidualConfig, images: int = BANK_SCALE_IMAGES) -> torch.Tensor:
    """Per-channel mean of r^2 over (up to ``images``, spread over the bank) reference images, each
    against the rest of the bank: how much this product's normal surface differs from its
    references (C, float32, on the CPU)."""
    if len(bank) < 2:
        raise ValueError("the reference bank needs at least 2 images to measure its own residuals")
    picked = sorted({int(i) for i in np.linspace(0, len(bank) - 1, min(images, len(bank))).round()})
    total = None
    for i in picked:
        r = _bank_self_residuals(bank, rcfg, i).residual.float().cpu()
        sq = (r * r).mean(dim=(0, 2, 3))
        total = sq if total is None else total + sq
    return (total / len(picked)).clamp_min(1e-8)


def normalize_residual(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``residual`` (N x C x g x g) divided by the square root of a bank's ``bank_residual_scale``,
    in the residual's own dtype and device."""
    root = scale.to(residual.device, torch.float32).sqrt().view(1, -1, 1, 1)
    return (residual.float() / root).to(residual.dtype)


def bank_map_reference(bank: ReferenceBank, rcfg: ResidualConfig, max_images: int = 200, seed: int = 0,
                       quantile: float = 0.99) -> float:
    """The ``quantile`` of the training-free map ||r|| over (up to ``max_images``) reference images,
    each against the rest of the bank: what a normal surface scores (``MapFusion.reference``)."""
    if len(bank) < 2:
        raise ValueError("the reference bank needs at least 2 images to measure its own residuals")
    n = min(max_images, len(bank))
    picked = np.sort(np.random.default_rng(seed).choice(len(bank), size=n, replace=False))
    values = [_bank_self_residuals(bank, rcfg, i).distance.flatten().float().cpu() for i in picked]
    return float(torch.quantile(torch.cat(values), quantile))


def seg_synthesizer(unsupervised: bool = False, edge_fraction: float = SEG_EDGE_FRACTION) -> AnomalySynthesizer:
    """The anomaly recipe of ADClick-Seg's synthetic pool; ``unsupervised``: the model sees no
    real image of the project, so the pool also relights whole images and draws more, straight-
    bordered uneven patches (the constants above)."""
    if not unsupervised:
        return AnomalySynthesizer(p_edge=edge_fraction)
    return AnomalySynthesizer(p_edge=edge_fraction, p_photometric=UNSUPERVISED_PHOTOMETRIC_FRACTION,
                              p_uneven=UNSUPERVISED_UNEVEN_FRACTION, p_finish=UNSUPERVISED_FINISH_FRACTION)


def seg_synthetic_pool(extractor: FeatureExtractor, bank: ReferenceBank, normals: Sequence, rcfg: ResidualConfig,
                       seed: int = 0, progress: bool = True, unsupervised: bool = False,
                       synthesizer: AnomalySynthesizer | None = None) -> ClickPool:
    """The synthetic anomalies ADClick-Seg trains on: one per normal image (path or array); a
    normal image that is in the bank is left out of its own retrieval (``unsupervised``: with its
    ``UNSUPERVISED_EXCLUDE_SIMILAR`` most similar bank images). ``synthesizer`` defaults to
    ``seg_synthesizer(unsupervised)``."""
    return build_synthetic_pool(extractor, bank, normals, rcfg, per_image=1, seed=seed, progress=progress,
                                bank_index=bank.positions(normals),
                                synthesizer=synthesizer or seg_synthesizer(unsupervised),
                                exclude_similar=UNSUPERVISED_EXCLUDE_SIMILAR if unsupervised else 0)


def _prompt_bank(defect_types: Sequence[str], encoder, object_name: str, phrases: dict | None):
    """Prompt features per defect type (None when language is off)."""
    if encoder is None:
        return None
    return {t: encoder.defect_features(t, phrases=(phrases or {}).get(t), object_name=object_name) for t in defect_types}


def _known_defect_pixels(data: _Prepared) -> list[int]:
    """Indices of the items whose defect pixels are known (painted masks, click pseudo labels)."""
    return [i for i, k in enumerate(data.kind) if k in ("mask", "clicks")]


@torch.no_grad()
def calibrate_threshold(
    model: ADClick,
    data: "_Prepared",
    synthetic: ClickPool | None,
    prompts: dict | None,
    device: torch.device,
    max_items: int = 64,
    out_size: int = 64,
    only: Sequence[int] | None = None,
    labelled_source: str = "labelled images",
    gate: bool = False,
    fusion: "MapFusion | None" = None,
) -> dict:
    """The probability threshold with the best pixel F1 on labelled data, as inference computes
    maps (zero clicks, Eq. 7 max over defect types, sigma-4 smoothing at the input size; scaled
    by the image score with ``gate``, or fused with the training-free map by ``fusion``).

    Uses the items whose defect pixels are known (masks, click pseudo labels), restricted to
    ``only`` (indices into ``data``) when given, reported as ``labelled_source``; without them,
    the synthetic pool. Returns ``{"threshold", "f1", "source", "images"}``."""
    from ..evaluation.metrics import best_f1_threshold
    from ..inference.predictor import fuse_with_map, gate_by_image_score, seg_probabilities, smooth_map

    known = _known_defect_pixels(data)
    if only is not None:
        allowed = set(only)
        known = [i for i in known if i in allowed]
    known = known[:max_items]
    if known:
        residual = data.residual[known]
        targets = [(data.target[i] > 0.5) & data.valid[i] for i in known]
        valid = [data.valid[i] for i in known]
        source = labelled_source
    elif synthetic is not None and len(synthetic):
        idx = np.linspace(0, len(synthetic) - 1, min(max_items, len(synthetic))).astype(int)
        residual = synthetic.residual[idx]
        targets = [torch.from_numpy(synthetic.masks[i]) for i in idx]
        valid = [torch.ones_like(t) for t in targets]
        source = "synthetic anomalies"
    else:
        return {"threshold": 0.5, "f1": None, "source": "default", "images": 0}
    features = {t: prompts[t].mean.to(device) for t in sorted(prompts)} if prompts else None
    types = sorted(features) if features else ["defect"]
    parts = []
    for start in range(0, len(residual), 8):
        batch = residual[start:start + 8].float().to(device)
        per_type = seg_probabilities(model, batch, types, features)
        if fusion is not None:
            s = model.config.input_size
            distance = smooth_map(torch.linalg.vector_norm(batch, dim=1, keepdim=True), (s, s))
            per_type = fuse_with_map(per_type, distance, fusion)
        elif gate:
            per_type = gate_by_image_score(per_type)
        parts.append(torch.stack(list(per_type.values())).amax(0))  # Eq. 7
    prob = torch.cat(parts)
    prob = F.adaptive_avg_pool2d(prob, out_size)[:, 0].cpu().numpy()
    scores, masks = [], []
    for i in range(len(targets)):
        t = F.adaptive_max_pool2d(targets[i].float()[None, None], out_size)[0, 0].numpy() > 0.5
        # A cell counts only if all its pixels are labelled (min-pool).
        v = -F.adaptive_max_pool2d(-valid[i].float()[None, None], out_size)[0, 0].numpy() > 0.5
        scores.append(prob[i][v])
        masks.append(t[v])
    thr, f1 = best_f1_threshold(scores, masks)
    return {"threshold": round(float(np.clip(thr, 0.05, 0.95)), 4), "f1": round(f1, 4), "source": source,
            "images": len(targets)}


def _initial_weights(init: str | Path, extractor: FeatureExtractor) -> dict:
    """The checkpoint training continues from; it must have been trained on this backbone."""
    start = load_checkpoint(init, SEG_KIND)
    if start.get("backbone") != extractor.config.to_dict():
        raise ValueError(f"{init} was trained on backbone {start.get('backbone')}, not on "
                         f"{extractor.config.to_dict()}: train from scratch or pre-train on this backbone")
    return start


def _continued_config(start: dict, fresh: ADClickConfig, init: str | Path) -> ADClickConfig:
    """The starting checkpoint's model config, checked against what this training feeds it."""
    mcfg = ADClickConfig.from_dict(start["model_config"])
    for key in ("in_channels", "input_size", "grid_size", "text_dim"):
        if getattr(mcfg, key) != getattr(fresh, key):
            raise ValueError(f"{init}: its model has {key}={getattr(mcfg, key)}, this training needs "
                             f"{getattr(fresh, key)} (language on/off and the backbone must match)")
    return mcfg


def train_seg(
    items: Sequence[SegItem],
    extractor: FeatureExtractor,
    bank: ReferenceBank,
    config: SegTrainConfig | None = None,
    residual_config: ResidualConfig | None = None,
    synthetic: ClickPool | None = None,
    defect_types: Sequence[str] | None = None,
    prompt_encoder=None,
    phrases: dict[str, list[str]] | None = None,
    object_name: str = "surface",
    out: str | Path | None = None,
    progress: bool | ProgressFn = True,
    device: str | torch.device = "cpu",
    dist: Distributed | None = None,
    others: Sequence[SegProduct] = (),
    init: str | Path | None = None,
) -> tuple[ADClick, dict]:
    """Train ADClick-Seg from labelled items (+ an optional synthetic pool); write ``out``.

    ``others``: other products' labelled images, each against its own bank, trained on beside
    ``items`` (pre-training; their defect types join the model's). ``init``: an ADClick-Seg
    checkpoint (same backbone) whose weights training starts from instead of a random model.

    ``progress``: True for a progress bar, or a callback ``(fraction, message)`` (used by the
    Label Studio backend to report percent done). ``dist``: the torchrun process group (default:
    the one this process joined, if any): each process draws its share of every batch, DDP
    averages the gradients, rank 0 reports and writes ``out``.
    """
    config = config or SegTrainConfig()
    rcfg = residual_config or ResidualConfig()
    dist = dist or Distributed.current()
    callback = progress if callable(progress) and dist.is_main else None
    bar_on = progress is True and dist.is_main
    out = out if dist.is_main else None
    rng = np.random.default_rng(config.seed + dist.rank)  # each process its own draws
    torch.manual_seed(config.seed)
    device = dist.device(torch.device(device))
    t0 = time.time()
    own = set(defect_types or []) or {i.defect_type for i in items if i.defect_type}
    types = sorted(own | {i.defect_type for o in others for i in o.items if i.defect_type}) or ["defect"]
    start = _initial_weights(init, extractor) if init is not None else None
    if config.language and prompt_encoder is None:
        from ..features.prompts import PromptEncoder

        prompt_encoder = PromptEncoder()
    prompts = _prompt_bank(types, prompt_encoder if config.language else None, object_name, phrases)

    if callback:
        callback(0.0, f"computing residuals of {len(items)} labelled images")
    data = _prepare(items, extractor, bank, rcfg, bar_on)
    banks = [bank, *(o.bank for o in others)]
    per_bank = bool(others)
    scales: list[torch.Tensor] = []
    if per_bank:
        if config.model.residual_input != "square":
            raise ValueError("pre-training on several products needs the 'square' residual input")
        if callback:
            callback(0.0, f"residual scale of {len(banks)} products' references")
        scales = [bank_residual_scale(b, rcfg) for b in banks]
        parts = [_normalized(data, scales[0])]
        for o, scale in zip(others, scales[1:]):
            parts.append(_normalized(_prepare(o.items, extractor, o.bank, rcfg, bar_on), scale))
        data = _concat(parts)
        if synthetic is not None:  # drawn against the first product's bank
            synthetic = ClickPool(normalize_residual(synthetic.residual, scales[0]), synthetic.fine, synthetic.masks)
    # OK-tagged items are real normals already (in a Label Studio project, the very images the
    # bank holds): the bank's images stand in only where the labels have none.
    has_ok = any(item_label_kind(it) == "tag" and it.verdict == "OK" for it in items)
    use_bank = len(data.kind) and not has_ok and config.normal_fraction > 0
    # Pre-training shares the normals between the products' banks.
    normals_each = config.bank_normals if len(banks) == 1 else max(1, config.bank_normals // len(banks))
    counts = [max(0, min(normals_each, len(b) - 1)) if use_bank else 0 for b in banks]
    n_normals = sum(counts)
    normals = None
    if n_normals > 0:
        if callback:
            callback(0.0, f"residuals of {n_normals} defect-free reference images")
        parts = []
        for i, (b, n) in enumerate(zip(banks, counts)):
            if n:
                picked = np.sort(np.random.default_rng(config.seed + 2).choice(len(b), size=n, replace=False))
                part = _bank_normals(b, rcfg, picked.tolist(), extractor.config.input_size)
                parts.append(_normalized(part, scales[i]) if per_bank else part)
        normals = _concat(parts)
    n_real, n_syn = len(data.kind), len(synthetic) if synthetic is not None else 0
    if n_real == 0 and n_syn == 0:
        raise ValueError("nothing to train on: no labelled item and no synthetic pool")
    syn_frac = 1.0 if n_real == 0 else (config.synthetic_fraction if n_syn else 0.0)

    mcfg = ADClickConfig.from_dict({**config.model.to_dict(), "in_channels": extractor.feature_dim,
                                    "input_size": extractor.config.input_size, "grid_size": extractor.grid_size,
                                    "fine_channels": 0, "head": "token",
                                    "text_dim": prompt_encoder.feature_dim if prompts else 0})
    if start is not None:
        mcfg = _continued_config(start, mcfg, init)
    model = ADClick(mcfg).to(device)
    if start is not None:  # its input scale too: the weights were learnt on inputs scaled by it
        model.load_state_dict(start["state_dict"], strict=True)
    if per_bank:  # inputs already divided by their bank's scale
        model.residual_embed.input_scale.fill_(1.0)
    elif start is None or start.get("residual_normalization") == PER_BANK:
        # A new model, or one pre-trained on residuals divided by each product's scale: then this
        # project's scale, once and for all (a one-image bank has no scale of its own: the training
        # inputs' normal pixels give it, as for a new model).
        if start is not None and len(bank) >= 2:
            scale = bank_residual_scale(bank, rcfg)
        elif n_syn:
            scale = input_scale(synthetic.residual, torch.from_numpy(synthetic.masks), mcfg.residual_input)
        else:
            scale = input_scale(data.residual, ~data.valid | (data.target > 0.5), mcfg.residual_input)
        model.residual_embed.input_scale.copy_(scale.to(device))
    opt, ema = optimizer_and_ema(model, config.lr, config.weight_decay, config.ema_decay)
    trained = dist.wrap(model, find_unused=True)  # the gradient step (the text branch may sit out a step)
    s = mcfg.input_size
    losses: list[float] = []

    def lr_at(it: int) -> float:
        return warmup_cosine_lr(it, config.lr, config.warmup, config.iterations)

    def language_for(batch_types: list[str | None]) -> torch.Tensor | None:
        if prompts is None:
            return None
        from ..features.prompts import sample_prompt

        feats = [sample_prompt(prompts[t if t in prompts else types[int(rng.integers(len(types)))]], rng, True)
                 for t in batch_types]
        return torch.stack(feats).to(device)

    known = _known_defect_pixels(data)
    holdout: list[int] = []
    if len(known) >= config.calibration_min_images and config.calibration_holdout > 0:
        k = max(1, int(round(config.calibration_holdout * len(known))))
        holdout = sorted(int(i) for i in np.random.default_rng(config.seed + 1).choice(known, size=k, replace=False))
    in_training = np.setdiff1d(np.arange(n_real), holdout)
    calibrate_at = int(config.calibration_at * config.iterations) if holdout else -1
    calibration: dict | None = None

    bar = tqdm(range(config.iterations), desc="train-seg", unit="it", disable=not bar_on)
    for it in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        b = dist.share(config.batch_size)
        n_n = int(round(b * config.normal_fraction)) if normals is not None else 0
        n_s = max(0, int(round(b * syn_frac)) - n_n) if n_real else b
        n_r = b - n_s - n_n
        res_parts, tgt_parts, val_parts, mil_parts, clk_parts, type_parts = [], [], [], [], [], []
        if n_s:
            idx = rng.choice(n_syn, size=n_s)
            res_parts.append(synthetic.residual[idx].float())
            m = torch.from_numpy(synthetic.masks[idx]).float()
            tgt_parts.append(m)
            val_parts.append(torch.ones_like(m, dtype=torch.bool))
            mil_parts.append(torch.zeros_like(m, dtype=torch.bool))
            clk_parts += [sample_training_clicks(mm, rng) for mm in synthetic.masks[idx]]
            type_parts += [None] * n_s
        if n_n:
            idx = rng.choice(n_normals, size=n_n)
            res_parts.append(normals.residual[idx].float())
            tgt_parts.append(normals.target[idx])
            val_parts.append(normals.valid[idx])
            mil_parts.append(normals.mil[idx])
            clk_parts += [[] for _ in range(n_n)]
            type_parts += [None] * n_n
        if it == calibrate_at:
            was_training = ema.module.training
            calibration = calibrate_threshold(
                ema.module.eval(), data, None, prompts, device, only=holdout,
                labelled_source=f"labelled images held out of training until iteration {it}",
                gate=config.gate_by_image_score)
            ema.module.train(was_training)
            in_training = np.arange(n_real)
        if n_r:
            idx = rng.choice(in_training, size=n_r)
            res_parts.append(data.residual[idx].float())
            for i in idx:
                kind = data.kind[i]
                if kind == "clicks":
                    t_np, v_np = pseudo_labels(data.target[i].numpy(), data.clicks[i], config.click_radius_pseudo, rng,
                                               max_delta=config.max_delta)
                    tgt_parts.append(torch.from_numpy(np.asarray(t_np, dtype=np.float32))[None])
                    val_parts.append((torch.from_numpy(np.asarray(v_np).astype(bool)) & data.valid[i])[None])
                else:
                    tgt_parts.append(data.target[i][None])
                    val_parts.append(data.valid[i][None])
                mil_parts.append(data.mil[i][None])
                known_pos = (tgt_parts[-1][0] > 0.5) & val_parts[-1][0]
                clk_parts.append(sample_training_clicks(known_pos.numpy(), rng) if known_pos.any() else [])
                type_parts.append(data.defect_type[i])
        res = torch.cat(res_parts).to(device)
        target = torch.cat(tgt_parts).to(device)[:, None]
        valid = torch.cat(val_parts).to(device)[:, None]
        mil = torch.cat(mil_parts).to(device)[:, None]
        # IIS-style: sometimes a few clicks from the known positives, 0 clicks at test time.
        clicks = [c[: int(rng.integers(1, config.max_train_clicks + 1))] if rng.random() > config.p_no_clicks else []
                  for c in clk_parts]
        if rng.random() < 0.5:
            res, target, valid, mil = res.flip(-1), target.flip(-1), valid.flip(-1), mil.flip(-1)
            clicks = [[Click(s - 1 - c.x, c.y, c.positive) for c in cl] for cl in clicks]
        maps = encode_clicks(clicks, None, s, mcfg.click_radius).to(device)
        lang = language_for(type_parts)
        logits = F.interpolate(trained(res, maps, None, lang), size=(s, s), mode="bilinear", align_corners=False)
        loss = normalized_focal_loss(logits, (target > 0.5).float(), valid)
        if config.dice_weight:
            loss = loss + config.dice_weight * soft_dice_loss(logits, (target > 0.5).float(), valid)

        unknown = ~valid
        if unknown.any():
            ramp = min(1.0, it / max(1.0, config.unlabelled_ramp * config.iterations))
            with torch.no_grad():
                views = []
                for flip in (False, True):
                    scale = torch.empty(1, res.shape[1], 1, 1, device=device).uniform_(0.8, 1.25)
                    v = (res.flip(-1) if flip else res) * scale
                    p = torch.sigmoid(ema.module(v, maps.flip(-1) if flip else maps, None, lang))
                    views.append(p.flip(-1) if flip else p)
                p = F.interpolate(torch.stack(views).mean(0), size=(s, s), mode="bilinear", align_corners=False)
                p_t = p ** (1 / config.sharpen_t)
                guess = p_t / (p_t + (1 - p) ** (1 / config.sharpen_t))
            prob = torch.sigmoid(logits)
            loss_u = ((prob - guess) ** 2 * unknown).sum() / unknown.sum().clamp_min(1)
            loss = loss + config.unlabelled_weight * ramp * loss_u
        if mil.any():
            prob = torch.sigmoid(logits)
            terms = []
            for bi in range(prob.shape[0]):
                region = prob[bi][mil[bi]]
                if region.numel():
                    k = max(1, int(config.mil_top_fraction * region.numel()))
                    top = region.topk(k).values.mean()
                    terms.append(-torch.log(top.clamp_min(1e-6)))
            if terms:
                loss = loss + torch.stack(terms).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
        losses.append(loss.item())
        if it % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if callback:
                callback((it + 1) / config.iterations,
                         f"iteration {it + 1}/{config.iterations}, loss {np.mean(losses[-50:]):.4f}")
    bar.close()
    summary = {
        "iterations": config.iterations, "seconds": round(time.time() - t0, 1), "labelled_images": n_real,
        "bank_normals": n_normals,
        "label_kinds": {k: data.kind.count(k) for k in sorted(set(data.kind))}, "synthetic_pool": n_syn,
        "defect_types": types, "language": prompts is not None,
        "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
        "processes": dist.world_size,
        "other_products": [{"name": o.name, "labelled_images": len(o.items)} for o in others],
        "initialised_from": str(init) if init is not None else None,
    }
    model = ema.module.eval()
    fusion = None
    if n_real == 0 and config.map_fusion_weight > 0:
        from ..inference.predictor import MapFusion

        fusion = MapFusion(config.map_fusion_weight, bank_map_reference(bank, rcfg, seed=config.seed),
                           config.map_fusion_gate)
        summary["map_fusion"] = fusion.to_dict()
    if calibration is None:
        calibration = calibrate_threshold(
            model, data, synthetic, prompts, device,
            labelled_source="the training images (too few labelled images to hold any out)",
            gate=config.gate_by_image_score, fusion=fusion)
    summary["threshold"] = calibration
    if out is not None:
        save_checkpoint(
            out, SEG_KIND, model.state_dict(), model_config=mcfg.to_dict(),
            train_config={k: v for k, v in config.to_dict().items() if k != "model"},
            backbone=extractor.config.to_dict(), residual_config=rcfg.to_dict(),
            bank_fingerprint=bank.fingerprint, defect_types=types, object_name=object_name,
            threshold=calibration["threshold"],
            residual_normalization=PER_BANK if per_bank else None,
            map_fusion=fusion.to_dict() if fusion is not None else None,
            # The averaged prompt of each type (Eq. 6) travels with the weights: inference needs no text encoder.
            prompt_features={t: prompts[t].mean.detach().float().cpu() for t in types} if prompts else {},
            train_summary=summary,
        )
        if callback:
            callback(1.0, f"checkpoint written: {out}")
    return model, summary
