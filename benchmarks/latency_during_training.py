"""Click latency while an ADClick-Seg training runs, on one machine: the training in another process
(an ``adclick worker`` beside the replica) vs. in a thread of the process that answers the clicks
(the embedded default, no Redis), vs. no training.

    .venv/bin/python benchmarks/latency_during_training.py --data tests/data/mtd_sample

Each condition runs ``bench_clicks`` (the ``bench`` command: cold = first click on an image, warm =
the next ones) once the training loop is under way; the training is stopped after the bench.
Prints one JSON object: the percentiles of each condition.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adclick_core.evaluation.latency import bench_clicks  # noqa: E402


class Stop(Exception):
    pass


def train(data: str, started: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """An unsupervised ADClick-Seg training on ``data`` (as ``train-seg --mode unsupervised``) that
    runs until ``stop`` is set (or forever)."""
    from adclick_core.utils.data import MVTecFolder
    from adclick_core.inference.predictor import ClickPredictor
    from adclick_core.training.seg import SegTrainConfig, seg_synthetic_pool, train_seg

    folder = MVTecFolder(data)
    clicker = ClickPredictor.from_checkpoint(None, device="cpu")
    bank = folder.reference_bank(clicker.extractor, None)
    pool = seg_synthetic_pool(clicker.extractor, bank, folder.train_good(), clicker.residual_config, seed=0,
                              unsupervised=True)

    def progress(fraction: float, message: str) -> None:
        if started is not None and message.startswith("iteration"):
            started.set()
        if message.startswith("iteration"):
            print("training: " + message, file=sys.stderr, flush=True)
        if stop is not None and stop.is_set():
            raise Stop()

    try:
        train_seg([], clicker.extractor, bank, SegTrainConfig(iterations=1_000_000, language=False),
                  residual_config=clicker.residual_config, synthetic=pool, defect_types=folder.defect_types,
                  progress=progress, device="cpu")
    except Stop:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="tests/data/mtd_sample")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--clicks-per-image", type=int, default=5)
    ap.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_only:
        train(args.data)
        return

    def bench() -> dict:
        r = bench_clicks(args.data, n_images=args.images, clicks_per_image=args.clicks_per_image, device="cpu")
        return {"cold_click_ms": r["cold_click_ms"], "warm_click_ms": r["warm_click_ms"]}

    out = {"idle": bench()}

    for threads in (None, 1):  # the worker with torch's default threads (one per core), and with one
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        proc = subprocess.Popen([sys.executable, __file__, "--data", args.data, "--train-only"],
                                stderr=subprocess.PIPE, text=True, env=env)
        t0 = time.time()
        for line in proc.stderr:  # wait for its training loop (bounded by the pool build)
            if line.startswith("training: iteration") or time.time() - t0 > 600:
                break
        threading.Thread(target=lambda p=proc: [None for _ in p.stderr], daemon=True).start()
        out[f"training in another process (worker), {threads or 'default'} thread(s)"] = bench()
        proc.kill()
        proc.wait(timeout=30)

    started, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=train, args=(args.data, started, stop), daemon=True)
    t.start()
    started.wait(timeout=600)
    out["training in a thread of this process (embedded default)"] = bench()
    stop.set()
    t.join(timeout=120)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
