"""Training and adaptation as jobs on a Redis queue (RQ), for more than one machine.

Set ``REDIS_URL`` (``redis://host:6379/0``), or the variables Label Studio's own ML backends use
(``REDIS_HOST``, ``REDIS_PORT``), and every replica of the backend puts *Start Training* and click
adaptations on the queue ``RQ_QUEUE_NAME`` (default ``adclick``) instead of training in a thread of
its own; ``adclick worker`` (``ml_backend.worker``) runs them, on any machine that sees the same
``ADCLICK_MODEL_DIR`` (a shared volume). Without Redis the embedded default stays: a thread.

* one job per project and kind across all replicas: Redis names the latest job of each project
  and kind (``adclick-job-<kind>-<project>``), and a request while that job is queued or running is
  answered "already running";
* its state and progress (the worker writes them into the job's ``meta``) are what every replica's
  ``/health`` shows;
* a worker killed mid-job stops sending heartbeats; RQ then moves the job to its failed registry
  (``failed: the worker stopped``, about a minute later) and the next request starts a new one.
  The checkpoint is written to a temporary name and renamed, so a killed worker leaves no
  half-written model, and the replicas keep serving the previous one;
* replicas read new model versions from the shared folder (``BackgroundJob.refresh``), and a
  project's first reference bank is built by one replica while the others wait on a Redis lock.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any

from redis.exceptions import RedisError

from .errors import ServiceUnavailable

logger = logging.getLogger(__name__)

JOB_TIMEOUT_S = 6 * 3600
HEARTBEAT_S = 10  # the worker's job monitoring interval: a killed worker is noticed ~60 s after this


def redis_url() -> str | None:
    url = os.environ.get("REDIS_URL")
    if url:
        return url
    host = os.environ.get("REDIS_HOST")
    if host:
        return f"redis://{host}:{os.environ.get('REDIS_PORT') or 6379}/{os.environ.get('REDIS_DB') or 0}"
    return None


def queue_name() -> str:
    return os.environ.get("RQ_QUEUE_NAME") or "adclick"


def job_key(kind: str, project_id: str) -> str:
    """The Redis key that names the id of the project's latest job of ``kind``."""
    return f"adclick-job-{kind}-{project_id}"


_STATES = {"queued": "queued", "deferred": "queued", "scheduled": "queued", "started": "running",
           "finished": "done", "failed": "failed", "stopped": "failed", "canceled": "failed"}


class RedisJobs:
    """The replicas' side of the queue: submit a project's job once, read its state."""

    def __init__(self, url: str, name: str | None = None):
        from redis import Redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry
        from rq import Queue

        self.url = url
        # a /health must not hang on a Redis that is gone: short connect timeout, two quick retries
        self.redis = Redis.from_url(url, socket_connect_timeout=3, socket_timeout=30,
                                    retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 2))
        self.queue = Queue(name or queue_name(), connection=self.redis)

    @classmethod
    def from_env(cls) -> "RedisJobs | None":
        url = redis_url()
        return cls(url) if url else None

    def _job(self, kind: str, project_id: str):
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        latest = self.redis.get(job_key(kind, project_id))
        if latest is None:
            return None
        try:
            return Job.fetch(latest.decode(), connection=self.redis)
        except NoSuchJobError:
            return None

    def _reap(self) -> None:
        """Jobs whose worker stopped sending heartbeats (killed) go to the failed registry now."""
        try:
            self.queue.started_job_registry.cleanup()
        except Exception as e:  # noqa: BLE001 - a status read must not fail on maintenance
            logger.debug("started-job registry cleanup: %s", e)

    def status(self, kind: str, project_id: str) -> dict | None:
        """``{"state", "percent", "message", "error", "worker", "result"}`` of the project's latest job
        (Redis unreachable: a state that says so, never an exception)."""
        try:
            return self._status(kind, project_id)
        except RedisError as e:
            return {"state": "unknown", "error": f"the job queue at {self.url} is not reachable: {type(e).__name__}"}

    def running(self, kind: str, project_id: str) -> bool:
        st = self.status(kind, project_id)
        return st is not None and st["state"] in ("queued", "running")

    def _status(self, kind: str, project_id: str) -> dict | None:
        self._reap()
        job = self._job(kind, project_id)
        if job is None:
            return None
        raw = job.get_status(refresh=True)
        raw = getattr(raw, "value", raw)
        state = _STATES.get(str(raw), str(raw))
        meta = job.get_meta(refresh=True) or {}
        out = {"state": state, "percent": meta.get("percent", 100.0 if state == "done" else 0.0),
               "message": meta.get("message"), "worker": meta.get("worker"), "queue": self.queue.name,
               "started": meta.get("started"), "finished": meta.get("finished"), "error": None,
               "last_result": None}
        if state == "failed":
            out["error"] = meta.get("error") or _failure(job)
            out["message"] = f"failed: {out['error']}"
        elif state == "done":
            out["last_result"] = job.return_value()
        return out

    def submit(self, kind: str, project_id: str, args: dict[str, Any]) -> bool:
        """Queue ``ml_backend.worker.run_job(kind, **args)`` unless this project's job of this kind is
        queued or running (then False). A Redis lock makes the check and the enqueue one step
        across replicas. Redis unreachable: 503."""
        try:
            return self._submit(kind, project_id, args)
        except RedisError as e:
            raise ServiceUnavailable(f"the job queue at {self.url} is not reachable ({type(e).__name__}): "
                                     "check REDIS_URL / REDIS_HOST and that Redis runs") from None

    def _submit(self, kind: str, project_id: str, args: dict[str, Any]) -> bool:
        with self.redis.lock(f"adclick-submit-{kind}-{project_id}", timeout=30, blocking_timeout=30):
            st = self._status(kind, project_id)
            if st is not None and st["state"] in ("queued", "running"):
                return False
            # a new id per run (old runs expire on their own): the latest is what every replica shows
            new_id = f"adclick-{kind}-{project_id}-{uuid.uuid4().hex[:12]}"
            self.queue.enqueue("ml_backend.worker.run_job", job_id=new_id, job_timeout=JOB_TIMEOUT_S,
                               result_ttl=7 * 86400, failure_ttl=7 * 86400, args=(kind,), kwargs=args)
            self.redis.set(job_key(kind, project_id), new_id)
        return True

    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float):
        """A lock every replica sees (a reference-bank build); waits at most ``timeout_s``."""
        lock = self.redis.lock(f"adclick-lock-{name}", timeout=max(60, int(timeout_s) * 2),
                               blocking_timeout=timeout_s)
        got = lock.acquire()
        try:
            yield got
        finally:
            if got:
                with contextlib.suppress(Exception):
                    lock.release()


def _failure(job) -> str:
    try:
        result = job.latest_result()
        text = (getattr(result, "exc_string", None) or "").strip().splitlines()
        if text:
            return text[-1][:500]
    except Exception:  # noqa: BLE001
        pass
    return "the worker stopped before the job finished (killed or out of memory)"
