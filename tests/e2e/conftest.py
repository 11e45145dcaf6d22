"""End-to-end fixtures: a REAL Label Studio 1.23.2 (from .lsvenv) and OUR backend under gunicorn,
both on 127.0.0.1 at free ports, started once per test run and stopped after.

Label Studio comes from ``.lsvenv`` (created by ``scripts/install_label_studio.sh``, which this
fixture runs when the venv is missing: ~1-2 min, once). The images are the committed MTD sample
``tests/data/mtd_sample`` (see its SOURCE.md), or any MVTec-style MTD folder named by
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

from .helpers import SEG_ITERATIONS

REPO = Path(__file__).resolve().parents[2]
MTD_SAMPLE = REPO / "tests" / "data" / "mtd_sample"
MTD = Path(os.environ.get("ADCLICK_E2E_DATA") or MTD_SAMPLE).resolve()
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
    if not (MTD / "train" / "good").is_dir() or not (MTD / "ground_truth").is_dir():
        pytest.fail(
            f"the MTD data set is missing: expected {MTD} with train/good, test/<defect> and "
            f"ground_truth/<defect> (unset ADCLICK_E2E_DATA to use the committed sample {MTD_SAMPLE})",
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


@dataclass
class BackendServer:
    url: str
    log: Path
    env: dict

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=5).json()


@contextmanager
def run_backend(label_studio: LabelStudio, workdir: Path, **extra_env):
    """Our backend under gunicorn (as documented) on a free 127.0.0.1 port."""
    port = free_port()
    # The runner's ADCLICK_* settings stay out (tmp dirs below), except the model choice, so a new
    # checkpoint can be checked end to end: ADCLICK_CHECKPOINT=... pytest tests/e2e
    keep = ("ADCLICK_CHECKPOINT", "ADCLICK_DEVICE", "ADCLICK_BACKBONE_WEIGHTS")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "ADCLICK_")) or k in keep}
    env.update({
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "ADCLICK_MODEL_DIR": str(workdir / "models"),
        "ADCLICK_IMAGE_CACHE_DIR": str(workdir / "image-cache"),
        "ADCLICK_SEG_ITERATIONS": str(SEG_ITERATIONS),  # Start Training in CI: a short training (helpers.py)
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in extra_env.items()})
    gunicorn = Path(sys.executable).parent / "gunicorn"
    cmd = [str(gunicorn) if gunicorn.exists() else "gunicorn", "--workers", "1", "--threads", "8",
           "--timeout", "0", "-b", f"127.0.0.1:{port}", "ml_backend._wsgi:app"]
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "backend.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                start_new_session=True)
    srv = BackendServer(f"http://127.0.0.1:{port}", log, env)
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the backend exited with {proc.returncode}:\n{_tail(log)}", pytrace=False)
            try:
                if srv.health().get("status") == "UP":
                    break
            except (requests.RequestException, ValueError):
                pass
            if time.time() - t0 > BACKEND_START_TIMEOUT_S:
                pytest.fail(f"the backend did not answer /health within {BACKEND_START_TIMEOUT_S} s:\n{_tail(log)}",
                            pytrace=False)
            time.sleep(0.5)
        yield srv
    finally:
        _stop(proc)
        if os.environ.get("ADCLICK_E2E_SHOW_LOGS"):
            print(f"\n--- backend log {log}\n{_tail(log, 200)}", file=sys.stderr)


@pytest.fixture(scope="session")
def backend_server(label_studio, tmp_path_factory) -> BackendServer:
    with run_backend(label_studio, tmp_path_factory.mktemp("backend")) as srv:
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
    ml = ls.api("POST", "/api/ml", json={"url": backend_server.url, "project": pid, "is_interactive": True,
                                         "title": "ADClick"})
    return {
        "id": pid, "ml_id": ml["id"], "ml": ml, "by_url": by_url, "n_refs": len(refs), "refs": list(refs),
        "defects": [(d, by_url[local_url(img, mtd_dir)], img, gt) for d, img, gt in defects],
        "missing_task": by_url[missing_url(mtd_dir)],
        "any_task": by_url[local_url(defects[0][1], mtd_dir)],
        "goods_unused": [g for g in sorted((mtd_dir / "train" / "good").glob("*.jpg")) if g not in refs],
    }
