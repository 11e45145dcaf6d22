"""End-to-end fixtures: a REAL Label Studio 1.23.2 (from .lsvenv) and OUR backend under gunicorn,
both on 127.0.0.1 at free ports, started once per test run and stopped after.

Label Studio comes from ``.lsvenv`` (created by ``scripts/install_label_studio.sh``, which this
fixture runs when the venv is missing: ~1-2 min, once). The images are the committed MTD sample
``tests/data/mtd_sample`` (see its SOURCE.md), or any MVTec-style folder (any product, JPEG or PNG) named by
``ADCLICK_E2E_DATA`` (e.g. the full set); a folder that lacks train/good or ground_truth FAILS the
tests with a message (nothing is skipped).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from .helpers import DATA as MTD
from .helpers import DEFECTS, MTD_SAMPLE, SEG_ITERATIONS, images_in

REPO = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
LS_START_TIMEOUT_S = 180
BACKEND_START_TIMEOUT_S = 120
TOKEN = ("adclicke2e" * 4)[:40]  # LABEL_STUDIO_USER_TOKEN: 40 characters
USER = "e2e@adclick.test"
PASSWORD = "adclick-e2e-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # our own process group (start_new_session=True)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mtd_dir() -> Path:
    if not images_in(MTD / "train" / "good") or not DEFECTS:
        pytest.fail(
            f"the end-to-end data set is missing: expected {MTD} with images in train/good, test/<defect> "
            f"and ground_truth/<defect> (unset ADCLICK_E2E_DATA to use the committed sample {MTD_SAMPLE})",
            pytrace=False,
        )
    return MTD


@dataclass
class LabelStudio:
    url: str
    token: str
    data_dir: Path
    log: Path
    session: requests.Session = field(default_factory=requests.Session)

    def api(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kw):
        r = self.session.request(method, self.url + path, timeout=kw.pop("timeout", 120), **kw)
        if r.status_code not in expect:
            raise AssertionError(f"{method} {path} -> {r.status_code}: {r.text[:1000]}")
        return r.json() if r.content else None


@pytest.fixture(scope="session")
def label_studio(mtd_dir, tmp_path_factory) -> LabelStudio:
    ls_bin = REPO / ".lsvenv" / "bin" / "label-studio"
    if not ls_bin.exists():
        r = subprocess.run(["bash", str(REPO / "scripts" / "install_label_studio.sh")], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not ls_bin.exists():
            pytest.fail(f"installing label-studio=={LS_VERSION} into .lsvenv failed:\n{r.stdout[-2000:]}\n"
                        f"{r.stderr[-3000:]}", pytrace=False)
    data_dir = tmp_path_factory.mktemp("label-studio-data")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "ADCLICK_"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": USER,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(mtd_dir.parent),
        "SSRF_PROTECTION_ENABLED": "false",
        "ML_BLOCK_LOCAL_IP": "false",
        "COLLECT_ANALYTICS": "false",
        "HOME": str(data_dir),  # keep ~/.local/share/label-studio out of the user's home
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("VIRTUAL_ENV", None)
    log = data_dir / "label-studio.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(ls_bin), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(data_dir), start_new_session=True,
        )
    ls = LabelStudio(f"http://127.0.0.1:{port}", TOKEN, data_dir, log)
    ls.session.headers["Authorization"] = f"Token {TOKEN}"
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Label Studio exited with {proc.returncode}:\n{_tail(log)}", pytrace=False)
            try:
                if ls.session.get(ls.url + "/api/projects", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() - t0 > LS_START_TIMEOUT_S:
                pytest.fail(f"Label Studio did not answer within {LS_START_TIMEOUT_S} s:\n{_tail(log)}",
                            pytrace=False)
            time.sleep(1.0)
        print(f"\nLabel Studio {LS_VERSION} up at {ls.url} after {time.time() - t0:.0f} s", file=sys.stderr)
        yield ls
    finally:
        _stop(proc)


# The test-run backend wants HTTP Basic credentials, as one exposed on a factory network should;
# Label Studio is connected with them (Connect Model > Use authentication).
BACKEND_AUTH = ("adclick-e2e", "e2e-basic-pass")


class BackendServer:
    """Our backend under gunicorn (as documented) on a fixed free 127.0.0.1 port and model
    folder: ``start()`` waits for /health, ``kill()`` is a SIGKILL to master and worker, and a
    restart finds what the killed one wrote. The runner's ADCLICK_* settings stay out (tmp dirs
    below), except the model choice, so a new checkpoint can be checked end to end:
    ADCLICK_CHECKPOINT=... pytest tests/e2e"""

    KEEP = ("ADCLICK_CHECKPOINT", "ADCLICK_DEVICE", "ADCLICK_BACKBONE_WEIGHTS")

    def __init__(self, workdir: Path, env: dict):
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "backend.log"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("LABEL_STUDIO_", "ADCLICK_", "BASIC_AUTH_")) or k in self.KEEP}
        self.env.update({"ADCLICK_MODEL_DIR": str(workdir / "models"),
                         "ADCLICK_IMAGE_CACHE_DIR": str(workdir / "image-cache"), "PYTHONUNBUFFERED": "1",
                         # the tests compare answers with the shipped model's own: no adaptation
                         # unless a test asks for it (test_label_studio_adaptation.py)
                         "ADCLICK_ADAPT_MIN_REFERENCES": "0", "ADCLICK_LEARN_MASKS": "0"})
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None

    @property
    def auth(self) -> tuple[str, str] | None:
        user, password = self.env.get("BASIC_AUTH_USER"), self.env.get("BASIC_AUTH_PASS")
        return (user, password) if user and password else None

    def health(self) -> dict:
        return requests.get(self.url + "/health", auth=self.auth, timeout=10).json()

    def post(self, path: str, body, timeout: float = 120.0) -> requests.Response:
        return requests.post(self.url + path, json=body, auth=self.auth, timeout=timeout)

    def ml_backend_fields(self) -> dict:
        """What Label Studio's POST /api/ml needs to reach this backend."""
        if self.auth is None:
            return {"url": self.url}
        return {"url": self.url, "auth_method": "BASIC_AUTH", "basic_auth_user": self.auth[0],
                "basic_auth_pass": self.auth[1]}

    def start(self) -> "BackendServer":
        gunicorn = Path(sys.executable).parent / "gunicorn"
        cmd = [str(gunicorn) if gunicorn.exists() else "gunicorn", "--workers", "1", "--threads", "8",
               "--timeout", "0", "-b", self.url.removeprefix("http://"), "ml_backend._wsgi:app"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=str(REPO),
                                         start_new_session=True)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the backend exited with {self.proc.returncode}:\n{_tail(self.log)}", pytrace=False)
            try:
                if self.health().get("status") == "UP":
                    return self
            except (requests.RequestException, ValueError):
                pass
            if time.time() - t0 > BACKEND_START_TIMEOUT_S:
                pytest.fail(f"the backend did not answer /health within {BACKEND_START_TIMEOUT_S} s:\n"
                            f"{_tail(self.log)}", pytrace=False)
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL to the whole process group: master and worker die at once, nothing is flushed."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        if os.environ.get("ADCLICK_E2E_SHOW_LOGS"):
            print(f"\n--- backend log {self.log}\n{_tail(self.log, 200)}", file=sys.stderr)

    def worker_pid(self) -> int | None:
        """The gunicorn worker (the master's child) that holds the models."""
        if self.proc is None:
            return None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                return int(stat.parent.name)
        return None

    def peak_rss_mb(self) -> float | None:
        """The worker's peak resident memory (VmHWM)."""
        pid = self.worker_pid()
        if pid is None:
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None


@contextmanager
def run_backend(label_studio: LabelStudio, workdir: Path, **extra_env):
    """A started ``BackendServer`` that reaches ``label_studio`` directly; stopped after."""
    srv = BackendServer(workdir, {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
                                  # Start Training in CI: a short training (helpers.py)
                                  "ADCLICK_SEG_ITERATIONS": SEG_ITERATIONS, **extra_env})
    try:
        yield srv.start()
    finally:
        srv.stop()


def authorize_webhook(ls: LabelStudio, pid: int, backend: BackendServer) -> None:
    """Label Studio sends its webhooks without the ML backend's Basic credentials: give the
    webhook it created for the backend an Authorization header (Settings > Webhooks, as the
    README says)."""
    if backend.auth is None:
        return
    import base64

    token = base64.b64encode(f"{backend.auth[0]}:{backend.auth[1]}".encode()).decode()
    hooks = [h for h in ls.api("GET", f"/api/webhooks/?project={pid}") if h["url"] == backend.url + "/webhook"]
    assert len(hooks) == 1, hooks
    ls.api("PATCH", f"/api/webhooks/{hooks[0]['id']}/", json={"headers": {"Authorization": f"Basic {token}"}})


@pytest.fixture(scope="session")
def backend_server(label_studio, tmp_path_factory) -> BackendServer:
    with run_backend(label_studio, tmp_path_factory.mktemp("backend"), BASIC_AUTH_USER=BACKEND_AUTH[0],
                     BASIC_AUTH_PASS=BACKEND_AUTH[1]) as srv:
        yield srv


@pytest.fixture(scope="session")
def start_backend(label_studio, tmp_path_factory):
    """Start another backend with its own environment (e.g. a wrong API key)."""

    @contextmanager
    def start(**env):
        with run_backend(label_studio, tmp_path_factory.mktemp("backend-extra"), **env) as srv:
            yield srv

    return start


@pytest.fixture(scope="session")
def mtd_project(label_studio, backend_server, mtd_dir):
    """A project with label_config/interactive_weak.xml, a Local Storage on the MTD folder,
    N_REFERENCES train/good images with an OK verdict (the references), 2 images per defect type
    and one task whose file does not exist; our backend connected as interactive."""
    from .helpers import CONFIG, import_tasks, local_url, missing_url, pick_defects, pick_references, verdict_result

    ls = label_studio
    pid = ls.api("POST", "/api/projects", json={"title": "ADClick e2e", "label_config": CONFIG})["id"]
    ls.api("POST", "/api/storages/localfiles", json={
        "project": pid, "path": str(mtd_dir), "title": "MTD", "use_blob_urls": True, "regex_filter": "^$"})
    refs = pick_references(mtd_dir)
    defects = pick_defects(mtd_dir)
    tasks = [{"data": {"image": local_url(g, mtd_dir)}, "annotations": [{"result": verdict_result("OK")}]}
             for g in refs]
    tasks += [{"data": {"image": local_url(img, mtd_dir), "defect": d}} for d, img, _ in defects]
    tasks.append({"data": {"image": missing_url(mtd_dir)}})
    by_url = import_tasks(ls, pid, tasks)
    ml = ls.api("POST", "/api/ml", json={**backend_server.ml_backend_fields(), "project": pid,
                                         "is_interactive": True, "title": "ADClick"})
    authorize_webhook(ls, pid, backend_server)
    return {
        "id": pid, "ml_id": ml["id"], "ml": ml, "by_url": by_url, "n_refs": len(refs), "refs": list(refs),
        "defects": [(d, by_url[local_url(img, mtd_dir)], img, gt) for d, img, gt in defects],
        "missing_task": by_url[missing_url(mtd_dir)],
        "any_task": by_url[local_url(defects[0][1], mtd_dir)],
        "goods_unused": [g for g in images_in(mtd_dir / "train" / "good") if g not in refs],
    }
