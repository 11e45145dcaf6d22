"""The Redis job queue (``ml_backend.queue``) against a real ``redis-server`` on 127.0.0.1, and
replicas that share a model folder: one job per project and kind whatever the replica, a failed
job shown with its reason and replaced by the next request, Redis unreachable -> 503 and a
``/health`` that still answers, and a model recorded by another process served without a restart."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ml_backend.api import create_app
from ml_backend.errors import ServiceUnavailable
from ml_backend.queue import RedisJobs
from tests.e2e.conftest import free_port
from tests.test_backend_training import CONFIG, REPO, Trainer, ls, make, start, wait_state  # noqa: F401


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(exe).exists():
        pytest.fail("redis-server is not installed (Debian package redis-server; scripts/test.sh installs it)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    t0 = time.time()
    while True:
        try:
            RedisJobs(url).redis.ping()
            break
        except Exception:  # noqa: BLE001 - not up yet
            assert time.time() - t0 < 20, "redis-server did not answer within 20 s"
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_one_job_per_project_and_kind_across_replicas(redis_url):
    a, b = RedisJobs(redis_url), RedisJobs(redis_url)
    assert a.submit("seg", "7", {"project": "7"}) is True
    assert b.submit("seg", "7", {"project": "7"}) is False  # the other replica sees it queued
    assert b.submit("click", "7", {"project": "7"}) is True  # another kind is another job
    assert b.submit("seg", "8", {"project": "8"}) is True
    st = b.status("seg", "7")
    assert st["state"] == "queued" and st["queue"] == "adclick"
    assert a.status("seg", "9") is None


def test_a_failed_job_is_shown_with_its_reason_and_the_next_request_starts_another(redis_url):
    from redis import Redis
    from rq import Queue, SimpleWorker
    from rq.job import Job

    jobs = RedisJobs(redis_url)
    assert jobs.submit("bogus", "3", {"project": "3"}) is True
    worker_redis = Redis.from_url(redis_url)  # as ml_backend.worker connects
    queue = Queue(jobs.queue.name, connection=worker_redis)
    job = Job.fetch(jobs.redis.get("adclick-job-bogus-3").decode(), connection=worker_redis)
    SimpleWorker([queue], connection=worker_redis).perform_job(job, queue)  # the job, without a worker loop
    st = jobs.status("bogus", "3")
    assert st["state"] == "failed" and "unknown job kind" in st["error"], st
    assert jobs.running("bogus", "3") is False
    assert jobs.submit("bogus", "3", {"project": "3"}) is True and jobs.status("bogus", "3")["state"] == "queued"


def test_unreachable_redis_is_a_503_and_health_still_answers(redis_url, tmp_path, ls):  # noqa: F811
    backend = make(tmp_path, Trainer())
    backend.queue = RedisJobs("redis://127.0.0.1:1/0")  # nothing listens there
    client = create_app(backend).test_client()
    r = start(client)
    assert r.status_code == 503 and "REDIS_URL" in r.get_json()["error"]
    h = client.get("/health")
    assert h.status_code == 200 and h.get_json()["training"]["1"]["state"] == "unknown"
    with pytest.raises(ServiceUnavailable):
        backend.queue.submit("seg", "1", {})


def test_a_replica_serves_the_model_another_process_recorded(tmp_path, ls):  # noqa: F811
    trainer = Trainer()
    trainer.gate.set()
    trains = make(tmp_path, trainer)  # the process that trains (a queue worker)
    serves = make(tmp_path, Trainer())  # a replica on the same model folder
    replica = serves.model_for({"id": 1}, label_config=CONFIG)  # the project as the webhook names it
    v0 = replica.model_version
    training = create_app(trains).test_client()
    assert start(training).status_code == 200
    v1 = wait_state(training)["model_version"]
    assert v1 != v0
    st = create_app(serves).test_client().get("/health").get_json()
    assert st["training"]["1"]["model_version"] == v1, st["training"]
    assert replica.model_version == v1
    assert replica.seg.predictor(None) is not None  # loads the other process's checkpoint on first use


def test_a_worker_job_trains_in_two_processes_under_torchrun(redis_url, ls, tmp_path, monkeypatch):
    """ADCLICK_WORKER_PROCESSES=2: the job's training runs in two torchrun processes (gloo, DDP);
    the first one writes and records the model and reports progress into the RQ job; the model
    loads and answers in one process."""
    import json

    from redis import Redis
    from rq.job import Job

    from adclick_core.utils.checkpoint import load_checkpoint
    from ml_backend.model import Backend
    from ml_backend.worker import run_job

    refs = tmp_path / "refs"
    refs.mkdir()
    for p in sorted((REPO / "tests" / "data" / "mtd_sample" / "train" / "good").iterdir())[:4]:
        shutil.copy(p, refs / p.name)
    models = tmp_path / "models"
    for k, v in {"ADCLICK_MODEL_DIR": str(models), "ADCLICK_REFERENCE_DIR": str(refs), "ADCLICK_SEG_ITERATIONS": "4",
                 "ADCLICK_SEG_INIT": "none", "ADCLICK_DEVICE": "cpu", "ADCLICK_IMAGE_CACHE_DIR": str(tmp_path / "ic"),
                 "ADCLICK_WORKER_PROCESSES": "2", "OMP_NUM_THREADS": "1", "REDIS_URL": redis_url}.items():
        monkeypatch.setenv(k, v)
    rq_job = Job.create("ml_backend.worker.run_job", connection=Redis.from_url(redis_url))
    rq_job.save()
    monkeypatch.setattr("rq.get_current_job", lambda: rq_job)  # run_job as the work horse runs it
    result = run_job("seg", "1", uid="1.1700000000", label_config=CONFIG, reason="test")

    summary = result["summary"]
    assert summary["processes"] == 2 and summary["iterations"] == 4 and summary["labelled_images"] >= 2
    ckpt = Path(result["checkpoint"])
    assert ckpt.is_file() and load_checkpoint(ckpt, "adclick_seg")["train_summary"]["processes"] == 2
    project = ckpt.parent
    assert json.loads((project / "seg_current.json").read_text())["version"] == result["version"]
    assert len(list(project.glob("seg-*.pt"))) == 1  # the second process wrote nothing
    meta = Job.fetch(rq_job.id, connection=Redis.from_url(redis_url)).meta
    assert meta["state"] == "done" and meta["percent"] == 100.0 and meta["worker"]
    # A replica on the same model folder serves it.
    monkeypatch.delenv("REDIS_URL")
    backend = Backend(queue=False)
    model = backend.model_for("1.1700000000", label_config=CONFIG)
    model.seg.refresh()
    assert model.seg.current.version == result["version"]


def test_a_failing_process_fails_the_distributed_job_with_its_output(tmp_path, monkeypatch):
    from ml_backend.worker import run_distributed

    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")  # nothing listens: the export fails
    monkeypatch.setenv("ADCLICK_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("ADCLICK_REFERENCE_DIR", str(tmp_path / "no-refs"))
    with pytest.raises(RuntimeError, match="2-process training failed"):
        run_distributed(2, "seg", "1", label_config=CONFIG, reason="test")
