"""``eval-seg``: ADClick-Seg from each kind of label, side by side, on two folds.

The defective test images are split into two folds by a fixed seed (stratified by defect type).
For fold f, models train on fold f's weak information and are evaluated on the *other* fold's
defective images plus all good test images; both folds and their mean are reported.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ..inference.box_prompts import box_prompted_item
from ..inference.clicks import Click
from ..utils.data import MVTecFolder, Sample
from .clicks import simulate_clicks
from .metrics import image_auroc, segmentation_report
from ..inference.predictor import ClickPredictor, ImageState, SegPredictor
from ..inference.predictor import MapFusion
from ..training.seg import (SegItem, SegTrainConfig, bank_map_reference, seg_synthetic_pool,
                            train_seg)
from ..training.click import ClickPool

__all__ = ["SEG_MODES", "PRETRAINED_MODES", "split_folds", "mask_boxes", "weak_items", "evaluate_seg"]

log = logging.getLogger(__name__)
SEG_MODES = ("residual_map", "unsupervised", "clicks5", "boxes", "tags", "masks", "clicks5_no_language")
# Modes that score a checkpoint pre-trained on other products (``pretrained=``) with no label of
# this product: as it is, and fused with this product's training-free map.
PRETRAINED_MODES = ("pretrained", "pretrained_fused")


def split_folds(samples: Sequence[Sample], seed: int = 0, n_folds: int = 2) -> list[list[Sample]]:
    """Defective samples -> n folds, each defect type split as evenly as possible."""
    rng = np.random.default_rng(seed)
    folds: list[list[Sample]] = [[] for _ in range(n_folds)]
    slot = 0  # carried across types, so odd leftovers do not all land in fold 0
    for t in sorted({s.defect_type for s in samples}):
        group = [s for s in samples if s.defect_type == t]
        for i in rng.permutation(len(group)):
            folds[slot % n_folds].append(group[i])
            slot += 1
    return folds


def mask_boxes(mask: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Bounding boxes (x0, y0, x1, y1) of the 8-connected components: what an annotator would draw."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    return [(float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
            for sl in ndimage.find_objects(labels) if sl is not None]


def weak_items(mode: str, samples: Sequence[Sample], click_predictor: ClickPredictor | None = None,
               n_clicks: int = 5) -> list[SegItem]:
    """The training items one kind of label gives for these defective samples."""
    items = []
    for s in tqdm(samples, desc=f"labels ({mode})", unit="img", leave=False):
        image = s.image()
        gt = s.mask(image.shape[:2])
        if mode == "masks":
            items.append(SegItem(image, s.defect_type, mask=gt))
        elif mode == "boxes":
            item = SegItem(image, s.defect_type, boxes=mask_boxes(gt))
            items.append(box_prompted_item(click_predictor, item) if click_predictor is not None else item)
        elif mode == "tags":
            items.append(SegItem(image, s.defect_type, tag="NG"))
        elif mode.startswith("clicks"):
            state = click_predictor.set_image(image)
            clicks: list[Click] = []

            def method(cl, prev):
                clicks[:] = cl
                return click_predictor.predict(state, cl, prev_mask=prev)

            _, kept = simulate_clicks(method, gt, n_clicks, [n_clicks])
            items.append(SegItem(image, s.defect_type, click_prob=kept[n_clicks].astype(np.float32),
                                 clicks=list(clicks)))
        else:
            raise ValueError(f"mode {mode!r} has no labelled items")
    return items


def _ok_items(paths: Sequence[Path], n: int, seed: int) -> list[SegItem]:
    """OK-tagged defect-free images (the tags mode's cheap negatives)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    return [SegItem(paths[i], None, tag="OK") for i in pick]


def _report(maps: list[np.ndarray], masks: list[np.ndarray], scores: list[float], labels: list[int]) -> dict:
    row = segmentation_report(maps, masks)
    row["image_auroc"] = image_auroc(scores, labels)
    return {k: round(float(v), 4) for k, v in row.items()}


def evaluate_seg(
    data: str | Path,
    runs: str | Path,
    modes: Sequence[str] = SEG_MODES,
    seed: int = 0,
    iterations: int | None = None,
    train_missing: bool = True,
    click_checkpoint: str | None = None,
    bank_path: str | None = None,
    device: str = "auto",
    progress: bool = True,
    only_folds: Sequence[int] | None = None,
    gate: bool | None = None,
    pretrained: str | Path | None = None,
) -> dict:
    """Train what is missing and score every mode on every fold (``only_folds``: these folds only;
    the mean is then over them). ``gate``: score the Seg maps with / without image-score gating
    whatever the checkpoints say (None: as each checkpoint says). ``pretrained``: a checkpoint
    pre-trained on other products, scored by ``PRETRAINED_MODES`` and continued from by every
    mode that trains (missing checkpoints only)."""
    if any(m in PRETRAINED_MODES for m in modes) and pretrained is None:
        raise ValueError(f"modes {PRETRAINED_MODES} need a pre-trained checkpoint (pretrained=...)")
    t0 = time.time()
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    folder = MVTecFolder(data)
    clicker = ClickPredictor.from_checkpoint(click_checkpoint, device=device)
    bank = folder.reference_bank(clicker.extractor, bank_path, progress=progress)
    clicker = clicker.with_bank(bank)
    extractor, rcfg = clicker.extractor, clicker.residual_config
    defect_types = folder.defect_types
    folds = split_folds(folder.test_samples(defective_only=True), seed=seed)
    goods = [s for s in folder.test_samples() if not s.is_defective]
    pools: dict[bool, ClickPool] = {}  # by "unsupervised": that model's pool differs
    timings: dict[str, float] = {}

    def checkpoint_for(mode: str, fold: int) -> Path | None:
        if mode == "residual_map":
            return None
        if mode in PRETRAINED_MODES:
            return Path(pretrained)
        path = runs / (f"{mode}.pt" if mode == "unsupervised" else f"{mode}_fold{fold}.pt")
        if path.is_file() or not train_missing:
            return path
        unsupervised = mode == "unsupervised"
        if unsupervised not in pools:
            pools[unsupervised] = seg_synthetic_pool(extractor, bank, folder.train_good(), rcfg, seed=seed,
                                                     progress=progress,
                                                     unsupervised=unsupervised)
        cfg = SegTrainConfig(seed=seed)
        if iterations:
            cfg.iterations = iterations
        if mode == "clicks5_no_language":
            cfg.language = False
        base = mode.replace("_no_language", "")
        items = [] if mode == "unsupervised" else weak_items(base, folds[fold], clicker)
        if mode == "tags":
            items += _ok_items(folder.train_good(), len(items), seed)
        t = time.time()
        train_seg(items, extractor, bank, cfg, residual_config=rcfg, synthetic=pools[unsupervised],
                  defect_types=defect_types,
                  out=path, progress=progress, device=clicker.device, init=pretrained)
        timings[path.name] = round(time.time() - t, 1)
        return path

    fusion: list[MapFusion] = []

    def fusion_for_bank() -> MapFusion:
        """How an unsupervised model is fused with the map (SegTrainConfig's defaults), on this bank."""
        if not fusion:
            cfg = SegTrainConfig()
            fusion.append(MapFusion(cfg.map_fusion_weight, bank_map_reference(bank, rcfg, seed=seed),
                                    cfg.map_fusion_gate))
        return fusion[0]

    # Residual states of every evaluation image once; all models share them.
    states: dict[str, ImageState] = {}
    gts: dict[str, np.ndarray] = {}
    fold_ids = list(range(len(folds))) if only_folds is None else sorted(set(only_folds))

    def held_out_of(f: int) -> list[Sample]:
        return [*folds[1 - f], *goods] if len(folds) == 2 else [*goods]

    needed = {s.name: s for f in fold_ids for s in held_out_of(f)}
    for s in tqdm(list(needed.values()), desc="eval residuals", unit="img", disable=not progress):
        img = s.image()
        states[s.name] = clicker.set_image(img)
        gts[s.name] = s.mask(img.shape[:2])

    per_fold: list[dict] = []
    for f in fold_ids:
        held_out = held_out_of(f)
        row: dict[str, dict] = {}
        for mode in modes:
            ckpt = checkpoint_for(mode, f)
            maps, scores = [], []
            seg = None if ckpt is None else SegPredictor.from_checkpoint(ckpt, bank=bank, device=device,
                                                                        extractor=extractor)
            if seg is not None and mode in PRETRAINED_MODES:
                seg = seg.with_defect_types(defect_types)
                if mode == "pretrained_fused":
                    seg = seg.with_map_fusion(fusion_for_bank())
            if seg is not None and gate is not None:
                seg.gate = gate
            for s in held_out:
                st = states[s.name]
                if seg is None:
                    amap = clicker.anomaly_map(st)
                    amap = ndimage.gaussian_filter(amap, 4.0)
                    score = float(amap.max())
                else:
                    amap, score = seg.predict(st, defect_types)
                maps.append(amap)
                scores.append(score)
            row[mode] = _report(maps, [gts[s.name] for s in held_out], scores, [int(s.is_defective) for s in held_out])
            log.info("fold %d %s: %s", f, mode, row[mode])
        per_fold.append(row)

    mean = {m: {k: round(float(np.mean([pf[m][k] for pf in per_fold])), 4) for k in per_fold[0][m]} for m in modes}
    return {
        "data": str(data),
        "folds": per_fold,
        "fold_ids": fold_ids,
        "methods": mean,
        "split": {"seed": seed, "fold_sizes": [len(fd) for fd in folds], "good_test_images": len(goods),
                  "evaluated_on": "the other fold's defective images + all good test images"},
        "gate": "as each checkpoint says" if gate is None else gate,
        "training_seconds": timings,
        "pretrained": str(pretrained) if pretrained is not None else None,
        "seconds": round(time.time() - t0, 1),
    }
