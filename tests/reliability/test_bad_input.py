"""Bad input against the real gunicorn service: malformed bodies, label configs, contexts, clicks,
images and URLs. Each malformed one must get a 4xx JSON error (never a 5xx), images that are odd
but valid (1x1, 16-bit, CMYK, animated, palette) a mask of their own size; the worker never
restarts, and the next valid click gets the same mask as before the attack."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from tests.e2e.helpers import pick_defects
from tests.test_backend_fakes import ForeignServer

from .conftest import REPORT, answer_mask, click_body, make_project, same_mask

pytestmark = pytest.mark.reliability

MAX_REQUEST_MB = 2
MAX_CLICKS = 20
MAX_TASKS = 50


def image_url(im: Image.Image, fmt: str, **save) -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def png_data(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def odd_images() -> dict[str, str]:
    """Valid images of unusual kinds, as data: URLs."""
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "image 1x1": image_url(Image.new("RGB", (1, 1), (128, 128, 128)), "PNG"),
        "image 16-bit grey": image_url(Image.fromarray((np.arange(96 * 128).reshape(96, 128) * 5).astype(np.uint16)),
                                       "PNG"),
        "image CMYK JPEG": image_url(rgb.convert("CMYK"), "JPEG"),
        "image animated GIF": "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode(),
        "image palette PNG with transparency": image_url(rgb.convert("P"), "PNG", transparency=0),
        "image greyscale + alpha": image_url(rgb.convert("LA"), "PNG"),
    }


def test_malformed_inputs_are_4xx_and_change_nothing(label_studio, mtd_dir, start_service):
    project = make_project(label_studio, mtd_dir, "bad input", pick_defects(mtd_dir, per_type=1)[:2])
    image = project["images"][0]
    svc = start_service("bad-input", ADCLICK_MAX_REQUEST_MB=MAX_REQUEST_MB, ADCLICK_MAX_CLICKS=MAX_CLICKS,
                        ADCLICK_MAX_TASKS=MAX_TASKS, ADCLICK_ALLOWED_HOSTS="localhost")
    valid = click_body(project, image, [(image["w"] / 2, image["h"] / 2, True)])
    first = svc.post("/predict", valid)
    assert first.status_code == 200, first.text
    before = answer_mask(first, image)
    pid_before = svc.worker_pid()
    redirector = ForeignServer()
    redirector.redirects["/to-metadata"] = "http://169.254.169.254/latest/meta-data/"
    redirector.redirects["/to-loopback"] = f"{svc.url}/health"

    def with_url(url: str) -> dict:
        body = json.loads(json.dumps(valid))
        body["tasks"][0]["data"]["image"] = url
        return body

    def with_clicks(result) -> dict:
        body = json.loads(json.dumps(valid))
        body["params"]["context"]["result"] = result
        return body

    def with_click_value(value) -> dict:
        body = json.loads(json.dumps(valid))
        body["params"]["context"]["result"][0]["value"] = value
        return body

    def with_config(config, project_uid: str = "9999.1700000000") -> dict:
        body = json.loads(json.dumps(valid))
        body["label_config"], body["project"] = config, project_uid
        return body

    kp = valid["params"]["context"]["result"][0]
    truncated_png = png_data(64, 48)[:300]
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (90, 90, 90)).save(buf, format="JPEG")
    truncated_jpeg = buf.getvalue()[: len(buf.getvalue()) // 3]
    bomb = io.BytesIO()
    Image.new("L", (16000, 16000)).save(bomb, format="PNG")  # 256 MP in a few hundred kB
    billion_laughs = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                      + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 9))
                      + ']><View><Image name="image" value="$image"/><Text value="&lol8;"/></View>')

    # (name, method, path, json body or raw bytes)
    malformed: list[tuple[str, str, str, object]] = [
        ("body: not JSON", "POST", "/predict", b"this is not json"),
        ("body: empty", "POST", "/predict", b""),
        ("body: a JSON array", "POST", "/predict", []),
        ("body: a JSON string", "POST", "/predict", "tasks"),
        ("body: tasks not a list", "POST", "/predict", {**valid, "tasks": "all"}),
        ("body: tasks empty", "POST", "/predict", {**valid, "tasks": []}),
        ("body: a task not an object", "POST", "/predict", {**valid, "tasks": [7]}),
        ("body: above ADCLICK_MAX_REQUEST_MB", "POST", "/predict",
         {**valid, "pad": "x" * (MAX_REQUEST_MB * 1024 * 1024 + 10)}),
        ("body: more tasks than ADCLICK_MAX_TASKS", "POST", "/predict",
         {**valid, "tasks": valid["tasks"] * (MAX_TASKS + 1), "params": {}}),
        ("body: project not an id", "POST", "/predict", {**valid, "project": "drop table"}),
        ("body: no project", "POST", "/predict", {k: v for k, v in valid.items() if k != "project"}
         | {"tasks": [{"id": 1, "data": {"image": image["url"]}}]}),
        ("label config: empty", "POST", "/predict", with_config("")),
        ("label config: not XML", "POST", "/predict", with_config("<View><Image")),
        ("label config: no KeyPoint or Brush", "POST", "/predict",
         with_config('<View><Image name="image" value="$image"/></View>')),
        ("label config: Brush without an Image", "POST", "/predict",
         with_config('<View><BrushLabels name="defect" toName="x"><Label value="a"/></BrushLabels></View>')),
        ("label config: billion laughs", "POST", "/predict", with_config(billion_laughs)),
        ("setup: label config not XML", "POST", "/setup", {"project": "9998.1700000000", "schema": "<<<"}),
        ("context: not an object", "POST", "/predict", {**valid, "params": {"context": "click"}}),
        ("context: result not a list", "POST", "/predict", with_clicks("x")),
        ("context: result items not objects", "POST", "/predict", with_clicks([1, 2])),
        ("context: empty result", "POST", "/predict", with_clicks([])),
        ("click: outside the image", "POST", "/predict", with_click_value({**kp["value"], "x": 150.0})),
        ("click: negative coordinate", "POST", "/predict", with_click_value({**kp["value"], "y": -3.0})),
        ("click: coordinate not a number", "POST", "/predict", with_click_value({**kp["value"], "x": "left"})),
        ("click: coordinate NaN", "POST", "/predict",
         json.dumps(with_click_value({**kp["value"], "x": float("nan")})).encode()),
        ("click: no value", "POST", "/predict", with_click_value(None)),
        ("click: more than ADCLICK_MAX_CLICKS", "POST", "/predict", with_clicks([kp] * (MAX_CLICKS + 1))),
        ("image: truncated PNG", "POST", "/predict",
         with_url("data:image/png;base64," + base64.b64encode(truncated_png).decode())),
        ("image: truncated JPEG", "POST", "/predict",
         with_url("data:image/jpeg;base64," + base64.b64encode(truncated_jpeg).decode())),
        ("image: decompression bomb (256 MP)", "POST", "/predict",
         with_url("data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode())),
        ("image: text, not an image", "POST", "/predict", with_url("data:image/png;base64," +
                                                               base64.b64encode(b"hello world").decode())),
        ("image: data URL not base64", "POST", "/predict", with_url("data:image/png,rawbytes")),
        ("image: empty data URL", "POST", "/predict", with_url("data:image/png;base64,")),
        ("URL: private address", "POST", "/predict", with_url("http://10.0.0.1/part.png")),
        ("URL: cloud metadata", "POST", "/predict", with_url("http://169.254.169.254/latest/meta-data/")),
        ("URL: IPv6 loopback", "POST", "/predict", with_url("http://[::1]:22/x.png")),
        ("URL: file://", "POST", "/predict", with_url("file:///etc/passwd")),
        ("URL: ftp://", "POST", "/predict", with_url("ftp://example.com/a.png")),
        ("URL: gopher://", "POST", "/predict", with_url("gopher://127.0.0.1:70/_x")),
        ("URL: listed host redirecting to metadata", "POST", "/predict", with_url(redirector.url + "/to-metadata")),
        ("URL: listed host redirecting to loopback", "POST", "/predict", with_url(redirector.url + "/to-loopback")),
        ("URL: local file outside the storage", "POST", "/predict", with_url("/data/local-files/?d=../../etc/passwd")),
        ("URL: unknown upload", "POST", "/predict", with_url("/data/upload/1/no-such-file.png")),
        ("URL: not a URL", "POST", "/predict", with_url("just words")),
        ("webhook: no action", "POST", "/webhook", {"project": project["project"]}),
        ("webhook: Start Training without a project id", "POST", "/webhook",
         {"action": "START_TRAINING", "project": {"title": "x"}}),
        ("endpoint: unknown", "POST", "/predict/../admin", {}),
        ("endpoint: wrong method", "DELETE", "/predict", {}),
    ]
    odd = odd_images()

    rows, statuses, bad = [], {}, []
    for name, method, path, body in malformed:
        kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        r = requests.request(method, svc.url + path, timeout=120, **kw)
        statuses[name] = r.status_code
        try:
            err = r.json().get("error")
        except ValueError:
            err = None
        if not (400 <= r.status_code < 500 and isinstance(err, str) and err):
            bad.append((name, r.status_code, r.text[:200]))
        rows.append((name, r.status_code, (err or "")[:90]))
    wrong = []
    for name, url in odd.items():
        r = svc.post("/predict", with_url(url))
        statuses[name] = r.status_code
        if r.status_code == 200:
            results = r.json()["results"][0]["result"]
            im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            if any((x["original_width"], x["original_height"]) != im.size for x in results):
                wrong.append(name)
        elif not 400 <= r.status_code < 500:
            bad.append((name, r.status_code, r.text[:200]))
        rows.append((name, r.status_code, "" if r.status_code == 200 else r.json().get("error", "")[:90]))
    redirector.close()

    after = svc.post("/predict", valid)
    crashed = int(svc.worker_pid() != pid_before)
    same = after.status_code == 200 and same_mask(answer_mask(after, image), before)
    print("\n" + "\n".join(f"{s}  {n}: {e}" for n, s, e in rows))
    codes = list(statuses.values())
    REPORT[f"bad input: {len(malformed)} malformed + {len(odd)} odd but valid"] = {
        "inputs": len(codes), "2xx": sum(200 <= c < 300 for c in codes), "4xx": sum(400 <= c < 500 for c in codes),
        "5xx": sum(c >= 500 for c in codes), "wrong masks": len(wrong) + int(not same), "crashes": crashed,
        "data lost": 0, "figures": "statuses: " + ", ".join(f"{c}: {codes.count(c)}" for c in sorted(set(codes)))}
    assert len(malformed) >= 30
    assert not bad, bad
    assert not wrong, f"masks not of the image's size: {wrong}"
    assert not crashed, "the worker restarted"
    assert same, "the valid click after the attack answers differently"
