"""Interactive (simulated-click) evaluation of ADClick against two click-driven baselines.

Every method runs the same protocol (ALGORITHM.md): the next click is the deepest point of the
larger error region of *its own* previous answer (deterministic), threshold 0.49, up to
``max_clicks``. Figures are over the defective test images only, as the ADClick paper reports them.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..inference.baselines import random_walker_probability, residual_cut_probability
from ..inference.clicks import Click, next_eval_click
from ..utils.data import MVTecFolder, Sample
from ..utils.errors import DataError, InputError
from .metrics import iou, mean_iou_at, noc, pixel_ap, segmentation_report
from ..inference.predictor import ClickPredictor, ImageState, without_steps

if TYPE_CHECKING:
    from ..training.adaptation import AdaptConfig

__all__ = ["evaluate_clicks", "evaluate_click_sets", "mean_over_sets", "format_click_tables", "simulate_clicks",
           "report_counts", "check_methods", "check_workers", "default_workers", "masks_for_learning", "METHODS",
           "DEFAULT_METHODS", "THRESHOLD", "NOC_TARGETS", "DEFAULT_CLICKS"]

log = logging.getLogger(__name__)
THRESHOLD = 0.49
NOC_TARGETS = (0.5, 0.8, 0.85, 0.9)  # NoC@50, NoC@80, NoC@85, NoC@90
DEFAULT_CLICKS = (1, 3, 5, 10, 20)
# "adclick_raw": the click model without boundary refinement (refinement.py); "adclick_global":
# without zoom-in (zoom.py), on the whole image only; "adclick_unseeded": without the clicks as hard
# seeds (refinement.seeded_boundary); all for ablations.
METHODS = ("adclick", "adclick_raw", "adclick_global", "adclick_unseeded", "random_walker", "residual_map")
_ABLATED = {"adclick_raw": ["refinement"], "adclick_global": ["zoom"], "adclick_unseeded": ["seeds"]}
# The ablations are asked for by name: each costs as much as the shipped model again.
DEFAULT_METHODS = ("adclick", "random_walker", "residual_map")

# (clicks so far, previous probability or None) -> probability map at image size
ClickMethod = Callable[[list[Click], "np.ndarray | None"], np.ndarray]


def simulate_clicks(
    method: ClickMethod, gt: np.ndarray, max_clicks: int, report_at: Sequence[int]
) -> tuple[list[float], dict[int, np.ndarray]]:
    """Run the click protocol for one image. Returns IoU after each click and the probability
    maps after the clicks listed in ``report_at``. Stops early once every reported count is done
    and IoU reached the highest NoC target (every NoC is then known), or when no error is left to
    click on."""
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
        if k >= last_report and max(ious) >= max(NOC_TARGETS):
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
    for name, steps in _ABLATED.items():
        if name in names:
            ablated = without_steps(pred, steps)
            out[name] = lambda clicks, prev, ablated=ablated: ablated.predict(state, clicks, prev_mask=prev)
    if "random_walker" in names:
        out["random_walker"] = lambda clicks, prev: random_walker_probability(image, clicks)
    if "residual_map" in names:
        amap = pred.anomaly_map(state)
        out["residual_map"] = lambda clicks, prev: residual_cut_probability(amap, clicks)
    return out


def _load_predictor(checkpoint, device: str, residual_overrides: dict | None) -> ClickPredictor:
    pred = ClickPredictor.from_checkpoint(checkpoint, device=device)
    for k, v in (residual_overrides or {}).items():
        setattr(pred.residual_config, k, v)
    return pred


def _defective_samples(data: str | Path, limit: int | None) -> list:
    """The defective test samples; with ``limit``, that many spread evenly over the sorted list, so
    that a quick run still sees every defect type in proportion."""
    samples = MVTecFolder(data).test_samples(defective_only=True)
    if not samples:
        raise DataError(f"{data}: no defective test images to evaluate (test/<defect type>/ with "
                        f"ground_truth/<defect type>/<name>_mask.png)")
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be at least 1, got {limit}")
        if limit < len(samples):
            samples = [samples[i] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]
    return samples


def _noc_row(per_image_ious: Sequence[Sequence[float]], max_clicks: int) -> dict[str, float]:
    return {f"noc{int(round(t * 100))}": float(np.mean([noc(v, t, max_clicks) for v in per_image_ious]))
            for t in NOC_TARGETS}


@dataclass
class _ImageResult:
    """One image's run of every method: IoU after each click, the kept maps, seconds per method."""

    gt: np.ndarray
    ious: dict[str, list[float]] = field(default_factory=dict)
    kept: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _evaluate_image(pred: ClickPredictor, sample: Sample, methods: Sequence[str], max_clicks: int,
                    report_at: Sequence[int]) -> _ImageResult | None:
    """Every method's click protocol on one image; None for an empty ground-truth mask."""
    image = sample.image()
    gt = sample.mask(image.shape[:2])
    if gt.shape != image.shape[:2]:
        raise DataError(f"{sample.mask_path}: mask is {gt.shape[1]}x{gt.shape[0]} px, "
                        f"its image {image.shape[1]}x{image.shape[0]}")
    if not gt.any():  # nothing to click on: no click count, no AP
        return None
    out = _ImageResult(gt)
    t = time.time()
    state = pred.set_image(image)
    out.seconds["set_image"] = time.time() - t
    for name, method in _methods_for(pred, state, image, methods).items():
        t = time.time()
        out.ious[name], out.kept[name] = simulate_clicks(method, gt, max_clicks, report_at)
        out.seconds[name] = time.time() - t
    return out


def check_workers(workers: int) -> int:
    if int(workers) < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    return int(workers)


def default_workers(device: str = "auto") -> int:
    """Processes ``eval-click`` shares the images among: one per CPU core, at most 4 (each holds
    a model and a bank), one on a GPU. On 2 cores two one-thread processes answer more clicks per
    second than one two-thread process: a click's tensors are too small to split well."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(4, os.cpu_count() or 1))


# The worker processes' own predictor and protocol (set once per process by _start_worker).
_WORKER: dict = {}


def _start_worker(checkpoint, device: str, residual_overrides: dict | None, bank_path: str, threads: int,
                  methods: Sequence[str], max_clicks: int, report_at: Sequence[int]) -> None:
    import torch

    from ..features.reference import ReferenceBank

    torch.set_num_threads(threads)
    pred = _load_predictor(checkpoint, device, residual_overrides)
    _WORKER.update(pred=pred.with_bank(ReferenceBank.load(bank_path, device=pred.extractor.device)),
                   methods=list(methods), max_clicks=max_clicks, report_at=list(report_at))


def _worker_image(sample: Sample) -> _ImageResult | None:
    return _evaluate_image(_WORKER["pred"], sample, _WORKER["methods"], _WORKER["max_clicks"], _WORKER["report_at"])


def _image_results(pred: ClickPredictor, samples: Sequence[Sample], methods: Sequence[str], max_clicks: int,
                   report_at: Sequence[int], workers: int, checkpoint, device: str, residual_overrides: dict | None,
                   bank_path: str | None):
    """Each sample's ``_ImageResult`` (or None) in order: in this process, or from ``workers``
    processes that load the click model from ``checkpoint`` and the bank from its file (written
    to a temporary file first when the bank has none)."""
    if workers == 1 or len(samples) == 1:
        for sample in samples:
            yield _evaluate_image(pred, sample, methods, max_clicks, report_at)
        return
    import torch

    with tempfile.TemporaryDirectory(prefix="adclick-eval-") as tmp:
        if not bank_path or not Path(bank_path).is_file():
            bank_path = str(Path(tmp) / "bank.safetensors")
            pred.bank.save(bank_path)
        threads = max(1, torch.get_num_threads() // workers)
        init = (checkpoint, device, residual_overrides, str(bank_path), threads, methods, max_clicks, report_at)
        # spawn, not fork: the parent's torch thread pools do not survive a fork
        with ProcessPoolExecutor(min(workers, len(samples)), mp_context=get_context("spawn"),
                                 initializer=_start_worker, initargs=init) as pool:
            yield from pool.map(_worker_image, samples)


def evaluate_clicks(
    data: str | Path,
    checkpoint: str | Path | None = None,
    clicks: Sequence[int] = DEFAULT_CLICKS,
    max_clicks: int = 20,
    bank_path: str | None = None,
    device: str = "auto",
    limit: int | None = None,
    residual_overrides: dict | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    progress: bool = True,
    predictor: ClickPredictor | None = None,
    workers: int = 1,
    exclude: Sequence[str | Path] = (),
) -> dict:
    """The ``eval-click`` command on one data set: metrics per method and click count (fractions
    in [0, 1]), the same per defect type, and per image the AP and IoU of each method after the
    last reported count (``per_image``: where a model fails). ``predictor``: an already loaded
    click model to reuse (its bank is replaced by this folder's). ``workers`` > 1: the images are
    shared among that many processes, each loading ``checkpoint`` itself with its share of the
    CPU threads (``predictor`` then only builds the bank). ``exclude``: image paths left out (the
    masks a model learnt from). Bad arguments are an InputError / DataError before anything is
    loaded."""
    t0 = time.time()
    report_at = report_counts(clicks, max_clicks)
    k_last = report_at[-1]
    methods = check_methods(methods)
    workers = check_workers(workers)
    left_out = {Path(p) for p in exclude}
    samples = [s for s in _defective_samples(data, limit) if s.image_path not in left_out]
    if not samples:
        raise DataError(f"{data}: every defective test image was left out")
    pred = predictor or _load_predictor(checkpoint, device, residual_overrides)
    pred = pred.with_bank(MVTecFolder(data).reference_bank(pred.extractor, bank_path, progress=progress))
    probs: dict[str, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    ious: dict[str, list[list[float]]] = defaultdict(list)
    gts: list[np.ndarray] = []
    types: list[str] = []
    names: list[str] = []
    empty: list[str] = []
    seconds: dict[str, float] = defaultdict(float)
    bar = tqdm(total=len(samples), desc=f"eval-click {Path(data).name}", unit="img", disable=not progress)
    for sample, image_result in zip(samples, _image_results(pred, samples, methods, max_clicks, report_at, workers,
                                                           checkpoint, device, residual_overrides, bank_path)):
        bar.update(1)
        if image_result is None:
            log.warning("%s: empty ground-truth mask, left out", sample.name)
            empty.append(sample.name)
            continue
        gts.append(image_result.gt)
        types.append(sample.defect_type)
        names.append(sample.name)
        for name, t in image_result.seconds.items():
            seconds[name] += t
        for name, per_click in image_result.ious.items():
            ious[name].append(per_click)
            for k in report_at:
                probs[name][k].append(image_result.kept[name][k])
    bar.close()

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
        "per_defect_type": {},
        "per_defect_type_ap": {},
    }
    kinds = sorted(set(types))
    for name in ious:
        nocs = _noc_row(ious[name], max_clicks)
        table = {}
        for k in report_at:
            row = segmentation_report([p.astype(np.float32) for p in probs[name][k]], gts)
            row["miou"] = mean_iou_at(ious[name], k)
            row.update(nocs)
            table[str(k)] = {m: _finite(v) for m, v in row.items()}
        result["methods"][name] = table
        by_type = {}
        for kind in kinds:
            idx = [i for i, tt in enumerate(types) if tt == kind]
            row = {"n_images": len(idx)}
            for k in report_at:
                row[str(k)] = {
                    "ap": _finite(pixel_ap([probs[name][k][i].astype(np.float32) for i in idx], [gts[i] for i in idx])),
                    "miou": _finite(mean_iou_at([ious[name][i] for i in idx], k)),
                }
            row.update({m: _finite(v) for m, v in _noc_row([ious[name][i] for i in idx], max_clicks).items()})
            by_type[kind] = row
        result["per_defect_type"][name] = by_type
        result["per_defect_type_ap"][name] = {kind: by_type[kind][str(k_last)]["ap"] for kind in kinds}
    result["per_image"] = [
        {"image": name, "defect_type": t, "defect_pixels": int(gt.sum()), "defect_fraction": round(float(gt.mean()), 5),
         "clicks": k_last,
         "ap": {m: _finite(pixel_ap([probs[m][k_last][i].astype(np.float32)], [gt])) for m in ious},
         "iou": {m: _finite(mean_iou_at([ious[m][i]], k_last)) for m in ious}}
        for i, (name, t, gt) in enumerate(zip(names, types, gts))
    ]
    # with workers, the per-method figures add up the workers' time; "total" is wall-clock
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result["seconds"]["total"] = round(time.time() - t0, 1)
    result["workers"] = workers
    return result


SUMMARY_METRICS = ("ap", "miou", "noc80", "noc85", "noc90")


def evaluate_click_sets(
    datas: Sequence[str | Path],
    checkpoint: str | Path | None = None,
    bank_paths: Sequence[str | None] | None = None,
    device: str = "auto",
    residual_overrides: dict | None = None,
    adapt: "AdaptConfig | None" = None,
    adapt_dir: str | Path | None = None,
    learn_from: Sequence[int] = (),
    **kwargs,
) -> dict:
    """``evaluate_clicks`` on several data sets with one loaded model: ``{"sets": {name: result},
    "mean": {method: {count: {metric: mean over the sets}}}}`` (each set weighs the same, however
    many images it has). ``bank_paths``: one bank file per data set, or None. ``adapt``: each set
    is answered by the model adapted to its own defect-free images first (``adapted_checkpoint``,
    written to ``adapt_dir``, default a temporary folder; its summary under ``adapted``).
    ``learn_from`` (e.g. 0, 10, 20): per count N, the set is answered by the model adapted to its
    defect-free images *and* to N of its defect images with their masks (standing for a project's
    accepted labels; N = 0: the model as it is, or adapted without masks under ``adapt``), all
    counts evaluated on the same images, those no count learnt from (``masks_for_learning``);
    the results are keyed "<set> N=<count>"."""
    datas = list(datas)
    if not datas:
        raise InputError("no data set to evaluate")
    bank_paths = list(bank_paths) if bank_paths else [None] * len(datas)
    if len(bank_paths) != len(datas):
        raise InputError(f"{len(bank_paths)} bank files for {len(datas)} data sets: give one --bank per --data")
    labels = _set_labels(datas)
    report_counts(kwargs.get("clicks", DEFAULT_CLICKS), kwargs.get("max_clicks", 20))
    check_methods(kwargs.get("methods", DEFAULT_METHODS))
    check_workers(kwargs.get("workers", 1))
    counts = sorted({int(n) for n in learn_from})
    if any(n < 0 for n in counts):
        raise InputError(f"learn_from counts must be >= 0, got {counts}")
    for data in datas:  # every folder is checked before the model loads
        _defective_samples(data, kwargs.get("limit"))
        if counts:
            masks_for_learning(data, max(counts))
    pred = _load_predictor(checkpoint, device, residual_overrides)
    sets = {}
    with tempfile.TemporaryDirectory(prefix="adclick-adapt-") as tmp:
        for label, data, bank in zip(labels, datas, bank_paths):
            if not counts:
                sets[label] = _evaluate_one(pred, label, data, bank, checkpoint, device, residual_overrides, adapt,
                                            Path(adapt_dir or tmp), [], [], kwargs)
                continue
            learnt = masks_for_learning(data, max(counts))
            for n in counts:
                sets[f"{label} N={n}"] = _evaluate_one(pred, f"{label}_N{n}", data, bank, checkpoint, device,
                                                       residual_overrides, adapt, Path(adapt_dir or tmp),
                                                       learnt[:n], learnt, kwargs)
    return {"sets": sets, "mean": mean_over_sets(list(sets.values()))}


def _evaluate_one(pred: ClickPredictor, label: str, data, bank: str | None, checkpoint, device: str,
                  residual_overrides: dict | None, adapt: "AdaptConfig | None", adapt_dir: Path, masks: list,
                  left_out: list, kwargs: dict) -> dict:
    """One set's result: with the model as it is, or adapted (``adapt``, or ``masks`` to learn from)."""
    exclude = [s.image_path for s in left_out]
    if adapt is None and not masks:
        return evaluate_clicks(data, checkpoint, bank_path=bank, device=device, predictor=pred,
                               residual_overrides=residual_overrides, exclude=exclude, **kwargs)
    from ..training.adaptation import AdaptConfig

    out = adapt_dir / f"{label.replace('/', '_')}_adapted.pt"
    summary = adapted_checkpoint(pred, data, bank, out, adapt or AdaptConfig(), progress=kwargs.get("progress", True),
                                 defects=[(s.image_path, s.mask_path) for s in masks])
    result = evaluate_clicks(data, out, bank_path=bank, device=device, residual_overrides=residual_overrides,
                             exclude=exclude, **kwargs)
    result["adapted"] = summary
    return result


def masks_for_learning(data: str | Path, n: int) -> list[Sample]:
    """The defect images ``eval-click --learn-from`` learns from: ``n`` drawn at random (seed 0) from
    the set's defective test images, so that a smaller count's images are among a larger one's."""
    samples = _defective_samples(data, None)
    if n >= len(samples):
        raise InputError(f"{data}: cannot learn from {n} of its {len(samples)} defect images and evaluate the rest")
    order = np.random.default_rng(0).permutation(len(samples))
    return [samples[i] for i in order[:n]]


def adapted_checkpoint(pred: ClickPredictor, data: str | Path, bank_path: str | None, out: Path,
                       config: "AdaptConfig", progress: bool = True, defects: Sequence[tuple] = ()) -> dict:
    """``pred`` adapted to the data set's product as the backend adapts a project's: on its
    reference bank (train/good) and ``defects``, (image, mask) pairs of its own. Writes ``out``;
    returns the adaptation's summary."""
    from ..training.adaptation import adapt_click

    bank = MVTecFolder(data).reference_bank(pred.extractor, bank_path, progress=progress)
    return adapt_click(pred.with_bank(bank), out, config, progress=progress, defects=list(defects) or None)


def _set_labels(datas: Sequence[str | Path]) -> list[str]:
    """Folder names, made unique with their parent's name where two sets share one."""
    names = [Path(d).resolve().name for d in datas]
    return [n if names.count(n) == 1 else f"{Path(d).resolve().parent.name}/{n}" for n, d in zip(names, datas)]


def mean_over_sets(results: Sequence[dict]) -> dict:
    """Per method and count, the mean of ``SUMMARY_METRICS`` over the data sets that have them."""
    out: dict = {}
    methods = [m for m in results[0]["methods"] if all(m in r["methods"] for r in results)]
    for m in methods:
        out[m] = {}
        for k in results[0]["methods"][m]:
            vals = {metric: [r["methods"][m][k][metric] for r in results] for metric in SUMMARY_METRICS}
            out[m][k] = {metric: (round(float(np.mean(v)), 4) if all(x is not None for x in v) else None)
                         for metric, v in vals.items()}
    return out


_HEAD = "| method | clicks | AP | mIoU | NoC@80 | NoC@85 | NoC@90 |"
_RULE = "|---|---|---|---|---|---|---|"


def format_click_tables(result: dict) -> str:
    """Markdown tables for people: one per data set (per method and count, then per defect type
    after the last count) and, for several sets, their mean."""
    sets = result["sets"] if "sets" in result else {Path(result["data"]).name: result}
    lines: list[str] = []

    def fmt(v) -> str:
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) and v > 1 else f"{v:.3f}")

    for label, r in sets.items():
        adapted = r.get("adapted")
        masks = f" and {adapted['masks']} of its defect masks" if adapted and adapted.get("masks") else ""
        how = (f", ADClick adapted to its {adapted['references']} defect-free images{masks} in "
               f"{adapted['total_seconds']:.0f} s"
               if adapted else "")
        lines += [f"### {label} ({r['n_images']} defective images{how})", "", _HEAD, _RULE]
        for m, table in r["methods"].items():
            for k, row in table.items():
                lines.append(f"| {m} | {k} | " + " | ".join(fmt(row[x]) for x in SUMMARY_METRICS) + " |")
        counts = list(next(iter(r["methods"].values())))
        k_last = counts[-1]
        lines += ["", f"per defect type (AP after {k_last} clicks):", "",
                  "| method | type | images | AP | " + " | ".join(f"mIoU@{k}" for k in counts)
                  + " | NoC@80 | NoC@85 | NoC@90 |", "|---" * (7 + len(counts)) + "|"]
        for m, by_type in r["per_defect_type"].items():
            for kind, row in by_type.items():
                lines.append(f"| {m} | {kind} | {row['n_images']} | {fmt(row[k_last]['ap'])} | "
                             + " | ".join(fmt(row[k]["miou"]) for k in counts) + " | "
                             + " | ".join(fmt(row.get(n)) for n in ("noc80", "noc85", "noc90")) + " |")
        lines.append("")
    if len(sets) > 1:
        lines += [f"### mean over {len(sets)} data sets", "", _HEAD, _RULE]
        for m, table in result["mean"].items():
            for k, row in table.items():
                lines.append(f"| {m} | {k} | " + " | ".join(fmt(row[x]) for x in SUMMARY_METRICS) + " |")
        lines.append("")
    return "\n".join(lines)
