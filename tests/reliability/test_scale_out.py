"""Beyond one machine: a real ``redis-server`` (started here on 127.0.0.1), two backend replicas
under gunicorn on one shared model folder, one ``adclick worker`` process, and a real Label Studio.

*Start Training* in Label Studio -> the job runs in the worker (not in a replica) -> both replicas
serve the new version; the worker SIGKILLed mid-training -> the job shows as failed in both
replicas' ``/health``, both keep serving the previous version, nothing half-written is left, and
after a new worker starts a new *Start Training* works. A project's first reference bank is built
by one replica only. Every wait is bounded."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import REPO, _stop, _tail, free_port
from tests.e2e.helpers import pick_annotated, pick_defects

from .conftest import REPORT, click_body, make_project, wait_for

pytestmark = pytest.mark.reliability

SEG_ITERATIONS = 60
KILL_NOTICED_S = 240  # RQ notices a killed worker when its job's heartbeat (10 s + 60 s) expires


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(exe).exists():
        pytest.fail("redis-server is not installed (Debian package redis-server; scripts/test.sh installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    from redis import Redis

    client = Redis(host="127.0.0.1", port=port)
    wait_for(lambda: _pings(client), 20, "redis-server answering PING", interval_s=0.2)
    yield f"redis://127.0.0.1:{port}/0"
    _stop(proc)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


class WorkerProcess:
    """``python -m ml_backend.worker`` in its own process group, logging to a file."""

    def __init__(self, workdir: Path, env: dict):
        self.log = workdir / "worker.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "ml_backend.worker"], cwd=str(REPO), env=self.env,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "Listening on" in self.log.read_text(errors="replace") or self.proc.poll() is not None,
                 60, "the worker listening")
        assert self.proc.poll() is None, _tail(self.log)
        return self

    def kill(self) -> None:
        """SIGKILL to the worker and its job's process (RQ starts each job in a session of its own,
        so a signal to the worker's group alone would leave the job running): a machine lost."""
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _stop(self.proc)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.fixture(scope="module")
def cluster(label_studio, mtd_dir, start_service, redis_url, tmp_path_factory):
    defects = pick_defects(mtd_dir, per_type=1)[:2]
    annotate = [(d, img, gt) for d, img, gt, _ in pick_annotated(mtd_dir, 1, [img for _, img, _ in defects])][:3]
    project = make_project(label_studio, mtd_dir, "scale out", defects, annotate)
    shared = tmp_path_factory.mktemp("shared-models")
    env = {"REDIS_URL": redis_url, "ADCLICK_MODEL_DIR": str(shared), "ADCLICK_SEG_ITERATIONS": SEG_ITERATIONS}
    a = start_service("replica-a", **env)
    b = start_service("replica-b", **env)
    ml = label_studio.api("POST", "/api/ml", json={**a.ml_backend_fields(), "project": project["id"],
                                                   "is_interactive": True, "title": "ADClick replica A"})
    workdir = tmp_path_factory.mktemp("worker")
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith(("ADCLICK_", "LABEL_STUDIO_", "REDIS_"))}
    worker_env.update({"REDIS_URL": redis_url, "ADCLICK_MODEL_DIR": str(shared),
                       "ADCLICK_SEG_ITERATIONS": str(SEG_ITERATIONS), "ADCLICK_IMAGE_CACHE_DIR": str(workdir / "ic"),
                       "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
                       "PYTHONUNBUFFERED": "1"})
    workers = [WorkerProcess(workdir, worker_env).start()]
    yield {"ls": label_studio, "project": project, "ml_id": ml["id"], "a": a, "b": b, "workers": workers,
           "worker_env": worker_env, "workdir": workdir, "shared": shared}
    for w in workers:
        w.stop()


def state(svc, project) -> dict:
    return svc.health()["training"].get(str(project["id"]), {})


def served(svc, project) -> str:
    r = svc.post("/predict", {**click_body(project, project["images"][0], []), "params": {}})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["model_version"]


def loadable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_training_runs_on_the_worker_and_every_replica_serves_it(cluster):
    ls, project, a, b = cluster["ls"], cluster["project"], cluster["a"], cluster["b"]
    image = project["images"][0]
    # both replicas' first click at once: one builds the project's bank, the other waits and loads it
    codes: list[int] = []
    threads = [threading.Thread(target=lambda s=s: codes.append(s.post("/predict", click_body(
        project, image, [(image["w"] / 2, image["h"] / 2, True)]), timeout=300).status_code)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=320)
    assert codes == [200, 200], codes
    builds = sum(len(re.findall(rf"project {project['id']}: reference bank has \d+ images \(\+[1-9]", s.log.read_text()))
                 for s in (a, b))
    assert builds == 1, "the bank was built by more than one replica"

    ls.api("POST", f"/api/ml/{cluster['ml_id']}/train", json={})  # Start Training in Label Studio
    wait_for(lambda: state(a, project).get("state") in ("done", "failed"), 600, "training on the worker")
    st_a, st_b = state(a, project), state(b, project)
    assert st_a["state"] == "done", st_a
    assert st_b["state"] == "done" and st_b.get("worker") == st_a.get("worker"), (st_a, st_b)
    v1 = st_a["model_version"]
    worker_log = (cluster["workdir"] / "worker.log").read_text()
    assert "training ADClick-Seg on" in worker_log
    assert all("training ADClick-Seg on" not in s.log.read_text() for s in (a, b)), "a replica trained"
    assert served(a, project) == v1 and served(b, project) == v1
    cluster["v1"] = v1


def test_a_worker_killed_mid_training_fails_the_job_and_the_replicas_keep_serving(cluster):
    ls, project, a, b = cluster["ls"], cluster["project"], cluster["a"], cluster["b"]
    v1 = cluster.get("v1") or pytest.fail("the first training did not run")
    ls.api("POST", f"/api/ml/{cluster['ml_id']}/train", json={})
    wait_for(lambda: state(a, project).get("state") == "running" and state(a, project).get("percent", 0) >= 20,
             600, "training 2 reaching 20 %")
    t_kill = time.time()
    cluster["workers"][0].kill()
    wait_for(lambda: state(a, project).get("state") == "failed", KILL_NOTICED_S, "the killed job shown as failed")
    noticed_s = time.time() - t_kill
    st_b = state(b, project)
    assert st_b["state"] == "failed", st_b
    assert served(a, project) == v1 and served(b, project) == v1
    project_dir = next(cluster["shared"].glob(f"project-{project['id']}-*"))
    checkpoints = sorted(project_dir.glob("seg-*.pt"))
    assert checkpoints and all(loadable(p) for p in checkpoints), "a half-written checkpoint sits under a final name"

    cluster["workers"].append(WorkerProcess(cluster["workdir"], cluster["worker_env"]).start())
    ls.api("POST", f"/api/ml/{cluster['ml_id']}/train", json={})
    wait_for(lambda: state(a, project).get("state") in ("queued", "running", "done"), 60, "training 3 queued")
    wait_for(lambda: state(a, project).get("state") in ("done", "failed"), 600, "training 3 on the new worker")
    st = state(a, project)
    assert st["state"] == "done" and st["model_version"] != v1, st
    assert served(a, project) == st["model_version"] and served(b, project) == st["model_version"]
    REPORT["scale-out: 2 replicas + RQ worker, worker SIGKILLed mid-training"] = {
        "inputs": 3, "2xx": 3, "4xx": 0, "5xx": 0, "wrong masks": 0, "crashes": 0, "data lost": 0,
        "figures": f"trainings ran in the worker, both replicas served {v1}; the killed job showed as failed "
                   f"after {noticed_s:.0f} s, {v1} kept serving, {len(checkpoints)} checkpoint(s) all loadable; "
                   f"a new worker trained {st['model_version']}, served by both"}
