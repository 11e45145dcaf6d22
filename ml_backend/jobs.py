"""Background training jobs of one project, and the trained model each one serves.

A ``BackgroundJob`` answers ``start()`` at once and trains in a thread of its own; one job per
project and kind at a time (a second request while one runs is answered "already running"), and
one training of any kind per process at a time (``Backend.training_lock``: two would share the
cores and both take twice as long). The job writes its checkpoint atomically under a new version
name, loads it, records it in ``<project dir>/<current file>`` and only then swaps it in: the
model being served changes after the file is complete, and a failure keeps the previous model and
records the error. Serving never stops. Progress: log lines every 10 %, and ``status()`` (shown
per project in ``/health``).

With Redis configured (``queue.py``) a job is not run here: ``start()`` puts it on the queue, a
worker process (``worker.py``) runs ``run_inline()``, and ``status()`` / ``refresh()`` read its
state from the queue and its model from the shared project folder.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .errors import BackendError
from .images import utcnow

logger = logging.getLogger(__name__)


def predictor_loader(class_name: str) -> Callable:
    """(path, bank, device, extractor) -> ``adclick_core.inference.predictor.<class_name>`` loaded from a
    checkpoint a job wrote, on the shared click model's backbone (imported on first use)."""

    def load(path, bank, device, extractor):
        from adclick_core.inference import predictor

        return getattr(predictor, class_name).from_checkpoint(path, bank=bank, device=device, extractor=extractor)

    return load


class TrainedModel:
    """A checkpoint a job wrote for one project (its predictor loaded lazily after a restart)."""

    def __init__(self, version: str, path: Path, predictor: Any = None, summary: dict | None = None):
        self.version = version
        self.path = Path(path)
        self.predictor = predictor
        self.summary = summary or {}
        self.lock = threading.Lock()


class BackgroundJob:
    """Training state and the current model of one project and one kind of job (thread-safe).

    Subclasses set ``title`` (for messages), ``current_file``, ``version_prefix`` and
    ``file_prefix``, and implement ``_train()``, which returns a result dict with ``version``."""

    title = "training"
    current_file = "current.json"
    version_prefix = "model"
    file_prefix = "model"
    started_status, running_status = "started", "already running"

    def __init__(self, model):  # model: ml_backend.model.ADClickModel
        self.m = model
        self.current: TrainedModel | None = None
        self.state: dict = {"state": "idle", "percent": 0.0, "message": None, "started": None,
                            "finished": None, "last_request": None, "last_result": None, "error": None}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.on_progress: Callable[[dict], Any] | None = None  # a worker reports the state to the queue
        self._seen: int | None = None  # mtime of the current file when last read
        self._restore()

    # ---------------------------------------------------------------- persistence
    def refresh(self) -> None:
        """Serve the model another process (a queue worker, another replica) recorded in the shared
        project folder since this one last looked (a stat per call; the model loads on first use)."""
        f = self.m.dir / self.current_file
        try:
            seen = f.stat().st_mtime_ns
        except OSError:
            return
        if seen == self._seen:
            return
        self._seen = seen
        try:
            version = json.loads(f.read_text()).get("version")
        except (OSError, ValueError):
            return
        if self.current is None or version != self.current.version:
            logger.info("project %s: %s model %s recorded by another process: serving it",
                        self.m.project_id, self.title, version)
            self._restore()

    def _restore(self) -> None:
        f = self.m.dir / self.current_file
        try:
            meta = json.loads(f.read_text())
            path = Path(meta["path"])
            if path.is_file():
                self.current = TrainedModel(meta["version"], path, summary=meta.get("summary"))
                logger.info("project %s: %s model %s found (%s)", self.m.project_id, self.title, meta["version"], path)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - a broken pointer means "no model", never fatal
            logger.warning("project %s: cannot read %s: %s", self.m.project_id, f, e)

    def _swap_in(self, trained: TrainedModel) -> None:
        """Record ``trained`` as the project's model (atomically), then serve it."""
        self.m.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.m.dir / (self.current_file + ".tmp")
        tmp.write_text(json.dumps({"version": trained.version, "path": str(trained.path), "summary": trained.summary,
                                   "written": utcnow()}, indent=1, default=str))
        os.replace(tmp, self.m.dir / self.current_file)
        self.current = trained

    def _new_version(self) -> str:
        v = self.version_prefix + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        n, out = 1, v
        while (self.current and self.current.version == out) or self.checkpoint_path(out).exists():
            n += 1
            out = f"{v}-{n}"
        return out

    def checkpoint_path(self, version: str) -> Path:
        return self.m.dir / f"{self.file_prefix}-{version}.pt"

    # ---------------------------------------------------------------- status
    @property
    def queue(self):
        return self.m.backend.queue

    @property
    def running(self) -> bool:
        if self.queue is not None:
            return self.queue.running(self.file_prefix, self.m.project_id)
        # the recorded state decides: a thread that has recorded "done" / "failed" (and released the
        # training lock) is only unwinding, and a new request may start the next run
        return (self._thread is not None and self._thread.is_alive()
                and self.state.get("state") not in ("done", "failed"))

    def status(self) -> dict:
        self.refresh()
        out = dict(self.state)
        if self.queue is not None:
            out.update(self.queue.status(self.file_prefix, self.m.project_id) or {})
        out["model_version"] = self.current.version if self.current else None
        return out

    def _report(self) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(dict(self.state))
            except Exception as e:  # noqa: BLE001 - progress reports never stop a training
                logger.debug("progress report failed: %s", e)

    def _progress(self, fraction: float, message: str) -> None:
        pct = round(100.0 * max(0.0, min(1.0, float(fraction))), 1)
        last = self.state.get("percent") or 0.0
        self.state.update(percent=pct, message=message)
        self._report()
        if int(pct // 10) != int(last // 10) or pct >= 100.0:
            logger.info("project %s: %s %3.0f%%: %s", self.m.project_id, self.title, pct, message)

    # ---------------------------------------------------------------- the job
    def start(self, reason: str) -> dict:
        if self.queue is not None:
            return self._start_on_queue(reason)
        with self._lock:
            self.state["last_request"] = utcnow()
            if self.running:
                return {"status": self.running_status, "message": (
                    f"project {self.m.project_id}: {self.title} is already running "
                    f"({self.state.get('percent', 0):.0f}%): this request is ignored"),
                    "model_version": self.m.model_version}
            self.m.backend.require_disk(f"project {self.m.project_id}: {self.title}")
            self.state.update(state="running", percent=0.0, message=f"starting ({reason})", started=utcnow(),
                              finished=None, error=None)
            self._on_start()
            self._thread = threading.Thread(target=self._run, name=f"adclick-{self.file_prefix}-{self.m.project_id}",
                                            daemon=True)
            self._thread.start()
        logger.info("project %s: %s started (%s)", self.m.project_id, self.title, reason)
        return {"status": self.started_status, "message": (
            f"project {self.m.project_id}: {self.title} runs in the background; GET /health shows its progress"),
            "model_version": self.m.model_version}

    def _start_on_queue(self, reason: str) -> dict:
        with self._lock:
            self.state["last_request"] = utcnow()
            self.m.backend.require_disk(f"project {self.m.project_id}: {self.title}")
            args = {"project": self.m.project_id, "uid": self.m.uid, "label_config": self.m.label_config_xml,
                    "hostname": self.m.hostname, "reason": reason}
            if not self.queue.submit(self.file_prefix, self.m.project_id, args):
                return {"status": self.running_status, "message": (
                    f"project {self.m.project_id}: {self.title} is already queued or running on a worker: "
                    "this request is ignored"), "model_version": self.m.model_version}
            self._on_start()
        logger.info("project %s: %s queued (%s) on %s", self.m.project_id, self.title, reason, self.queue.queue.name)
        return {"status": self.started_status, "message": (
            f"project {self.m.project_id}: {self.title} is queued for a worker (RQ queue "
            f"{self.queue.queue.name}); GET /health shows its progress"), "model_version": self.m.model_version}

    def _on_start(self) -> None:
        """Called under the job's lock as a run starts."""

    def _run(self) -> None:
        try:
            self.run_inline()
        except Exception:  # noqa: BLE001 - run_inline logged it and recorded it in the state
            pass

    def run_inline(self) -> dict:
        """Train now, in this thread; the job's result. A failure is recorded, logged and raised
        (a queue worker reports it as the job's failure); the previous model keeps serving."""
        t0 = time.time()
        self.state.update(state="running", percent=0.0, started=self.state.get("started") or utcnow(), error=None)
        self._report()
        try:
            lock = self.m.backend.training_lock
            if not lock.acquire(blocking=False):
                self._progress(0.0, "waiting for another training job of this backend to finish")
                lock.acquire()
            try:
                result = self._train()
            finally:
                lock.release()
            result["seconds"] = round(time.time() - t0, 1)
            self.state.update(state="done", percent=100.0, message=f"done: model {result['version']}",
                              finished=utcnow(), last_result=result, error=None)
            self._report()
            logger.info("project %s: %s done in %.1f s: %s", self.m.project_id, self.title, time.time() - t0,
                        result["version"])
            return result
        except Exception as e:  # noqa: BLE001 - a failed job keeps the old model and says why
            msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            self.state.update(state="failed", message=f"failed: {msg}", finished=utcnow(), error=msg)
            self._report()
            previous = self.current.version if self.current else "none"
            if isinstance(e, (BackendError, ValueError)):
                logger.error("project %s: %s failed: %s (the previous model %s keeps serving)",
                             self.m.project_id, self.title, msg, previous)
            else:
                logger.exception("project %s: %s failed (the previous model %s keeps serving)",
                                 self.m.project_id, self.title, previous)
            raise

    def _train(self) -> dict:
        raise NotImplementedError

    def _reference_bank(self):
        """The project's reference bank, waited for: every job trains against it."""
        settings = self.m.backend.settings
        self._progress(0.0, "waiting for the reference bank")
        return self.m.references.require_bank(self.m.config, self.m.credentials, max(settings.bank_wait_s, 300.0),
                                              settings.bank_refresh_s)

    def _collect(self, cfg, creds, click_prob=None) -> tuple[list, dict]:
        """The project's finished annotations as ``SegItem``s (exported through Label Studio's API,
        images downloaded with the shared loader) and what was used or skipped and why."""
        from .convert import decode_image, first_image_url, seg_items_of, task_labels
        from .images import export_annotated_tasks

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

    def _serve(self, version: str, path: Path, bank, summary: dict) -> dict:
        """Load the checkpoint ``_train`` wrote and swap it in (the served model changes only
        now); the job's result. Under torchrun only the first process wrote it and serves it."""
        from adclick_core.training.distributed import Distributed

        if not Distributed.current().is_main:
            return {"version": version, "checkpoint": str(path), "summary": summary}
        if not Path(path).is_file():
            raise RuntimeError(f"{self.title} finished but {path} was not written")
        self._swap_in(TrainedModel(version, path, self._load(path, bank), summary))
        return {"version": version, "checkpoint": str(path), "summary": summary}

    # ---------------------------------------------------------------- serving
    def _loader(self):
        """(path, bank, device, extractor) -> predictor: how this kind's checkpoints load."""
        raise NotImplementedError

    def _load(self, path: Path, bank) -> Any:
        """A checkpoint of this job on ``bank``, on the shared click model's device and backbone."""
        shared = self.m.backend.predictor()
        return self._loader()(path, bank, getattr(shared, "device", "cpu"), shared.extractor)

    def predictor(self, bank) -> Any:
        """The current model's predictor (loaded on first use after a restart), or None."""
        self.refresh()
        current = self.current
        if current is None:
            return None
        with current.lock:
            if current.predictor is None:
                current.predictor = self._load(current.path, bank)
        return current.predictor
