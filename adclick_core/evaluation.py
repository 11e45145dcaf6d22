"""Interactive (simulated-click) evaluation of ADClick against two click-driven baselines.

Every method runs the same protocol (ALGORITHM.md): the next click is the deepest point of the
larger error region of *its own* previous answer (deterministic), threshold 0.49, up to
``max_clicks``. Figures are over the defective test images only, as the ADClick paper reports them.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .baselines import random_walker_probability, residual_cut_probability
from .clicks import Click, next_eval_click
from .data import MVTecFolder
from .errors import DataError, InputError
from .metrics import iou, mean_iou_at, noc, pixel_ap, segmentation_report
from .predictor import ClickPredictor, ImageState

__all__ = ["evaluate_clicks", "simulate_clicks", "report_counts", "check_methods", "METHODS", "THRESHOLD"]

log = logging.getLogger(__name__)
THRESHOLD = 0.49
# "adclick_raw": the click model without boundary refinement (refinement.py), for the ablation
METHODS = ("adclick", "adclick_raw", "random_walker", "residual_map")

# (clicks so far, previous probability or None) -> probability map at image size
ClickMethod = Callable[[list[Click], "np.ndarray | None"], np.ndarray]


def simulate_clicks(
    method: ClickMethod, gt: np.ndarray, max_clicks: int, report_at: Sequence[int]
) -> tuple[list[float], dict[int, np.ndarray]]:
    """Run the click protocol for one image. Returns IoU after each click and the probability
    maps after the clicks listed in ``report_at``. Stops early once every reported count is done
    and IoU reached 0.8 (NoC@80 is then known), or when no error is left to click on."""
    clicks: list[Click] = []
    prob: np.ndarray | None = None
    ious: list[float] = []
    kept: dict[int, np.ndarray] = {}
    last_report = max(report_at)
    for k in range(1, max_clicks + 1):
        pred = None if prob is None else prob > THRESHOLD
        nxt = next_eval_click(gt, pred, clicks)
        if nxt is None:  # perfect answer: later counts keep it
            break
        clicks.append(nxt)
        prob = method(clicks, prob)
        ious.append(iou(prob > THRESHOLD, gt))
        if k in report_at:
            kept[k] = prob.astype(np.float16)
        if k >= last_report and max(ious) >= 0.8:
            break
    for k in sorted(report_at):  # an image that stopped early keeps its last answer
        if k not in kept:
            kept[k] = (prob if prob is not None else np.zeros(gt.shape, np.float32)).astype(np.float16)
    return ious, kept


def report_counts(clicks: Sequence[int], max_clicks: int) -> list[int]:
    """The click counts to report, sorted and unique; each must lie in 1..``max_clicks`` (a count
    past the cap would silently report the capped answer under another name)."""
    if max_clicks < 1:
        raise InputError(f"max_clicks must be at least 1, got {max_clicks}")
    counts = sorted(set(int(c) for c in clicks))
    if not counts:
        raise InputError("no click count to report")
    bad = [c for c in counts if not 1 <= c <= max_clicks]
    if bad:
        raise InputError(f"click counts must lie in 1..{max_clicks} (the --max-clicks cap), got {bad}")
    return counts


def check_methods(names: Sequence[str]) -> list[str]:
    """``names`` if every one is a known method, else an InputError that lists the known ones."""
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise InputError(f"unknown methods {unknown or list(names)}; choose from {', '.join(METHODS)}")
    return list(names)


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined figure (no defect pixel left at this size) is null."""
    return round(float(x), 4) if np.isfinite(x) else None


def _methods_for(pred: ClickPredictor, state: ImageState, image: np.ndarray, names: Sequence[str]) -> dict[str, ClickMethod]:
    """The click methods ``names`` (already checked by ``check_methods``) on one image's state."""
    out: dict[str, ClickMethod] = {}
    if "adclick" in names:
        out["adclick"] = lambda clicks, prev: pred.predict(state, clicks, prev_mask=prev)
    if "adclick_raw" in names:
        raw = pred.with_refinement(None)
        out["adclick_raw"] = lambda clicks, prev: raw.predict(state, clicks, prev_mask=prev)
    if "random_walker" in names:
        out["random_walker"] = lambda clicks, prev: random_walker_probability(image, clicks)
    if "residual_map" in names:
        amap = pred.anomaly_map(state)
        out["residual_map"] = lambda clicks, prev: residual_cut_probability(amap, clicks)
    return out


def evaluate_clicks(
    data: str | Path,
    checkpoint: str | Path | None = None,
    clicks: Sequence[int] = (1, 3, 5),
    max_clicks: int = 20,
    bank_path: str | None = None,
    device: str = "auto",
    limit: int | None = None,
    residual_overrides: dict | None = None,
    methods: Sequence[str] = METHODS,
    progress: bool = True,
) -> dict:
    """The ``eval-click`` command: metrics per method and click count (fractions in [0, 1]), and
    per image the AP and IoU of each method after the last reported count (``per_image``: where a
    model fails). Bad arguments are an InputError / DataError before anything is loaded."""
    t0 = time.time()
    report_at = report_counts(clicks, max_clicks)
    k_last = report_at[-1]
    methods = check_methods(methods)
    folder = MVTecFolder(data)
    samples = folder.test_samples(defective_only=True)[:limit]
    if not samples:
        raise DataError(f"{data}: no defective test images to evaluate (test/<defect type>/ with "
                        f"ground_truth/<defect type>/<name>_mask.png)"
                        + (f" among the first {limit}" if limit is not None else ""))
    pred = ClickPredictor.from_checkpoint(checkpoint, device=device)
    for k, v in (residual_overrides or {}).items():
        setattr(pred.residual_config, k, v)
    pred = pred.with_bank(folder.reference_bank(pred.extractor, bank_path, progress=progress))
    probs: dict[str, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    ious: dict[str, list[list[float]]] = defaultdict(list)
    gts: list[np.ndarray] = []
    types: list[str] = []
    names: list[str] = []
    empty: list[str] = []
    seconds: dict[str, float] = defaultdict(float)
    for sample in tqdm(samples, desc="eval-click", unit="img", disable=not progress):
        image = sample.image()
        gt = sample.mask(image.shape[:2])
        if gt.shape != image.shape[:2]:
            raise DataError(f"{sample.mask_path}: mask is {gt.shape[1]}x{gt.shape[0]} px, "
                            f"its image {image.shape[1]}x{image.shape[0]}")
        if not gt.any():  # nothing to click on: no click count, no AP
            log.warning("%s: empty ground-truth mask, left out", sample.name)
            empty.append(sample.name)
            continue
        t = time.time()
        state = pred.set_image(image)
        seconds["set_image"] += time.time() - t
        gts.append(gt)
        types.append(sample.defect_type)
        names.append(sample.name)
        for name, method in _methods_for(pred, state, image, methods).items():
            t = time.time()
            per_click, kept = simulate_clicks(method, gt, max_clicks, report_at)
            seconds[name] += time.time() - t
            ious[name].append(per_click)
            for k in report_at:
                probs[name][k].append(kept[k])

    if not gts:
        raise DataError(f"{data}: every defective test image has an empty ground-truth mask")
    result: dict = {
        "data": str(data),
        "n_images": len(gts),
        "left_out_empty_masks": empty,
        "images": "defective test images only",
        "checkpoint": str(checkpoint) if checkpoint else "shipped",
        "protocol": f"each method gets its own simulated clicks (deepest point of the larger error region), "
                    f"threshold {THRESHOLD}, at most {max_clicks} clicks",
        "residual_config": pred.residual_config.to_dict(),
        "methods": {},
        "per_defect_type_ap": {},
    }
    for name in ious:
        noc50 = float(np.mean([noc(v, 0.5, max_clicks) for v in ious[name]]))
        noc80 = float(np.mean([noc(v, 0.8, max_clicks) for v in ious[name]]))
        table = {}
        for k in report_at:
            maps = [p.astype(np.float32) for p in probs[name][k]]
            row = segmentation_report(maps, gts)
            row["miou"] = mean_iou_at(ious[name], k)
            row["noc50"] = noc50
            row["noc80"] = noc80
            table[str(k)] = {m: _finite(v) for m, v in row.items()}
        result["methods"][name] = table
        result["per_defect_type_ap"][name] = {
            t: _finite(pixel_ap([p.astype(np.float32) for p, tt in zip(probs[name][k_last], types) if tt == t],
                                [g for g, tt in zip(gts, types) if tt == t]))
            for t in sorted(set(types))
        }
    result["per_image"] = [
        {"image": name, "defect_type": t, "defect_pixels": int(gt.sum()), "defect_fraction": round(float(gt.mean()), 5),
         "clicks": k_last,
         "ap": {m: _finite(pixel_ap([probs[m][k_last][i].astype(np.float32)], [gt])) for m in ious},
         "iou": {m: _finite(mean_iou_at([ious[m][i]], k_last)) for m in ious}}
        for i, (name, t, gt) in enumerate(zip(names, types, gts))
    ]
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result["seconds"]["total"] = round(time.time() - t0, 1)
    return result
