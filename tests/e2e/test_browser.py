"""End to end through the web page: headless Chromium (Debian's ``/usr/bin/chromium``, driven by npm
``playwright-core`` from ``tests/e2e/browser``; no browser is downloaded) logs into the test run's
real Label Studio, opens a defect task, switches on *Auto-Annotation*, picks the smart KeyPoint
label, clicks the defect (the ground-truth mask's centroid, mapped onto the scaled image) and waits
for our backend's BrushLabels suggestion. A screenshot of the labeling page is saved.

Needs ``bash scripts/install_browser.sh`` (run here when chromium or node_modules is missing).
Run: ``pytest -q tests/e2e/test_browser.py -m e2e``. Environment:
``ADCLICK_BROWSER_SCREENSHOT`` (default ``runs/browser/labeling_page.png``),
``ADCLICK_BROWSER_DEFECT`` (defect type of the task to open; default ``crack``, or the first type
of an ``ADCLICK_E2E_DATA`` folder without one).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from .conftest import PASSWORD, REPO, USER, _tail
from .helpers import DEFECTS

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

BROWSER_DIR = REPO / "tests" / "e2e" / "browser"
CHROMIUM = Path(os.environ.get("ADCLICK_CHROMIUM", "/usr/bin/chromium"))
NODE_TIMEOUT_S = 420  # the whole browser run; each step inside has STEP_TIMEOUT_MS
STEP_TIMEOUT_MS = 120_000
VIEWPORT = (1400, 1000)
CLICK_TOLERANCE_PX = 1.0  # the page rounds the pointer to CSS pixels of a ~2x scaled image


def _installed() -> bool:
    return CHROMIUM.exists() and (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").exists()


@pytest.fixture(scope="module")
def browser_tools() -> str:
    """node + playwright-core + Debian chromium; installs them (scripts/install_browser.sh) if missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("the browser test needs Node.js (>= 20) for playwright-core: apt-get install nodejs npm",
                    pytrace=False)
    if not _installed():
        r = subprocess.run(["bash", str(REPO / "scripts" / "install_browser.sh")], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not _installed():
            pytest.fail(f"scripts/install_browser.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}", pytrace=False)
    return node


def click_target(gt: np.ndarray) -> tuple[int, int]:
    """The mask's centroid, or the mask pixel nearest to it when the centroid falls outside
    (a curved crack)."""
    ys, xs = np.nonzero(gt)
    cx, cy = xs.mean(), ys.mean()
    x, y = int(round(cx)), int(round(cy))
    if gt[y, x]:
        return x, y
    i = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return int(xs[i]), int(ys[i])


def _cache_lookups(backend_server) -> int:
    c = backend_server.health()["state_cache"]
    return c["hits"] + c["misses"]


def test_keypoint_click_in_the_browser_shows_a_brush_suggestion(browser_tools, label_studio, mtd_project,
                                                                 backend_server):
    defect = os.environ.get("ADCLICK_BROWSER_DEFECT") or ("crack" if "crack" in DEFECTS else DEFECTS[0])
    mine = [x for x in mtd_project["defects"] if x[0] == defect]
    assert mine, f"no task of defect type {defect!r} in the e2e project"
    # The last one of the type: test_label_studio_training annotates the first of each type.
    _, task_id, img_path, gt_path = mine[-1]
    gt = np.asarray(Image.open(gt_path).convert("L")) > 127
    h, w = gt.shape
    x, y = click_target(gt)
    shot = Path(os.environ.get("ADCLICK_BROWSER_SCREENSHOT", REPO / "runs" / "browser" / "labeling_page.png"))
    if not shot.is_absolute():
        shot = REPO / shot
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    result_path = shot.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    params = {"url": label_studio.url, "email": USER, "password": PASSWORD, "project": mtd_project["id"],
              "task": task_id, "label": defect, "x": x, "y": y, "screenshot": str(shot),
              "result": str(result_path), "chromium": str(CHROMIUM), "timeoutMs": STEP_TIMEOUT_MS,
              "width": VIEWPORT[0], "height": VIEWPORT[1]}
    lookups_before = _cache_lookups(backend_server)
    try:
        try:
            proc = subprocess.run([browser_tools, "click_keypoint.mjs", json.dumps(params)], cwd=BROWSER_DIR,
                                  capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"the browser run took over {NODE_TIMEOUT_S} s:\n{(e.stdout or b'')[-3000:]!r}", pytrace=False)
        report = json.loads(result_path.read_text()) if result_path.exists() else {}
        print(f"\nbrowser run ({report.get('seconds')} s, Chromium {report.get('browser')}):\n{proc.stdout[-3000:]}",
              file=sys.stderr)
        assert proc.returncode == 0 and report.get("ok"), (
            f"the browser run failed at step {report.get('step')!r}: {report.get('error')}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}\n"
            f"screenshot: {report.get('failure_screenshot')}\nbackend log:\n{_tail(backend_server.log, 30)}")

        # The page switched Auto-Annotation on and sent one smart keypoint where we aimed.
        assert report["auto_annotation"] is True
        sent = report["request"]["context"]["result"]
        assert report["request"]["task"] == task_id and len(sent) == 1, report["request"]
        kp = sent[0]
        assert kp["type"] == "keypointlabels" and kp["from_name"] == "click" and kp["to_name"] == "image", kp
        assert kp["value"]["keypointlabels"] == [defect] and kp.get("is_positive", True) is not False, kp
        assert (kp["original_width"], kp["original_height"]) == (w, h), kp
        px = kp["value"]["x"] / 100.0 * w - 0.5
        py = kp["value"]["y"] / 100.0 * h - 0.5
        assert abs(px - x) <= CLICK_TOLERANCE_PX and abs(py - y) <= CLICK_TOLERANCE_PX, (
            f"the browser clicked pixel ({px:.2f}, {py:.2f}), aimed at ({x}, {y}); {report['click']}")

        # Our backend answered with a brush mask of that defect type ...
        assert report["response_status"] == 200 and not report["response_errors"], report["response_errors"]
        items = report["response_result"]
        assert items, "the backend answered no result for the click"
        pred = np.zeros((h, w), bool)
        for it in items:
            assert it["type"] == "brushlabels" and it["from_name"] == "defect" and it["to_name"] == "image", it
            assert it["value"]["brushlabels"] == [defect] and (it["original_width"], it["original_height"]) == (w, h)
            pred |= decode_rle(it["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
        assert pred.any(), "the suggested brush mask is empty"
        iou = float((pred & gt).sum() / (pred | gt).sum())
        print(f"{defect}/{img_path.name}: click ({x}, {y}) -> mask of {int(pred.sum())} px, IoU with the "
              f"ground truth {iou:.3f}", file=sys.stderr)
        assert (pred & gt).any(), f"the suggested mask misses the clicked defect entirely (IoU {iou:.3f})"
        assert _cache_lookups(backend_server) > lookups_before, "the click never reached our backend"

        # ... and the page shows it as a suggestion (a brush region of the 'defect' BrushLabels).
        brush = [s for s in report["suggestions"] if s["type"] == "brushregion" and s["from_name"] == "defect"]
        assert brush and all(s["labels"] == [defect] for s in brush), report["suggestions"]
        assert re.fullmatch(r"[1-9]\d* suggestions?", report["suggestion_bar"]), report["suggestion_bar"]

        assert shot.exists(), "no screenshot was written"
        with Image.open(shot) as im:
            assert im.format == "PNG" and im.size == VIEWPORT, (im.format, im.size)
        print(f"screenshot: {shot}", file=sys.stderr)
    finally:
        # Label Studio autosaves the page's draft; leave the task as the other e2e tests expect it.
        try:
            for d in label_studio.api("GET", f"/api/tasks/{task_id}/drafts") or []:
                label_studio.api("DELETE", f"/api/drafts/{d['id']}/", expect=(200, 204))
        except (AssertionError, requests.RequestException) as e:
            print(f"could not delete the drafts of task {task_id}: {e}", file=sys.stderr)
