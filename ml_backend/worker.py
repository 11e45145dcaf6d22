"""``adclick worker``: runs the backend's training and adaptation jobs from the Redis queue.

    REDIS_URL=redis://redis:6379/0 ADCLICK_MODEL_DIR=/shared/models \\
        LABEL_STUDIO_URL=... LABEL_STUDIO_API_KEY=... adclick worker

Start it on any machine that sees the replicas' ``ADCLICK_MODEL_DIR`` (a shared volume) and can
reach Label Studio; it trains on the GPU when there is one (``ADCLICK_DEVICE``). Each job runs in
a fresh child process (RQ's forking worker; a crash or a kill takes only that job), reports its
progress into the job for every replica's ``/health``, and writes its model to the project folder,
where the replicas pick it up. See ``queue.py`` for the guarantees.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from .queue import HEARTBEAT_S, queue_name, redis_url

logger = logging.getLogger(__name__)

KINDS = {"seg": "seg", "click": "adapt"}  # job kind (checkpoint prefix) -> the project's job attribute


def run_job(kind: str, project: str, uid: str | None = None, label_config: str | None = None,
            hostname: str | None = None, reason: str = "queued") -> dict:
    """One queued job: the project's ``BackgroundJob`` of ``kind`` trained here, inline."""
    from rq import get_current_job

    from .images import utcnow
    from .model import Backend

    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    backend = Backend(queue=False)  # in the worker the job runs here, not on the queue again
    model = backend.model_for(uid or project, label_config=label_config, hostname=hostname)
    job = getattr(model, KINDS[kind])
    rq_job = get_current_job()
    if rq_job is not None:
        worker = f"{socket.gethostname()}:{os.getpid()}"
        rq_job.meta.update(worker=worker, started=utcnow(), reason=reason)
        rq_job.save_meta()

        def report(state: dict) -> None:
            rq_job.meta.update({k: state.get(k) for k in ("state", "percent", "message", "error", "finished")})
            rq_job.save_meta()

        job.on_progress = report
    logger.info("project %s: %s from the queue (%s)", model.project_id, job.title, reason)
    try:
        return job.run_inline()
    finally:
        backend.executor.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adclick worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", action="store_true", help="run the queued jobs, then exit")
    ap.add_argument("--name", default=None, help="worker name (default: host and process id)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, os.environ.get("ADCLICK_LOG_LEVEL", "INFO").upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = redis_url()
    if not url:
        print("error: set REDIS_URL (redis://host:6379/0) or REDIS_HOST / REDIS_PORT", file=sys.stderr)
        return 2
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from rq import Queue, Worker

    redis = Redis.from_url(url)
    try:
        redis.ping()
    except RedisConnectionError as e:
        print(f"error: cannot reach Redis at {url}: {e}", file=sys.stderr)
        return 2
    name = args.name or f"adclick-{socket.gethostname()}-{os.getpid()}"
    worker = Worker([Queue(queue_name(), connection=redis)], connection=redis, name=name,
                    job_monitoring_interval=HEARTBEAT_S)
    logger.info("worker %s on %s, queue %s", name, url, queue_name())
    worker.work(burst=args.burst, with_scheduler=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
