"""Reliability fixtures: the real Label Studio of the end-to-end tests, a proxy in front of it that
can go down, answer slowly or fail with 500, and our backend under gunicorn (the e2e
``BackendServer``) that a test can SIGKILL and restart on the same port and model folder. Everything binds to 127.0.0.1.

Each test adds its rows to ``REPORT``; the table is printed at the end of the run (and written as
JSON to ``$ADCLICK_RELIABILITY_REPORT`` when set).
"""
from __future__ import annotations

import http.server
import json
import os
import socketserver
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

from ml_backend.model import parse_project
from tests.e2e.conftest import BackendServer, free_port, label_studio, mtd_dir  # noqa: F401
from tests.e2e.helpers import CONFIG, import_tasks, keypoint, local_url, pick_references, verdict_result

REPORT: dict[str, dict] = {}
REPORT_COLUMNS = ("inputs", "2xx", "4xx", "5xx", "wrong masks", "crashes", "data lost",
                  "requests to a refused address", "token off the Label Studio host")


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    tr = terminalreporter
    tr.section("reliability")
    tr.write_line("| suite | " + " | ".join(REPORT_COLUMNS) + " | figures |")
    tr.write_line("|---" * (len(REPORT_COLUMNS) + 2) + "|")
    for name, row in REPORT.items():
        cells = [str(row.get(c, "")) for c in REPORT_COLUMNS]
        tr.write_line(f"| {name} | " + " | ".join(cells) + f" | {row.get('figures', '')} |")
    path = os.environ.get("ADCLICK_RELIABILITY_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1))


class FaultProxy:
    """Label Studio as the backend sees it: ``mode`` "pass" forwards, "slow" waits ``delay_s``
    first, "error" answers 500, "down" closes the listening socket (connection refused)."""

    def __init__(self, target: str):
        self.target = target.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "pass"
        self.delay_s = 0.0
        self.requests = 0
        self._server = None
        self._start()

    def _start(self) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                outer.requests += 1
                if outer.mode == "error":
                    body = b'{"detail": "injected failure"}'
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if outer.mode == "slow":
                    time.sleep(outer.delay_s)
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                try:
                    r = requests.request(self.command, outer.target + self.path, headers=headers, data=data,
                                         allow_redirects=False, timeout=60)
                except requests.RequestException:
                    self.send_error(502)
                    return
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def set(self, mode: str, delay_s: float = 0.0) -> None:
        if mode == "down" and self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        elif mode != "down" and self._server is None:
            self._start()
        self.mode, self.delay_s = mode, delay_s

    def close(self) -> None:
        self.set("down")


@pytest.fixture(scope="session")
def proxy(label_studio):
    p = FaultProxy(label_studio.url)
    yield p
    p.close()


@pytest.fixture(scope="session")
def start_service(label_studio, proxy, tmp_path_factory):
    """``start_service(**env)``: a started backend that reaches Label Studio through the proxy."""
    started: list[BackendServer] = []

    def start(name: str, **env) -> BackendServer:
        svc = BackendServer(tmp_path_factory.mktemp(name),
                            {"LABEL_STUDIO_URL": proxy.url, "LABEL_STUDIO_API_KEY": label_studio.token, **env})
        started.append(svc)
        return svc.start()

    yield start
    for svc in started:
        svc.stop()


def make_project(ls, mtd: Path, title: str, defects: list[tuple[str, Path, Path]],
                 annotate: list[tuple[str, Path, Path]] = ()) -> dict:
    """A Label Studio project with the e2e references OK-tagged, the ``defects`` as tasks, and
    ``annotate`` as tasks annotated with their ground-truth masks (for Start Training)."""
    from PIL import Image

    from tests.e2e.helpers import brush_result

    project = ls.api("POST", "/api/projects", json={"title": title, "label_config": CONFIG})
    pid = project["id"]
    ls.api("POST", "/api/storages/localfiles", json={
        "project": pid, "path": str(mtd), "title": "MTD", "use_blob_urls": True, "regex_filter": "^$"})
    tasks = [{"data": {"image": local_url(g, mtd)}, "annotations": [{"result": verdict_result("OK")}]}
             for g in pick_references(mtd)]
    tasks += [{"data": {"image": local_url(img, mtd)}} for _, img, _ in list(defects) + list(annotate)]
    by_url = import_tasks(ls, pid, tasks)
    for d, img, gt_path in annotate:
        gt = np.asarray(Image.open(gt_path).convert("L")) > 127
        ls.api("POST", f"/api/tasks/{by_url[local_url(img, mtd)]}/annotations/", json={"result": [brush_result(gt, d)]})
    _, uid = parse_project(project)
    images = []
    for d, img, gt_path in defects:
        w, h = Image.open(img).size
        images.append({"type": d, "task": by_url[local_url(img, mtd)], "url": local_url(img, mtd), "w": w, "h": h,
                       "path": img, "gt": gt_path})
    return {"id": pid, "uid": uid, "project": project, "images": images}


def click_body(project: dict, image: dict, clicks: list[tuple[float, float, bool]]) -> dict:
    """What Label Studio sends for a smart-KeyPoint click: the whole click history of the label."""
    result = [keypoint(x, y, image["w"], image["h"], image["type"], positive) for x, y, positive in clicks]
    return {"tasks": [{"id": image["task"], "data": {"image": image["url"]}, "project": project["id"]}],
            "project": project["uid"], "label_config": CONFIG, "params": {"context": {"result": result}}}


def answer_mask(resp: requests.Response, image: dict) -> np.ndarray:
    """The brush mask of a click answer (all False when the answer has no region)."""
    results = resp.json()["results"][0]["result"]
    mask = np.zeros((image["h"], image["w"]), bool)
    for r in results:
        if r["type"] == "brushlabels":
            assert (r["original_width"], r["original_height"]) == (image["w"], image["h"]), r
            mask |= decode_rle(r["value"]["rle"]).reshape(image["h"], image["w"], 4)[:, :, 3] > 127
    return mask


def same_mask(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a few boundary pixels (a recomputed answer may flip a pixel that sits on the
    threshold: float sums in another order); an answer for another image or task is nowhere near."""
    return a.shape == b.shape and float((a != b).mean()) <= 1e-3


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        out = predicate()
        if out:
            return out
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
