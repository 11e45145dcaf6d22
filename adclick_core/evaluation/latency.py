"""``bench``: click latency (cold = set_image + first predict, warm = predict only), bank build time
per image and peak memory, as JSON. Latency targets live here, not in timed unit tests."""
from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..inference.clicks import next_eval_click
from ..utils.data import MVTecFolder
from ..utils.errors import DataError, InputError
from ..inference.predictor import ClickPredictor, without_steps
from ..features.reference import ReferenceBank

__all__ = ["bench_clicks", "percentiles"]


def percentiles(values_ms: list[float]) -> dict:
    v = np.asarray(values_ms, dtype=np.float64)
    return {"p50": round(float(np.percentile(v, 50)), 1), "p95": round(float(np.percentile(v, 95)), 1),
            "n": int(v.size)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_clicks(
    data: str | Path,
    checkpoint: str | Path | None = None,
    bank_path: str | None = None,
    device: str = "auto",
    n_images: int = 10,
    clicks_per_image: int = 5,
    bank_images: int | None = None,
    without: Sequence[str] = (),
) -> dict:
    if n_images < 1 or clicks_per_image < 2:
        raise InputError(f"bench needs at least 1 image and 2 clicks per image (a cold and a warm click), "
                         f"got {n_images} and {clicks_per_image}")
    folder = MVTecFolder(data)
    # an empty mask gives nothing to click on: no latency to measure there
    samples = [s for s in folder.test_samples(defective_only=True) if s.mask().any()]
    normals = folder.train_good()[:bank_images]
    if not samples or not normals:
        raise DataError(f"{data}: bench needs defect-free images (train/good) for the bank and defective "
                        f"test images with masks (test/<type>, ground_truth/<type>) to click on")
    pred = ClickPredictor.from_checkpoint(checkpoint, device=device)
    dev = pred.device
    # Bank build time is always measured (a fresh build); --bank only decides where it is saved.
    t = time.perf_counter()
    bank = ReferenceBank.build(pred.extractor, normals, names=[p.name for p in normals], progress=False)
    _sync(dev)
    bank_ms = (time.perf_counter() - t) * 1000 / max(1, len(normals))
    if bank_path:
        bank.save(bank_path)
    pred = without_steps(pred.with_bank(bank), without)
    # Spread the images over the defect types rather than taking the first type only.
    pick = np.linspace(0, len(samples) - 1, num=min(n_images, len(samples))).round().astype(int)
    # One warm-up image so lazy initialisation (allocators, kernels) is not billed to the first click.
    warm_state = pred.set_image(samples[pick[0]].image())
    pred.predict(warm_state, [next_eval_click(samples[pick[0]].mask(), None)])
    cold, warm = [], []
    for i in pick:
        image = samples[i].image()
        gt = samples[i].mask(image.shape[:2])
        clicks, prob = [], None
        for k in range(clicks_per_image):
            c = next_eval_click(gt, None if prob is None else prob > 0.49, clicks)
            if c is None:
                break
            clicks.append(c)
            t = time.perf_counter()
            if k == 0:
                state = pred.set_image(image)
            prob = pred.predict(state, clicks, prev_mask=prob)
            _sync(dev)
            (cold if k == 0 else warm).append((time.perf_counter() - t) * 1000)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "cold_click_ms": percentiles(cold),
        "warm_click_ms": percentiles(warm),
        "bank_build_ms_per_image": round(bank_ms, 1),
        "bank_images": len(bank),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "device": str(dev) if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "input_size": pred.extractor.config.input_size,
        "residual_config": pred.residual_config.to_dict(),
        "images": len(pick),
        "without": sorted(set(without)),
    }
