"""Load: 8 annotators click at once, 100 clicks each, on 8 images of two Label Studio projects,
against the real gunicorn service. Every answer must equal the single-user answer to the same
clicks on the same image (a mask answered for another task or image would differ), with no error.
p50/p95 latency and the worker's peak RSS are reported."""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.e2e.helpers import pick_defects

from .conftest import REPORT, answer_mask, click_body, make_project, same_mask

pytestmark = pytest.mark.reliability

ANNOTATORS = 8
CLICKS_EACH = 100
EPISODE = 5  # clicks on one object before the annotator starts the next one


def click_plan(image: dict, seed: int) -> list[list[tuple[float, float, bool]]]:
    """``CLICKS_EACH`` requests: episodes of 1..EPISODE accumulated clicks, the first of each
    positive, inside the image (deterministic)."""
    rng = np.random.default_rng(seed)
    plan, history = [], []
    for k in range(CLICKS_EACH):
        if k % EPISODE == 0:
            history = []
        x, y = rng.uniform(0, image["w"] - 1), rng.uniform(0, image["h"] - 1)
        history = history + [(float(x), float(y), not history or bool(rng.random() < 0.7))]
        plan.append(list(history))
    return plan


def test_eight_annotators_at_once_get_their_own_masks(label_studio, mtd_dir, start_service):
    defects = pick_defects(mtd_dir, per_type=2)[:ANNOTATORS]
    projects = [make_project(label_studio, mtd_dir, f"load {i}", defects[i::2]) for i in range(2)]
    work = [(p, img) for p in projects for img in p["images"]]
    assert len(work) == ANNOTATORS
    plans = [click_plan(img, seed=i) for i, (_, img) in enumerate(work)]
    svc = start_service("load")

    # Single user: every request in turn (also builds both banks and the image states).
    reference: dict[tuple[int, int], np.ndarray] = {}
    for a, ((project, image), plan) in enumerate(zip(work, plans)):
        for k, clicks in enumerate(plan):
            r = svc.post("/predict", click_body(project, image, clicks))
            assert r.status_code == 200, (a, k, r.status_code, r.text[:300])
            reference[a, k] = answer_mask(r, image)

    statuses: list[int] = []
    wrong: list[tuple[int, int]] = []
    latencies: list[float] = []

    def annotator(a: int) -> None:
        project, image = work[a]
        for k, clicks in enumerate(plans[a]):
            t0 = time.perf_counter()
            r = svc.post("/predict", click_body(project, image, clicks))
            latencies.append((time.perf_counter() - t0) * 1e3)
            statuses.append(r.status_code)
            if r.status_code != 200 or not same_mask(answer_mask(r, image), reference[a, k]):
                wrong.append((a, k))

    pid_before = svc.worker_pid()
    t0 = time.time()
    with ThreadPoolExecutor(ANNOTATORS) as pool:
        list(pool.map(annotator, range(ANNOTATORS)))
    wall = time.time() - t0
    errors = sum(s != 200 for s in statuses)
    q = statistics.quantiles(latencies, n=20)
    figures = (f"{len(statuses)} concurrent clicks in {wall:.0f} s; latency p50 {statistics.median(latencies):.0f} ms, "
               f"p95 {q[18]:.0f} ms; worker peak RSS {svc.peak_rss_mb()} MB")
    REPORT["load: 8 annotators x 100 clicks, 2 projects"] = {
        "inputs": len(statuses), "2xx": len(statuses) - errors, "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses), "wrong masks": len(wrong),
        "crashes": int(svc.worker_pid() != pid_before), "data lost": 0, "figures": figures}
    print("\n" + figures)
    assert len(statuses) == ANNOTATORS * CLICKS_EACH
    assert errors == 0, f"{errors} errors: {sorted(set(statuses))}"
    assert not wrong, f"{len(wrong)} answers differ from the single-user answer, e.g. {wrong[:5]}"
    assert svc.worker_pid() == pid_before, "the worker restarted under load"
