"""End to end: per-project adaptation of the click model through a real Label Studio 1.23.2.

A backend of its own (``ADCLICK_ADAPT_MIN_REFERENCES`` = 12, a short ``ADCLICK_ADAPT_ITERATIONS``)
and a project of its own: 8 OK-tagged references, then an annotator tags 4 more tasks OK in Label
Studio. The webhooks bring them to the backend, the bank reaches 12 and the adaptation starts by
itself; clicks keep being answered meanwhile. When it is done the project's clicks are answered
by the adapted model (the answer through Label Studio is the adapted checkpoint's own answer to
the same click), and a restart of the backend finds it again. A second project learns from its
annotators' brush masks: after ``ADCLICK_LEARN_MASKS`` submitted masks the adaptation starts by
itself, exports them through Label Studio's API, and the project's clicks are then answered by the
model that learnt from them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from .helpers import (CONFIG, DEFECTS, brush_result, import_tasks, interactive, keypoint, local_url, pick_defects,
                      pick_references, verdict_result)

pytestmark = pytest.mark.e2e

MIN_REFERENCES = 12
ITERATIONS = 20
ADAPT_TIMEOUT_S = 600  # a 24-sample pool and 20 iterations take about a minute on 2 busy cores


def _click(ls, ml_id: int, task_id: int, img: Path, gt: np.ndarray, label: str):
    """One positive click at the ground truth's deepest point, through Label Studio: (mask, click)."""
    from adclick_core.inference.clicks import next_eval_click

    h, w = gt.shape
    c = next_eval_click(gt, np.zeros_like(gt))
    r, _ = interactive(ls, ml_id, task_id, {"result": [keypoint(c.x, c.y, w, h, label, True)]})
    mask = np.zeros((h, w), bool)
    for item in r["data"]["result"]:
        mask |= decode_rle(item["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
    return mask, c


def _project(ls, backend, mtd_dir: Path, title: str, tasks: list[dict]) -> tuple[int, dict[str, int], int]:
    """A project of its own on the MTD folder (Local Storage) with ``tasks``, connected to ``backend``
    as its interactive ML backend: (project id, image URL -> task id, ML backend id)."""
    pid = ls.api("POST", "/api/projects", json={"title": title, "label_config": CONFIG})["id"]
    ls.api("POST", "/api/storages/localfiles", json={
        "project": pid, "path": str(mtd_dir), "title": "MTD", "use_blob_urls": True, "regex_filter": "^$"})
    by_url = import_tasks(ls, pid, tasks)
    ml_id = ls.api("POST", "/api/ml", json={"url": backend.url, "project": pid, "is_interactive": True,
                                            "title": title})["id"]
    return pid, by_url, ml_id


def _adaptation(backend, pid: int) -> dict:
    return backend.health()["adaptation"]["projects"].get(str(pid), {})


def test_ok_tags_in_label_studio_adapt_the_click_model_of_their_project(label_studio, start_backend, mtd_dir):
    from adclick_core.inference.predictor import ClickPredictor
    from adclick_core.features.reference import ReferenceBank

    ls = label_studio
    refs = pick_references(mtd_dir, MIN_REFERENCES)
    defect, img, gt_path = pick_defects(mtd_dir, per_type=1)[0]
    gt = np.asarray(Image.open(gt_path).convert("L")) > 127
    env = {"ADCLICK_ADAPT_MIN_REFERENCES": str(MIN_REFERENCES), "ADCLICK_ADAPT_ITERATIONS": str(ITERATIONS)}
    with start_backend(**env) as backend:
        tasks = [{"data": {"image": local_url(g, mtd_dir)}, "annotations": [{"result": verdict_result("OK")}]}
                 for g in refs[:8]]
        tasks += [{"data": {"image": local_url(g, mtd_dir)}} for g in refs[8:]]
        tasks.append({"data": {"image": local_url(img, mtd_dir), "defect": defect}})
        pid, by_url, ml_id = _project(ls, backend, mtd_dir, "ADClick adaptation", tasks)
        task_id = by_url[local_url(img, mtd_dir)]
        v0 = backend.health()["projects"][str(pid)]["click_model"]

        before, click = _click(ls, ml_id, task_id, img, gt, defect)  # builds the bank: 8 references
        assert before.any() and _adaptation(backend, pid)["state"] == "idle"

        for g in refs[8:]:  # the annotator tags 4 more tasks OK: webhooks -> bank of 12 -> adaptation
            ls.api("POST", f"/api/tasks/{by_url[local_url(g, mtd_dir)]}/annotations/",
                   json={"result": verdict_result("OK")})
        t0, st, answered_meanwhile = time.time(), {}, 0
        while time.time() - t0 < ADAPT_TIMEOUT_S:
            st = _adaptation(backend, pid)
            if st.get("state") in ("done", "failed"):
                break
            if st.get("state") == "running" and not answered_meanwhile:
                assert _click(ls, ml_id, task_id, img, gt, defect)[0].any()  # clicks go on meanwhile
                answered_meanwhile = 1
            time.sleep(1.0)
        assert st.get("state") == "done", f"adaptation did not finish in {ADAPT_TIMEOUT_S} s: {st}"
        summary = st["last_result"]["summary"]
        print(f"\nadaptation on {summary['references']} references: {st['last_result']['seconds']} s, "
              f"pool {summary.get('pool_size')}", file=sys.stderr)
        assert summary["references"] == MIN_REFERENCES and answered_meanwhile
        version = st["model_version"]
        assert version.startswith("ADClick-adapted-") and version != v0
        assert backend.health()["projects"][str(pid)]["click_model"] == version
        assert "click model adaptation 100%" in backend.log.read_text(), "progress is logged with percent"

        after, _ = _click(ls, ml_id, task_id, img, gt, defect)
        ckpt = Path(st["last_result"]["checkpoint"])
        core = ClickPredictor.from_checkpoint(ckpt, device="cpu")
        core = core.with_bank(ReferenceBank.build(core.extractor, refs, progress=False))
        own = core.predict(core.set_image(img), [click]) >= 0.5
        agreement = (own & after).sum() / max(1, (own | after).sum())
        assert agreement >= 0.95, f"the answer through Label Studio is not the adapted model's own ({agreement:.3f})"
        assert core.checkpoint_info["adapted"]["references"] == MIN_REFERENCES

        backend.stop()  # a restart on the same model folder finds the adapted model again
        backend.start()
        again, _ = _click(ls, ml_id, task_id, img, gt, defect)
        assert backend.health()["projects"][str(pid)]["click_model"] == version
        assert (again & after).sum() / max(1, (again | after).sum()) >= 0.95


def test_brush_masks_submitted_in_label_studio_teach_the_click_model_of_their_project(label_studio, start_backend,
                                                                                       mtd_dir):
    from adclick_core.inference.predictor import ClickPredictor
    from adclick_core.features.reference import ReferenceBank

    ls = label_studio
    refs = pick_references(mtd_dir, 8)
    defects = pick_defects(mtd_dir, per_type=-(-4 // len(DEFECTS)))[:4]  # 4 images whatever the number of types
    (defect, img, gt_path), annotated = defects[0], defects[1:4]
    gt = np.asarray(Image.open(gt_path).convert("L")) > 127
    masks = 3
    env = {"ADCLICK_LEARN_MASKS": str(masks), "ADCLICK_ADAPT_ITERATIONS": str(ITERATIONS)}
    with start_backend(**env) as backend:
        tasks = [{"data": {"image": local_url(g, mtd_dir)}, "annotations": [{"result": verdict_result("OK")}]}
                 for g in refs]
        tasks += [{"data": {"image": local_url(p, mtd_dir), "defect": d}} for d, p, _ in [defects[0], *annotated]]
        pid, by_url, ml_id = _project(ls, backend, mtd_dir, "ADClick masks", tasks)
        task_id = by_url[local_url(img, mtd_dir)]
        v0 = backend.health()["projects"][str(pid)]["click_model"]
        before, click = _click(ls, ml_id, task_id, img, gt, defect)
        assert before.any() and _adaptation(backend, pid)["state"] == "idle"

        for d, p, m in annotated:  # the annotator submits three painted masks
            painted = np.asarray(Image.open(m).convert("L")) > 127
            ls.api("POST", f"/api/tasks/{by_url[local_url(p, mtd_dir)]}/annotations/",
                   json={"result": [brush_result(painted, d)]})
        t0, st = time.time(), {}
        while time.time() - t0 < ADAPT_TIMEOUT_S:
            st = _adaptation(backend, pid)
            if st.get("state") in ("done", "failed"):
                break
            time.sleep(1.0)
        assert st.get("state") == "done", f"learning from masks did not finish in {ADAPT_TIMEOUT_S} s: {st}"
        summary = st["last_result"]["summary"]
        print(f"\nlearning from {summary['masks']} masks and {summary['references']} references: "
              f"{st['last_result']['seconds']} s, pool {summary.get('pool_size')}", file=sys.stderr)
        assert summary["masks"] == masks and summary["references"] == len(refs)
        version = st["model_version"]
        assert version.startswith("ADClick-adapted-") and version != v0
        assert backend.health()["projects"][str(pid)]["click_model"] == version

        after, _ = _click(ls, ml_id, task_id, img, gt, defect)
        core = ClickPredictor.from_checkpoint(Path(st["last_result"]["checkpoint"]), device="cpu")
        assert core.checkpoint_info["adapted"]["masks"] == masks
        core = core.with_bank(ReferenceBank.build(core.extractor, refs, progress=False))
        own = core.predict(core.set_image(img), [click]) >= 0.5
        agreement = (own & after).sum() / max(1, (own | after).sum())
        assert agreement >= 0.95, f"the answer through Label Studio is not the taught model's own ({agreement:.3f})"
