"""``adclick worker``: runs the backend's training and adaptation jobs from the Redis queue.

    REDIS_URL=redis://redis:6379/0 ADCLICK_MODEL_DIR=/shared/models \\
        LABEL_STUDIO_URL=... LABEL_STUDIO_API_KEY=... adclick worker

Start it on any machine that sees the replicas' ``ADCLICK_MODEL_DIR`` (a shared volume) and can
reach Label Studio; it trains on the GPU when there is one (``ADCLICK_DEVICE``). Each job runs in
a fresh child process (RQ's forking worker; a crash or a kill takes only that job), reports its
progress into the job for every replica's ``/health``, and writes its model to the project folder,
where the replicas pick it up. See ``queue.py`` for the guarantees.

``--processes N`` (or ``ADCLICK_WORKER_PROCESSES``): each job trains in N processes under
``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL with one GPU per process): every process
reads the project's labels, each draws its share of every batch, and the first one writes and
records the model and reports progress into the job.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile

from pathlib import Path

from .queue import HEARTBEAT_S, queue_name, redis_url

logger = logging.getLogger(__name__)

KINDS = {"seg": "seg", "click": "adapt"}  # job kind (checkpoint prefix) -> the project's job attribute
PROCESSES_ENV = "ADCLICK_WORKER_PROCESSES"
# A distributed job's processes: at most this long for all of them (RQ's own job timeout is the bound
# that matters; this one only keeps a wedged torchrun from outliving it).
DISTRIBUTED_TIMEOUT_S = 24 * 3600


def worker_processes() -> int:
    """Training processes per job (``ADCLICK_WORKER_PROCESSES``, default 1)."""
    try:
        return max(1, int(os.environ.get(PROCESSES_ENV, "1") or 1))
    except ValueError:
        raise SystemExit(f"{PROCESSES_ENV} must be a whole number of processes") from None


def run_job(kind: str, project: str, uid: str | None = None, label_config: str | None = None,
            hostname: str | None = None, reason: str = "queued") -> dict:
    """One queued job: the project's ``BackgroundJob`` of ``kind`` trained here, inline, or in
    ``ADCLICK_WORKER_PROCESSES`` processes under torchrun."""
    from rq import get_current_job

    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    processes = worker_processes()
    if processes > 1:
        rq_job = get_current_job()
        return run_distributed(processes, kind, project, uid=uid, label_config=label_config, hostname=hostname,
                               reason=reason, rq_job_id=rq_job.id if rq_job is not None else None)
    return _run_here(kind, project, uid, label_config, hostname, reason, get_current_job())


def run_distributed(processes: int, kind: str, project: str, rq_job_id: str | None = None, **job) -> dict:
    """``kind``'s job in ``processes`` processes under torchrun (``python -m ml_backend.worker job``);
    the first process's result. A process that fails fails the job, with its output's end."""
    with tempfile.TemporaryDirectory(prefix="adclick-job-") as tmp:
        spec = Path(tmp) / "job.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({"kind": kind, "project": project, "rq_job_id": rq_job_id,
                                    "result": str(result), **job}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "ml_backend.worker", "job", str(spec)]
        logger.info("project %s: %s job in %d processes: %s", project, kind, processes, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DISTRIBUTED_TIMEOUT_S)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stdout[-2000:] + proc.stderr[-4000:]).strip()
            raise RuntimeError(f"the {processes}-process training failed (exit {proc.returncode}): {tail}")
        return json.loads(result.read_text())


def _job_process(spec_path: str) -> int:
    """One of torchrun's processes of a distributed job (``python -m ml_backend.worker job SPEC``)."""
    from adclick_core.training.distributed import Distributed

    spec = json.loads(Path(spec_path).read_text())
    dist = Distributed.from_env(os.environ.get("ADCLICK_DEVICE") or "auto")
    rq_job = None
    if dist.is_main and spec.get("rq_job_id") and redis_url():
        from redis import Redis
        from rq.job import Job

        rq_job = Job.fetch(spec["rq_job_id"], connection=Redis.from_url(redis_url()))
    try:
        result = _run_here(spec["kind"], spec["project"], spec.get("uid"), spec.get("label_config"),
                           spec.get("hostname"), spec.get("reason") or "queued", rq_job)
        if dist.is_main:
            Path(spec["result"]).write_text(json.dumps(result, default=str))
    finally:
        dist.shutdown()
    return 0


def _run_here(kind: str, project: str, uid: str | None, label_config: str | None, hostname: str | None,
              reason: str, rq_job) -> dict:
    from .images import utcnow
    from .model import Backend

    backend = Backend(queue=False)  # in the worker the job runs here, not on the queue again
    model = backend.model_for(uid or project, label_config=label_config, hostname=hostname)
    job = getattr(model, KINDS[kind])
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
    ap.add_argument("--processes", type=int, default=None,
                    help=f"training processes per job under torchrun (default: {PROCESSES_ENV} or 1)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["job"]:  # one process of a distributed job (started by run_distributed)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _job_process(argv[1])
    args = ap.parse_args(argv)
    if args.processes is not None:
        if args.processes < 1:
            print("error: --processes must be at least 1", file=sys.stderr)
            return 2
        os.environ[PROCESSES_ENV] = str(args.processes)  # read by each job (a forked work horse)
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
