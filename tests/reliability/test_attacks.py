"""An outside attacker against the real gunicorn service (``gunicorn.conf.py``, as documented), one
case per class of attack that an attack on the service once got through: slow clients, heavy
requests, URLs two parsers read differently and address ranges that lead inside, a redirect that
would carry the token away, made-up projects, forged webhooks, malformed bodies. Label Studio is the
stand-in of the unit tests (``FakeLabelStudio``: real HTTP on 127.0.0.1, the API paths the backend
reads), so a test can make it answer what an attacker would need; an "internal" server on another
loopback port counts every request that reaches it. Everything binds to 127.0.0.1 and every wait is
bounded."""
from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.e2e.conftest import BackendServer
from tests.e2e.helpers import CONFIG, keypoint, verdict_result
from tests.test_backend_fakes import TOKEN, FakeLabelStudio, ForeignServer

from .conftest import REPORT, answer_mask, same_mask, wait_for

pytestmark = pytest.mark.reliability

MTD = Path(__file__).resolve().parents[1] / "data" / "mtd_sample"
READ_TIMEOUT_S = 4
MAX_PROJECTS = 5
HEALTH_LIMIT_S = 2.0  # an honest /health during an attack answers within this


@pytest.fixture(scope="module")
def stand_in():
    """Label Studio (project 1: four OK-tagged references and a defect; project 2: one OK-tagged
    task whose image is a defect) and an internal server nobody may reach through the backend."""
    ls, internal = FakeLabelStudio(), ForeignServer()
    goods = sorted((MTD / "train" / "good").iterdir())[:4]
    defect = sorted((MTD / "test").glob("*/*.*"))[0]
    tasks1 = [{"id": i + 1, "data": {"image": ls.add_file(f"/data/upload/1/good{i}.png", g.read_bytes())},
               "annotations": [{"result": verdict_result("OK")}]} for i, g in enumerate(goods)]
    tasks1.append({"id": 10, "data": {"image": ls.add_file("/data/upload/1/defect.png", defect.read_bytes())},
                   "annotations": []})
    ls.exports["1"] = tasks1
    ls.exports["2"] = [{"id": 20, "data": {"image": ls.add_file("/data/upload/2/defect.png", defect.read_bytes())},
                        "annotations": [{"result": verdict_result("OK")}]}]
    internal.files["/x.png"] = (MTD / "train" / "good" / goods[0].name).read_bytes()
    w, h = Image.open(defect).size
    yield {"ls": ls, "internal": internal, "defect": {"w": w, "h": h, "type": "crack"}}
    ls.close()
    internal.close()


@pytest.fixture(scope="module")
def service(stand_in, tmp_path_factory):
    svc = BackendServer(tmp_path_factory.mktemp("attacks"), {
        "LABEL_STUDIO_URL": stand_in["ls"].url, "LABEL_STUDIO_API_KEY": TOKEN,
        "ADCLICK_REQUEST_READ_TIMEOUT": READ_TIMEOUT_S, "ADCLICK_MAX_PROJECTS": MAX_PROJECTS,
        "ADCLICK_BANK_REFRESH_S": 0})
    svc.start()
    svc.first_worker = svc.worker_pid()
    yield svc
    svc.stop()


def crashes(svc) -> int:
    """1 when the gunicorn worker that holds the models is no longer the one that started."""
    return int(svc.worker_pid() != svc.first_worker)


def click(svc, stand_in, task: dict, project: str = "1.1700000000", clicks=((0.5, 0.5, True),)) -> requests.Response:
    d = stand_in["defect"]
    result = [keypoint(x * d["w"], y * d["h"], d["w"], d["h"], d["type"], pos) for x, y, pos in clicks]
    return svc.post("/predict", {"tasks": [task], "project": project, "label_config": CONFIG,
                                 "params": {"context": {"result": result}}})


def timed_health(svc) -> float:
    t0 = time.monotonic()
    try:
        ok = requests.get(svc.url + "/health", timeout=HEALTH_LIMIT_S * 3).status_code == 200
    except requests.RequestException:
        ok = False
    return time.monotonic() - t0 if ok else float("inf")


# ---------------------------------------------------------------- slow clients
def test_slow_clients_cannot_take_the_service(service):
    host, port = service.url.removeprefix("http://").split(":")
    attackers = []
    for _ in range(16):  # headers trickled
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        attackers.append(s)
    for _ in range(8):  # a body trickled
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        attackers.append(s)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.5):
            for s in attackers:
                try:
                    s.send(b"a")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    try:
        time.sleep(1.0)
        latencies = [timed_health(service) for _ in range(5)]
    finally:
        stop.set()
    time.sleep(READ_TIMEOUT_S + 1.5)
    closed = 0
    for s in attackers:
        s.settimeout(3)
        try:
            data = s.recv(200)
            closed += data == b"" or data.startswith(b"HTTP/1.1 408")
        except OSError:
            pass
        s.close()
    REPORT["attack: 24 slow clients (headers / body trickled)"] = {
        "inputs": len(attackers) + len(latencies), "2xx": sum(t < HEALTH_LIMIT_S for t in latencies), "4xx": closed,
        "5xx": 0, "wrong masks": 0, "crashes": crashes(service), "data lost": 0,
        "figures": f"/health during the attack: max {max(latencies) * 1e3:.0f} ms; {closed}/{len(attackers)} slow "
                   f"connections closed with 408 after ADCLICK_REQUEST_READ_TIMEOUT={READ_TIMEOUT_S} s"}
    assert max(latencies) < HEALTH_LIMIT_S, latencies
    assert closed == len(attackers)


# ---------------------------------------------------------------- heavy requests
def thin_png(w: int, h: int) -> bytes:
    """A 1-bit PNG of w x h pixels, written by hand so a 48-million-pixel image costs no memory here."""
    row = b"\x00" + b"\x00" * ((w + 7) // 8)
    raw = zlib.compress(row * h, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_heavy_requests_are_refused_quickly_and_health_keeps_answering(service):
    png = thin_png(8, 6_000_000)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    labels = "".join(f'<Label value="l{i}"/>' for i in range(16000))
    huge_config = f'<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image">{labels}</BrushLabels></View>'
    out: dict = {}

    def attack():
        t0 = time.monotonic()
        r = service.post("/predict", {"tasks": [{"id": i, "data": {"image": url}} for i in range(8)],
                                      "project": "1.1700000000", "label_config": CONFIG,
                                      "params": {"context": {"result": [keypoint(4, 100, 8, 6_000_000, "crack")]}}})
        out["image"] = (r.status_code, time.monotonic() - t0, r.json().get("error", ""))
        t0 = time.monotonic()
        r = service.post("/validate", {"config": huge_config})
        out["config"] = (r.status_code, time.monotonic() - t0, r.json().get("error", ""))

    t = threading.Thread(target=attack)
    t.start()
    latencies = []
    while t.is_alive() and len(latencies) < 50:
        latencies.append(timed_health(service))
        time.sleep(0.2)
    t.join(timeout=120)
    assert not t.is_alive()
    REPORT["attack: heavy requests (8 x 48 Mpx PNG of 0.3 MB, 16,000-label config)"] = {
        "inputs": 2 + len(latencies), "2xx": sum(x < HEALTH_LIMIT_S for x in latencies), "4xx": 2, "5xx": 0,
        "wrong masks": 0, "crashes": crashes(service), "data lost": 0,
        "figures": f"image: {out['image'][0]} in {out['image'][1]:.2f} s; config: {out['config'][0]} in "
                   f"{out['config'][1]:.2f} s; /health max {max(latencies, default=0) * 1e3:.0f} ms"}
    assert out["image"][0] == 413 and "ADCLICK_MAX_IMAGE_S" in out["image"][2] and out["image"][1] < 5
    assert out["config"][0] == 400 and out["config"][1] < 5
    assert max(latencies, default=0) < HEALTH_LIMIT_S


# ---------------------------------------------------------------- outbound URLs
def test_urls_into_the_network_never_connect_and_the_token_stays_home(service, stand_in):
    ls, internal = stand_in["ls"], stand_in["internal"]
    ls_authority = ls.url.removeprefix("http://")
    ls.redirects["/data/upload/1/moved-a.png"] = f"http://127.0.0.1:{internal.port}\\@{ls_authority}/x.png"
    ls.redirects["/data/upload/1/moved-b.png"] = f"http://127.0.0.1:{internal.port}/x.png"
    urls = [
        f"http://127.0.0.1:{internal.port}\\@{ls_authority}/data/upload/1/good0.png",  # two parsers, two hosts
        f"http://127.0.0.1:{internal.port}\\\\@{ls_authority}/x.png",
        f"http://127.0.0.1:{internal.port}/x.png",  # loopback, not the Label Studio origin
        f"http://localhost:{internal.port}/x.png",
        "http://100.100.100.200/latest/meta-data/",  # carrier-grade NAT: a cloud's metadata service
        "http://169.254.169.254/latest/meta-data/",
        "http://[2002:7f00:1::]/x.png", "http://[64:ff9b::7f00:1]/x.png", "http://[fec0::1]/x.png",
        "/data/upload/1/moved-a.png", "/data/upload/1/moved-b.png",  # Label Studio redirects inside
    ]
    statuses = [click(service, stand_in, {"id": 10, "data": {"image": u}, "project": 1}).status_code for u in urls]
    reached = len(internal.seen)
    token_sent = sum(1 for _, auth in internal.seen if auth)
    REPORT["attack: URLs into the network (parser differential, private ranges, redirects)"] = {
        "inputs": len(urls), "2xx": sum(s == 200 for s in statuses), "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses), "wrong masks": 0, "crashes": crashes(service), "data lost": 0,
        "requests to a refused address": reached, "token off the Label Studio host": token_sent,
        "figures": "statuses: " + ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses)))}
    assert all(400 <= s < 500 for s in statuses), list(zip(urls, statuses))
    assert reached == 0 and token_sent == 0, internal.seen


# ---------------------------------------------------------------- made-up projects
def test_made_up_projects_are_bounded_in_memory(service, stand_in):
    statuses = [click(service, stand_in, {"id": 10, "data": {"image": "/data/upload/1/defect.png"}, "project": pid},
                      project=f"{pid}.1700000000").status_code for pid in range(1000, 1040)]
    live = service.health()["projects"]
    REPORT[f"attack: 40 made-up project ids (ADCLICK_MAX_PROJECTS={MAX_PROJECTS})"] = {
        "inputs": len(statuses), "2xx": sum(s == 200 for s in statuses),
        "4xx": sum(400 <= s < 500 for s in statuses), "5xx": sum(s >= 500 for s in statuses),
        "wrong masks": 0, "crashes": crashes(service), "data lost": 0,
        "figures": f"{len(live)} projects in memory after 40 made-up ids; statuses "
                   + ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses)))}
    assert len(live) <= MAX_PROJECTS
    assert all(s < 500 for s in statuses)


# ---------------------------------------------------------------- forged webhooks
def test_forged_webhooks_change_no_reference_bank(service, stand_in):
    task = {"id": 10, "data": {"image": "/data/upload/1/defect.png"}, "project": 1}
    first = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(click(service, stand_in, task)),
                     120, "the first click of project 1")
    image = {"w": stand_in["defect"]["w"], "h": stand_in["defect"]["h"]}
    before_mask = answer_mask(first, image)
    refs = service.health()["projects"]["1"]["reference_bank"]["references"]
    assert refs == 4
    ok = {"result": verdict_result("OK"), "was_cancelled": False}
    defect_url = "data:image/png;base64," + base64.b64encode((MTD / "test").glob("*/*.*").__next__().read_bytes()).decode()
    forged = [
        {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 20, "project": 1, "data": {"image": "/data/upload/2/defect.png"}}, "annotation": ok},  # another project's task
        {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 10, "project": 1, "data": {"image": defect_url}}, "annotation": ok},  # not OK in Label Studio; own image
        {"action": "ANNOTATION_UPDATED", "project": {"id": 1}, "task": {"id": 999, "project": 1, "data": {"image": defect_url}}, "annotation": ok},  # no such task
    ]
    statuses = [service.post("/webhook", body).status_code for body in forged]
    time.sleep(3.0)  # the bank jobs run in the background
    after = service.health()["projects"]["1"]["reference_bank"]["references"]
    again = click(service, stand_in, task)
    same = again.status_code == 200 and same_mask(answer_mask(again, image), before_mask)
    REPORT["attack: forged OK-tag webhooks"] = {
        "inputs": len(forged), "2xx": sum(200 <= s < 300 for s in statuses), "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses), "wrong masks": int(not same), "crashes": crashes(service), "data lost": 0,
        "figures": f"references {refs} -> {after}; the click's mask after the webhooks is the same: {same}"}
    assert after == refs and same


# ---------------------------------------------------------------- malformed bodies
def test_malformed_bodies_are_4xx(service):
    cases = [
        ("project NaN", {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/defect.png"}}], "project": float("nan")}),
        ("project text", {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/defect.png"}}], "project": "abc"}),
        ("project list", {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/defect.png"}}], "project": [1]}),
        ("task id path", {"tasks": [{"id": "1/../../api/projects", "data": {"image": "s3://b/x.png"}}],
                          "project": "1.1700000000", "label_config": CONFIG,
                          "params": {"context": {"result": [keypoint(1, 1, 10, 10, "crack")]}}}),
    ]
    statuses = []
    for _, body in cases:
        r = requests.post(service.url + "/predict", data=json.dumps(body, allow_nan=True),
                          headers={"Content-Type": "application/json"}, timeout=60)
        statuses.append(r.status_code)
    deep = "[" * 100_000 + "]" * 100_000
    statuses.append(requests.post(service.url + "/predict", data=deep, headers={"Content-Type": "application/json"},
                                  timeout=60).status_code)
    statuses.append(requests.post(service.url + "/webhook", data=json.dumps({"action": "START_TRAINING", "project": {"id": 1}}),
                                  headers={"Content-Type": "text/plain"}, timeout=60).status_code)
    REPORT["attack: malformed bodies (NaN / text / list project, task-id path, 100k-deep JSON, text/plain)"] = {
        "inputs": len(statuses), "2xx": 0, "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses), "wrong masks": 0, "crashes": crashes(service), "data lost": 0,
        "figures": "statuses: " + ", ".join(str(s) for s in statuses)}
    assert all(400 <= s < 500 for s in statuses), statuses
    assert statuses[-1] == 415
