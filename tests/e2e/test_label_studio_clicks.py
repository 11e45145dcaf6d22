"""End to end: a real Label Studio 1.23.2 + our backend under gunicorn + the real click model.

The project (``mtd_project`` in conftest): ``label_config/interactive_weak.xml``, MTD images through
a Local Storage, defect-free train/good images with an OK verdict annotation as the references,
the backend connected as interactive. Clicks go through Label Studio's ``interactive-annotating``
API at the positions the evaluation protocol picks (``next_eval_click``), as the browser sends them
(percent of the image, the whole click history each time); the RLE answer is decoded and compared
with the ground truth.

Run: ``pytest tests/e2e -v -s`` (the first run installs .lsvenv, ~1-2 min; LS starts in ~35 s).
Another checkpoint: ``ADCLICK_CHECKPOINT=path.pt pytest tests/e2e``.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from adclick_core.inference.clicks import next_eval_click

from .helpers import DATA, DEFECTS, MTD_SAMPLE, interactive, keypoint, verdict_result

pytestmark = pytest.mark.e2e

N_CLICKS = 3
IOU_MIN = 0.5
# Floors on the test's 10 images (2 per defect type of the committed sample, a spread of MTD):
# IoU >= 0.5 after 3 clicks on at least 80 % of them, mean IoU after 3 clicks >= 0.55 and at least
# 0.1 above the random walker's under the same protocol (measured with the shipped model: 8 of 10,
# mean 0.649; over all 50 sample images eval-click gives mIoU@3 0.575 vs the walker's 0.408).
# The masks that come back through Label Studio must also be the core's own answer for the same
# clicks (agreement: a wrong coordinate mapping, flipped axes or a broken RLE give ~0).
MIN_SHARE_AT_IOU_MIN = 0.8
MIN_MEAN_IOU = 0.55
MIN_GAIN_OVER_WALKER = 0.1
AGREEMENT_MIN = 0.95
# The quality floors hold for the committed sample; on a folder of ADCLICK_E2E_DATA the test asks
# for the classical baseline's quality at least and prints the figures.
ON_SAMPLE = DATA == MTD_SAMPLE.resolve()


def decode_answer(r: dict, w: int, h: int, label: str) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    for item in r["data"]["result"]:
        assert item["type"] == "brushlabels" and item["from_name"] == "defect" and item["to_name"] == "image"
        assert (item["original_width"], item["original_height"]) == (w, h)
        assert item["value"]["format"] == "rle" and item["value"]["brushlabels"] == [label]
        mask |= decode_rle(item["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
    return mask


def test_backend_connects_and_reports_health(mtd_project, backend_server):
    assert mtd_project["ml"]["state"] == "CO", mtd_project["ml"]
    assert mtd_project["ml"]["model_version"].startswith("ADClick-")
    h = backend_server.health()
    assert h["status"] == "UP" and "Interactive preannotations" in h["hint"]
    assert str(mtd_project["id"]) in h["projects"]


def test_clicks_become_masks_through_label_studio(label_studio, mtd_project, backend_server):
    import os

    from adclick_core.inference.predictor import ClickPredictor
    from adclick_core.features.reference import ReferenceBank

    # The same model and references as the backend, run directly: the backend must add nothing.
    core = ClickPredictor.from_checkpoint(os.environ.get("ADCLICK_CHECKPOINT") or None, device="cpu")
    core = core.with_bank(ReferenceBank.build(core.extractor, mtd_project["refs"], progress=False))
    ious, agreement, cold_ms, warm_ms, rows = [], [], [], [], []
    for defect, task_id, img_path, gt_path in mtd_project["defects"]:
        gt = np.asarray(Image.open(gt_path).convert("L")) > 127
        h, w = gt.shape
        with Image.open(img_path) as im:
            assert im.size == (w, h)
        state = core.set_image(img_path)
        clicks, pred, prob, iou_k, agree_k = [], None, None, [], []
        for k in range(N_CLICKS):
            c = next_eval_click(gt, pred, clicks)
            if c is None:
                break
            clicks.append(c)
            ctx = {"result": [keypoint(cl.x, cl.y, w, h, defect, cl.positive) for cl in clicks]}
            r, ms = interactive(label_studio, mtd_project["ml_id"], task_id, ctx)
            assert "errors" not in r, f"{img_path.name} click {k + 1}: {r['errors']}"
            (cold_ms if k == 0 else warm_ms).append(ms)
            pred = decode_answer(r, w, h, defect)
            prob = core.predict(state, clicks, prev_mask=prob)
            direct = prob > 0.5
            union = (pred | direct).sum()
            agree_k.append(float((pred & direct).sum() / union) if union else 1.0)
            inter, union = (pred & gt).sum(), (pred | gt).sum()
            iou_k.append(float(inter / union) if union else 1.0)
        ious.append(iou_k[-1])
        agreement.append(min(agree_k))
        rows.append({"image": f"{defect}/{img_path.name}", "size": [w, h],
                     "clicks": "".join("+" if c.positive else "-" for c in clicks),
                     "iou_per_click": [round(v, 3) for v in iou_k], "agreement_with_core": round(min(agree_k), 4)})
    walker = [_walker_iou_after(img_path, gt_path, N_CLICKS) for _, _, img_path, gt_path in mtd_project["defects"]]
    summary = {
        "iou_after_3": [round(v, 3) for v in ious],
        "random_walker_mean_iou_after_3": round(float(np.mean(walker)), 3),
        "n_iou_ge_0.5": sum(v >= IOU_MIN for v in ious),
        "mean_iou_after_3": round(float(np.mean(ious)), 3),
        "min_agreement_with_core": round(min(agreement), 4),
        "cold_click_ms_p50": round(statistics.median(cold_ms), 1),
        "warm_click_ms_p50": round(statistics.median(warm_ms), 1) if warm_ms else None,
        "per_image": rows,
    }
    print("\nADClick through Label Studio:", json.dumps(summary, indent=1), file=sys.stderr)
    assert backend_server.health()["state_cache"]["hits"] >= len(warm_ms), "later clicks must reuse the image state"
    assert min(agreement) >= AGREEMENT_MIN, summary
    if ON_SAMPLE:
        assert summary["n_iou_ge_0.5"] >= MIN_SHARE_AT_IOU_MIN * len(ious), summary
        assert summary["mean_iou_after_3"] >= MIN_MEAN_IOU, summary
        assert summary["mean_iou_after_3"] >= summary["random_walker_mean_iou_after_3"] + MIN_GAIN_OVER_WALKER, summary
    else:  # another product (ADCLICK_E2E_DATA): the floors above were measured on the sample
        assert summary["mean_iou_after_3"] >= summary["random_walker_mean_iou_after_3"], summary


def _walker_iou_after(img_path, gt_path, n_clicks: int) -> float:
    """The random walker's IoU after ``n_clicks`` of its own protocol clicks (the baseline)."""
    from adclick_core.inference.baselines import random_walker_probability
    from adclick_core.evaluation.clicks import simulate_clicks

    image = np.asarray(Image.open(img_path).convert("RGB"))
    gt = np.asarray(Image.open(gt_path).convert("L")) > 127
    ious, _ = simulate_clicks(lambda clicks, prev: random_walker_probability(image, clicks), gt, n_clicks, [n_clicks])
    return ious[-1]


# ---------------------------------------------------------------- bad input through Label Studio


def _error_of(r) -> str:
    assert "errors" in r and r["errors"], f"expected an error, got {str(r)[:300]}"
    return r["errors"][0]


def _one_click(x=50.0, y=50.0):
    return {"result": [{"type": "keypointlabels", "from_name": "click", "to_name": "image",
                        "value": {"x": x, "y": y, "keypointlabels": [DEFECTS[0]]}}]}


def test_unknown_image_url_is_a_clear_404(label_studio, mtd_project):
    r, _ = interactive(label_studio, mtd_project["ml_id"], mtd_project["missing_task"], _one_click())
    err = _error_of(r)
    assert err.startswith("404") and "not found" in err and "this_file_does_not_exist.jpg" in err, err


def test_clicks_outside_the_image_are_a_clear_400(label_studio, mtd_project):
    err = _error_of(interactive(label_studio, mtd_project["ml_id"], mtd_project["any_task"], _one_click(150.0))[0])
    assert err.startswith("400") and "outside the image" in err, err


def test_empty_context_is_a_clear_400(label_studio, mtd_project):
    err = _error_of(interactive(label_studio, mtd_project["ml_id"], mtd_project["any_task"], {"result": []})[0])
    assert err.startswith("400") and "empty context" in err, err


def test_wrong_api_key_is_reported_by_name(label_studio, mtd_project, start_backend):
    with start_backend(LABEL_STUDIO_API_KEY="x" * 40, ADCLICK_PRELOAD="0") as other:
        ml = label_studio.api("POST", "/api/ml", json={"url": other.url, "project": mtd_project["id"],
                                                       "is_interactive": True, "title": "wrong key"})
        try:
            err = _error_of(interactive(label_studio, ml["id"], mtd_project["any_task"], _one_click())[0])
            assert err.startswith("424") and "LABEL_STUDIO_API_KEY" in err and "401" in err, err
        finally:
            label_studio.api("DELETE", f"/api/ml/{ml['id']}", expect=(200, 204))


def test_basic_auth_is_what_label_studio_connects_with(label_studio, mtd_project, backend_server):
    """The test-run backend wants Basic credentials (every other test here goes through Label
    Studio connected with them); without them it answers 401, and Connect Model with a wrong
    password or none is refused by Label Studio with the reason."""
    import requests

    assert backend_server.auth is not None
    r = requests.post(backend_server.url + "/predict", json={"tasks": [{"id": 1, "data": {}}]}, timeout=10)
    assert r.status_code == 401 and "BASIC_AUTH_USER" in r.json()["error"], r.text
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert set(requests.get(backend_server.url + "/health", timeout=5).json()) == {"status", "auth"}
    for fields, words in (({**backend_server.ml_backend_fields(), "basic_auth_pass": "wrong"}, "authentication"),
                          ({"url": backend_server.url}, "401")):
        r = label_studio.session.post(label_studio.url + "/api/ml", json={
            **fields, "project": mtd_project["id"], "is_interactive": True, "title": "bad credentials"}, timeout=60)
        assert r.status_code == 400 and words in r.text, (r.status_code, r.text[:500])


# ---------------------------------------------------------------- training, pre-annotation, webhooks


def test_batch_preannotation_answers_every_task(label_studio, mtd_project, backend_server):
    """Without a trained ADClick-Seg model, batch pre-annotation answers one (empty) prediction per
    task, stamped with the backend's model version, and the reason is logged. (Start Training and
    pre-annotation with the trained model: test_label_studio_training.py, which runs after this.)"""
    ls = label_studio
    ids = [t for _, t, _, _ in mtd_project["defects"]][:3]
    out = ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={mtd_project['id']}",
                 json={"selectedItems": {"all": False, "included": ids}})
    assert out is None or "error" not in str(out).lower(), out
    version = ls.api("GET", f"/api/ml/{mtd_project['ml_id']}")["model_version"]
    for tid in ids:
        preds = ls.api("GET", f"/api/predictions/?task={tid}")
        assert preds, f"task {tid} got no prediction"
        assert all(p["model_version"] == version and p["result"] == [] for p in preds), preds
    assert "no ADClick-Seg model" in backend_server.log.read_text()


def test_ok_tag_webhook_extends_the_reference_bank(label_studio, mtd_project, backend_server, mtd_dir):
    """Submitting an OK verdict in Label Studio reaches /webhook and adds the image to the bank."""
    from .helpers import import_tasks, local_url

    ls = label_studio
    pid = str(mtd_project["id"])

    def n_refs():
        return backend_server.health()["projects"][pid]["reference_bank"]["references"]

    deadline = time.time() + 120
    while n_refs() < mtd_project["n_refs"] and time.time() < deadline:
        time.sleep(1)
    before = n_refs()
    assert before >= mtd_project["n_refs"], backend_server.health()["projects"][pid]
    new = mtd_project["goods_unused"][0]
    tid = import_tasks(ls, mtd_project["id"], [{"data": {"image": local_url(new, mtd_dir)}}])[local_url(new, mtd_dir)]
    ls.api("POST", f"/api/tasks/{tid}/annotations/", json={"result": verdict_result("OK")})
    deadline = time.time() + 60
    while n_refs() <= before and time.time() < deadline:
        time.sleep(0.5)
    assert n_refs() == before + 1, backend_server.health()["projects"][pid]
