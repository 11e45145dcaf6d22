"""ADClick-Seg per project: the background training job (Start Training) and the trained model
that answers pre-annotation.

* ``SegJob.start()`` answers at once; one job per project at a time (a second request while one
  runs is answered "already training"). The job exports the project's finished annotations
  through Label Studio's API, turns them into ``SegItem``s (``convert.task_labels`` /
  ``convert.seg_items_of``), downloads the images with the shared loader, trains with
  ``adclick_core.seg_training.train_seg`` on the project's reference bank with the click model's
  backbone and residual config, writes ``<project dir>/seg-<version>.pt`` atomically, loads it, and
  only then swaps it in: the project's ``model_version`` changes after the file is complete.
  A failure keeps the previous model and records the error. Serving never stops.
* Progress: log lines with percent, and ``status()`` (shown per project in ``/health``).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .convert import decode_image, first_image_url, seg_items_of, task_labels
from .errors import BackendError
from .images import export_annotated_tasks, utcnow

logger = logging.getLogger(__name__)

CURRENT_FILE = "seg_current.json"


def default_trainer(items, extractor, bank, iterations, residual_config, defect_types, out, progress, device):
    """Calls ``train_seg``; without a text encoder installed, trains without the language branch."""
    from adclick_core.errors import MissingWeightsError
    from adclick_core.seg_training import SegTrainConfig, train_seg

    kw = dict(residual_config=residual_config, defect_types=list(defect_types), out=out, progress=progress,
              device=device)
    try:
        return train_seg(items, extractor, bank, SegTrainConfig(iterations=iterations), **kw)
    except MissingWeightsError as e:
        logger.warning("ADClick-Seg: no text encoder (%s): training without the language branch", e)
        return train_seg(items, extractor, bank, SegTrainConfig(iterations=iterations, language=False), **kw)


def default_loader(path, bank, device, extractor):
    from adclick_core.predictor import SegPredictor

    return SegPredictor.from_checkpoint(path, bank=bank, device=device, extractor=extractor)


class SegModel:
    """A loaded ADClick-Seg checkpoint of one project."""

    def __init__(self, version: str, path: Path, predictor: Any = None, summary: dict | None = None):
        self.version = version
        self.path = Path(path)
        self.predictor = predictor  # loaded lazily after a restart
        self.summary = summary or {}
        self.lock = threading.Lock()


class SegJob:
    """Training state and the current ADClick-Seg model of one project (thread-safe)."""

    def __init__(self, model):  # model: ml_backend.model.ADClickModel
        self.m = model
        self.current: SegModel | None = None
        self.state: dict = {"state": "idle", "percent": 0.0, "message": None, "started": None,
                            "finished": None, "last_request": None, "last_result": None, "error": None}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.annotations_since = 0
        self._restore()

    # ---------------------------------------------------------------- persistence
    def _restore(self) -> None:
        f = self.m.dir / CURRENT_FILE
        try:
            meta = json.loads(f.read_text())
            path = Path(meta["path"])
            if path.is_file():
                self.current = SegModel(meta["version"], path, summary=meta.get("summary"))
                logger.info("project %s: ADClick-Seg model %s found (%s)", self.m.project_id, meta["version"], path)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - a broken pointer means "no model", never fatal
            logger.warning("project %s: cannot read %s: %s", self.m.project_id, f, e)

    def _write_current(self, seg: SegModel) -> None:
        self.m.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.m.dir / (CURRENT_FILE + ".tmp")
        tmp.write_text(json.dumps({"version": seg.version, "path": str(seg.path), "summary": seg.summary,
                                   "written": utcnow()}, indent=1, default=str))
        os.replace(tmp, self.m.dir / CURRENT_FILE)

    # ---------------------------------------------------------------- status
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        out = dict(self.state)
        out["model_version"] = self.current.version if self.current else None
        return out

    def _progress(self, fraction: float, message: str) -> None:
        pct = round(100.0 * max(0.0, min(1.0, float(fraction))), 1)
        last = self.state.get("percent") or 0.0
        self.state.update(percent=pct, message=message)
        if int(pct // 10) != int(last // 10) or pct >= 100.0:
            logger.info("project %s: ADClick-Seg training %3.0f%%: %s", self.m.project_id, pct, message)

    # ---------------------------------------------------------------- the job
    def start(self, reason: str = "START_TRAINING") -> dict:
        with self._lock:
            self.state["last_request"] = utcnow()
            if self.running:
                return {"status": "already training", "message": (
                    f"project {self.m.project_id}: ADClick-Seg training is already running "
                    f"({self.state.get('percent', 0):.0f}%): this request is ignored"),
                    "model_version": self.m.model_version}
            self.state.update(state="running", percent=0.0, message=f"starting ({reason})", started=utcnow(),
                              finished=None, error=None)
            self.annotations_since = 0
            self._thread = threading.Thread(target=self._run, name=f"adclick-train-{self.m.project_id}",
                                            daemon=True)
            self._thread.start()
        logger.info("project %s: ADClick-Seg training started (%s)", self.m.project_id, reason)
        return {"status": "training started", "message": (
            f"project {self.m.project_id}: ADClick-Seg training runs in the background; "
            "GET /health shows its progress"), "model_version": self.m.model_version}

    def _run(self) -> None:
        t0 = time.time()
        try:
            result = self._train()
            result["seconds"] = round(time.time() - t0, 1)
            self.state.update(state="done", percent=100.0, message=f"done: model {result['version']}",
                              finished=utcnow(), last_result=result, error=None)
            logger.info("project %s: ADClick-Seg training done in %.1f s: %s", self.m.project_id,
                        time.time() - t0, result["version"])
        except Exception as e:  # noqa: BLE001 - a failed job keeps the old model and says why
            msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            self.state.update(state="failed", message=f"failed: {msg}", finished=utcnow(), error=msg)
            if isinstance(e, (BackendError, ValueError)):
                logger.error("project %s: ADClick-Seg training failed: %s (the previous model %s keeps serving)",
                             self.m.project_id, msg, self.current.version if self.current else "none")
            else:
                logger.exception("project %s: ADClick-Seg training failed (the previous model keeps serving)",
                                 self.m.project_id)

    def _collect(self, cfg, creds, click_prob=None) -> tuple[list, dict]:
        pid = self.m.project_id
        self._progress(0.0, "exporting annotations from Label Studio")
        tasks = export_annotated_tasks(creds, pid)
        items: list = []
        skipped: dict[str, int] = {}
        usable = []
        for t in tasks:
            labels, why = task_labels(t, cfg)
            if labels is None:
                logger.info("project %s: task %s not used for training: %s", pid, t.get("id"), why)
                skipped[why] = skipped.get(why, 0) + 1
                continue
            usable.append(labels)
        for i, labels in enumerate(usable):
            tid = labels.task.get("id")
            try:
                data = self.m.backend.loader.fetch(first_image_url(labels.task, cfg), creds, task_id=tid)
                image = decode_image(data)
                items += seg_items_of(labels, image, click_prob)
            except (BackendError, ValueError, KeyError) as e:
                why = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                logger.warning("project %s: task %s not used for training: %s", pid, tid, why)
                skipped["image or mask unusable"] = skipped.get("image or mask unusable", 0) + 1
            self._progress(0.0, f"reading annotated images {i + 1}/{len(usable)}")
        return items, {"exported_tasks": len(tasks), "used_tasks": len(usable) - skipped.get("image or mask unusable", 0),
                       "skipped": skipped}

    def _prompt_boxes(self, items: list, pred) -> list:
        """Box-only items -> the click model's answer to the box (``adclick_core.box_prompts``), so a
        rectangle trains like the clicks an annotator would have made inside it."""
        from adclick_core.box_prompts import box_prompted_item
        from adclick_core.seg_training import item_label_kind

        n = sum(item_label_kind(it) == "boxes" for it in items)
        out, done = [], 0
        for it in items:
            if item_label_kind(it) != "boxes":
                out.append(it)
                continue
            done += 1
            self._progress(0.0, f"prompting the click model with the boxes of image {done}/{n}")
            try:
                out.append(box_prompted_item(pred, it))
            except ValueError as e:  # one odd image must not sink the job: it keeps its plain box labels
                logger.warning("project %s: boxes of a %s image not prompted (%s): trained as plain boxes",
                               self.m.project_id, it.defect_type, e)
                out.append(it)
        if n:
            logger.info("project %s: %d box-labelled item(s) turned into click pseudo labels", self.m.project_id, n)
        return out

    @staticmethod
    def _click_replay(pred):
        """(image, clicks, defect type) -> the click model's answer after the last click, replayed
        click by click with the previous answer as the annotator did."""
        last: list = [None, None]  # (image, state): one image's state serves all its labels

        def replay(image, clicks, defect_type):
            if last[0] is not image:
                last[0], last[1] = image, pred.set_image(image)
            prob = None
            for k in range(1, len(clicks) + 1):
                prob = pred.predict(last[1], list(clicks[:k]), prev_mask=prob, defect_type=defect_type)
            if prob is None:
                raise ValueError("no clicks")
            return prob

        return replay

    def _new_version(self) -> str:
        v = "ADClick-Seg-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        n, out = 1, v
        while (self.current and self.current.version == out) or (self.m.dir / f"seg-{out}.pt").exists():
            n += 1
            out = f"{v}-{n}"
        return out

    def _train(self) -> dict:
        m, backend = self.m, self.m.backend
        cfg, creds = m.config, m.credentials
        self._progress(0.0, "waiting for the reference bank")
        bank = m.references.require_bank(cfg, creds, max(backend.settings.bank_wait_s, 300.0),
                                         backend.settings.bank_refresh_s)
        click = backend.predictor()
        click_for_bank = m.click_predictor(bank)
        items, collected = self._collect(cfg, creds, self._click_replay(click_for_bank))
        items = self._prompt_boxes(items, click_for_bank)
        if not items:
            raise ValueError(
                f"nothing to train on: {collected['exported_tasks']} annotated task(s) exported, none with a "
                f"brush mask, rectangle or OK/NG verdict ({collected['skipped']})")
        version = self._new_version()
        m.dir.mkdir(parents=True, exist_ok=True)
        path = m.dir / f"seg-{version}.pt"
        iterations = backend.settings.seg_iterations
        logger.info("project %s: training ADClick-Seg on %d item(s) from %d task(s), %d iterations -> %s",
                    m.project_id, len(items), collected["used_tasks"], iterations, path)
        _, summary = backend.seg_trainer(
            items, click.extractor, bank, iterations, getattr(click, "residual_config", None),
            cfg.defect_types, path, self._progress, getattr(click, "device", "cpu"))
        if not Path(path).is_file():
            raise RuntimeError(f"training finished but {path} was not written")
        predictor = backend.seg_loader(path, bank, getattr(click, "device", "cpu"), click.extractor)
        summary = {**(summary or {}), **collected}
        seg = SegModel(version, path, predictor, summary)
        self._write_current(seg)
        self.current = seg  # the swap: model_version changes only now
        return {"version": version, "checkpoint": str(path), "summary": summary}

    # ---------------------------------------------------------------- serving
    def predictor(self, bank) -> Any:
        """The current Seg predictor (loaded on first use after a restart), or None."""
        seg = self.current
        if seg is None:
            return None
        with seg.lock:
            if seg.predictor is None:
                click = self.m.backend.predictor()
                seg.predictor = self.m.backend.seg_loader(seg.path, bank, getattr(click, "device", "cpu"),
                                                          click.extractor)
        return seg.predictor
