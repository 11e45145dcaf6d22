"""Authentication, the outbound URL policy (no SSRF) and input bounds, through Flask's test client
against the fake Label Studio (real HTTP on 127.0.0.1) and a second, foreign image server."""
from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from PIL import Image

from ml_backend import convert
from ml_backend.api import create_app
from ml_backend.url_policy import PolicySession, TooLarge, UrlPolicy, UrlRefused
from tests.test_backend_api import CONFIG, PROJECT, assert_error, backend, client, env, kp, ls, predict, refs_dir, task  # noqa: F401,E501
from tests.test_backend_fakes import TOKEN, ForeignServer, png_bytes

USER, PASS = "annotator", "s3cret-pass"


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def foreign():
    s = ForeignServer()
    s.files["/defect.png"] = png_bytes(64, 48, seed=1)
    yield s
    s.close()


@pytest.fixture
def auth_client(backend, monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", USER)
    monkeypatch.setenv("BASIC_AUTH_PASS", PASS)
    return create_app(backend).test_client()


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("headers", [{}, basic(USER, "wrong"), basic("someone", PASS), {"Authorization": "Basic !!"},
                                     {"Authorization": f"Bearer {PASS}"}, basic(USER, PASS + "x")])
@pytest.mark.parametrize("method,path", [("POST", "/predict"), ("POST", "/setup"), ("POST", "/webhook"),
                                         ("POST", "/train"), ("POST", "/adapt"), ("GET", "/versions"),
                                         ("POST", "/validate")])
def test_every_endpoint_wants_the_credentials(auth_client, headers, method, path):
    r = auth_client.open(path, method=method, json={"project": "1.1", "tasks": [task()]}, headers=headers)
    assert_error(r, 401, "BASIC_AUTH_USER", "Settings > Webhooks" if path == "/webhook" else "Use authentication")
    assert r.headers["WWW-Authenticate"].startswith("Basic realm=")


def test_right_credentials_get_a_mask(auth_client):
    body = {"tasks": [task()], "project": "1.1700000000", "label_config": CONFIG,
            "params": {"context": {"result": [kp(30, 40)]}}}
    r = auth_client.post("/predict", json=body, headers=basic(USER, PASS))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["results"][0]["result"][0]["type"] == "brushlabels"


def test_health_without_credentials_says_only_up(auth_client):
    open_health = auth_client.get("/health").get_json()
    assert open_health["status"] == "UP" and "projects" not in open_health and "click_model" not in open_health
    full = auth_client.get("/health", headers=basic(USER, PASS)).get_json()
    assert full["status"] == "UP" and "click_model" in full
    # Wrong credentials are a 401 on /health too: Label Studio's Connect Model then says so.
    assert_error(auth_client.get("/health", headers=basic(USER, "nope")), 401, "BASIC_AUTH_USER")


def test_half_configured_auth_refuses_to_start(backend, monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", USER)
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    with pytest.raises(RuntimeError, match="BASIC_AUTH_PASS"):
        create_app(backend)


def test_without_auth_configured_the_backend_is_open(client):
    assert client.get("/versions").status_code == 200


# ---------------------------------------------------------------- URL policy, unit level


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.5/a.png",
                                 "http://192.168.1.1/a.png", "http://[::1]:8080/a.png", "http://127.0.0.2/a.png",
                                 "http://0.0.0.0/a.png", "http://[::ffff:169.254.169.254]/a.png"])
def test_non_public_addresses_are_refused_even_when_any_public_host_is_allowed(url):
    policy = UrlPolicy("http://127.0.0.1:8080", allowed_hosts=("*",))
    with pytest.raises(UrlRefused, match="non-public address"):
        policy.check(url)
    with pytest.raises(UrlRefused, match="non-public address"):  # a redirect from Label Studio, too
        policy.check(url, redirected_by_label_studio=True)


def test_policy_allows_the_label_studio_host_and_listed_names_only():
    policy = UrlPolicy("http://127.0.0.1:8080", allowed_hosts=("images.example.com", "*.cdn.example.org"))
    policy.check("http://127.0.0.1:8080/data/upload/1/a.png")
    policy.check("https://images.example.com/a.png")
    policy.check("https://eu.cdn.example.org/a.png")
    for url in ("http://127.0.0.1:8081/a.png", "https://evil.example.net/a.png", "https://cdn.example.org.evil.net/a"):
        with pytest.raises(UrlRefused, match="ADCLICK_ALLOWED_HOSTS"):
            policy.check(url)
    for url in ("file:///etc/passwd", "gopher://127.0.0.1:8080/", "ftp://images.example.com/a.png"):
        with pytest.raises(UrlRefused, match="only http"):
            policy.check(url)


def test_an_unresolvable_host_is_a_424():
    with pytest.raises(UrlRefused) as e:
        UrlPolicy("", allowed_hosts=("*",)).check("http://no-such-host.invalid/a.png")
    assert e.value.status == 424


def test_the_token_goes_to_label_studio_only_and_redirects_are_rechecked(foreign, ls):
    policy = UrlPolicy(ls.url, allowed_hosts=("localhost",), max_bytes=1 << 20)
    s = PolicySession(policy, timeout_s=5)
    r = s.get(foreign.url + "/defect.png", headers={"Authorization": "Token secret"})
    assert r.status_code == 200 and r.content == foreign.files["/defect.png"]
    assert foreign.seen[-1] == ("/defect.png", None)
    # A listed host redirecting to the metadata address is refused at the hop.
    foreign.redirects["/hop"] = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(UrlRefused, match="ADCLICK_ALLOWED_HOSTS"):
        s.get(foreign.url + "/hop")
    # Label Studio redirecting to another loopback origin (a "presigned URL" into the LAN) is refused
    # unless listed by name: listed here, so it is followed, without the token.
    ls.redirects["/cloud"] = foreign.url + "/defect.png"
    r = s.get(ls.url + "/cloud", headers={"Authorization": f"Token {TOKEN}"})
    assert r.status_code == 200 and foreign.seen[-1] == ("/defect.png", None)
    strict = PolicySession(UrlPolicy(ls.url), timeout_s=5)
    with pytest.raises(UrlRefused, match="non-public address"):
        strict.get(ls.url + "/cloud", headers={"Authorization": f"Token {TOKEN}"})


def test_downloads_stop_at_the_byte_bound(foreign):
    foreign.files["/big.png"] = b"\0" * (3 << 20)
    s = PolicySession(UrlPolicy("", allowed_hosts=("localhost",), max_bytes=1 << 20), timeout_s=5)
    with pytest.raises(TooLarge, match="ADCLICK_MAX_IMAGE_MB"):
        s.get(foreign.url + "/big.png")


# ---------------------------------------------------------------- through the HTTP API


def test_ssrf_urls_in_tasks_are_refused_with_the_variable_to_set(client, foreign, monkeypatch):
    for url in ("http://169.254.169.254/latest/meta-data/iam", foreign.url + "/defect.png",
                "http://10.1.2.3/x.png"):
        err = assert_error(predict(client, [kp(10, 10)], url=url), 403, "refused", "ADCLICK_ALLOWED_HOSTS")
        assert url.split("/")[2].split(":")[0] in err
    assert not foreign.seen, "a refused URL must not be fetched at all"
    monkeypatch.setenv("ADCLICK_ALLOWED_HOSTS", "localhost")
    assert predict(client, [kp(10, 10)], url=foreign.url + "/defect.png").status_code == 200
    assert foreign.seen and foreign.seen[-1][1] is None, "the Label Studio token leaked to a foreign host"


def test_label_studio_redirect_into_the_network_is_refused(client, ls, foreign):
    ls.redirects["/data/upload/1/moved.png"] = foreign.url + "/defect.png"
    assert_error(predict(client, [kp(10, 10)], url="/data/upload/1/moved.png"), 403, "non-public address",
                 "ADCLICK_ALLOWED_HOSTS")
    assert not foreign.seen


def test_request_body_bound(backend, monkeypatch):
    monkeypatch.setenv("ADCLICK_MAX_REQUEST_MB", "1")
    c = create_app(backend).test_client()
    r = c.post("/predict", data=b"{" + b" " * (2 << 20) + b"}", content_type="application/json")
    assert_error(r, 413, "ADCLICK_MAX_REQUEST_MB")


def test_image_byte_bound(client, ls, monkeypatch):
    monkeypatch.setenv("ADCLICK_MAX_IMAGE_MB", "0.01")
    ls.add_file("/data/upload/1/large.png", png_bytes(64, 48, seed=1) + b"\0" * 20000)
    assert_error(predict(client, [kp(10, 10)], url="/data/upload/1/large.png"), 413, "ADCLICK_MAX_IMAGE_MB")
    data_url = "data:image/png;base64," + base64.b64encode(b"\0" * 20000).decode()
    assert_error(predict(client, [kp(10, 10)], url=data_url), 413, "ADCLICK_MAX_IMAGE_MB")


def test_image_pixel_bound(client, ls, monkeypatch):
    ls.add_file("/data/upload/1/wide.png", png_bytes(200, 48, seed=3))
    monkeypatch.setattr(convert, "MAX_IMAGE_PIXELS", 64 * 48)  # the 64x48 references pass
    assert_error(predict(client, [kp(10, 10)], url="/data/upload/1/wide.png"), 413, "ADCLICK_MAX_IMAGE_PIXELS",
                 "200x48")


def test_decompression_bomb_is_a_413_without_decoding(client, ls):
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")  # 400 MP, a few hundred kB
    ls.add_file("/data/upload/1/bomb.png", buf.getvalue())
    assert_error(predict(client, [kp(10, 10)], url="/data/upload/1/bomb.png"), 413, "ADCLICK_MAX_IMAGE_PIXELS")


def test_click_and_task_count_bounds(client, backend, monkeypatch):
    monkeypatch.setattr(convert, "MAX_CLICKS", 5)
    assert_error(predict(client, [kp(10 + i, 10) for i in range(6)]), 400, "ADCLICK_MAX_CLICKS", "6 clicks")
    assert predict(client, [kp(10 + i, 10) for i in range(5)]).status_code == 200
    monkeypatch.setenv("ADCLICK_MAX_TASKS", "3")
    c = create_app(backend).test_client()
    assert_error(predict(c, None, tasks=[task(tid=i) for i in range(4)]), 413, "ADCLICK_MAX_TASKS")


@pytest.mark.parametrize("url", ["http://10.0.0.1\\@ls.example:8080/x.png", "http://127.0.0.1:9\\@ls.example:8080/x",
                                 "http://ls.example:8080\\@10.0.0.1/x.png", "http://10.0.0.1 @ls.example:8080/x",
                                 "http://ls.example\t:8080/x.png"])
def test_urls_that_parsers_read_differently_are_refused_before_any_connection(url):
    # the standard library sees the Label Studio host, urllib3 (which connects) another one
    policy = UrlPolicy("http://ls.example:8080", allowed_hosts=("ls.example",))
    with pytest.raises(UrlRefused, match="host part"):
        policy.check(url)
    with pytest.raises(UrlRefused, match="host part"):
        policy.check(url, redirected_by_label_studio=True)
    policy.check("http://ls.example:8080/data/x\\y.png")  # a backslash in the path is no ambiguity


@pytest.mark.parametrize("url", ["http://100.100.100.200/latest/meta-data/", "http://100.64.0.1/a.png",
                                 "http://[2002:a9fe:a9fe::1]/a.png", "http://[fec0::1]/a.png",
                                 "http://[64:ff9b::a9fe:a9fe]/a.png", "http://198.18.0.1/a.png"])
def test_ranges_that_lead_into_private_networks_are_not_public(url):
    policy = UrlPolicy("http://127.0.0.1:8080", allowed_hosts=("*",))
    with pytest.raises(UrlRefused, match="non-public address"):
        policy.check(url)


def test_a_label_studio_redirect_that_parsers_read_differently_is_not_followed(foreign, ls):
    s = PolicySession(UrlPolicy(ls.url, allowed_hosts=("localhost",)), timeout_s=5)
    seen = len(foreign.seen)
    # urllib3 would connect to the foreign host with the token meant for Label Studio
    ls.redirects["/odd"] = foreign.url + "\\@" + ls.url.split("://", 1)[1] + "/defect.png"
    with pytest.raises(UrlRefused, match="host part"):
        s.get(ls.url + "/odd", headers={"Authorization": f"Token {TOKEN}"})
    assert len(foreign.seen) == seen  # nothing reached the other host, token or not


@pytest.mark.parametrize("project", [{"id": "abc"}, {"id": [1]}, {"id": 1e400}, {"id": "NaN"}, {"id": float("nan")},
                                     {"id": True}, "abc", [1]])
def test_a_malformed_project_id_is_a_400(client, project):
    body = json.dumps({"action": "PROJECT_UPDATED", "project": project}, allow_nan=True)
    r = client.post("/webhook", data=body, content_type="application/json")
    assert r.status_code == 400 and "project" in r.get_json()["error"]


@pytest.mark.parametrize("value", [[1, 2], "50,50", None])
def test_a_click_value_that_is_no_object_is_a_400(client, value):
    item = kp(50, 50)
    item["value"] = value
    r = client.post("/predict", json={"tasks": [task()], "project": PROJECT, "label_config": CONFIG,
                                      "params": {"context": {"result": [item]}}})
    assert r.status_code == 400 and "'value' must be an object" in r.get_json()["error"]


def test_json_only_with_a_json_content_type_and_never_nested_past_the_parser(client):
    hook = json.dumps({"action": "START_TRAINING", "project": {"id": 1}})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = client.post("/webhook", data=hook, content_type=ctype)  # what a cross-site form can send
        assert r.status_code == 415 and "application/json" in r.get_json()["error"], ctype
    r = client.post("/predict", data="[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert r.status_code == 400 and "nested too deeply" in r.get_json()["error"]


def test_a_brush_rle_is_checked_before_it_is_decoded(monkeypatch):
    from ml_backend.convert import decode_brush

    decoded = []
    monkeypatch.setattr("label_studio_sdk.converter.brush.decode_rle", lambda rle: decoded.append(rle) or [])
    small = [0] * 3000  # 3 kB
    for w, h, declared in ((4000, 3000, 4000 * 3000 * 4), (64, 48, 10**9), (64, 48, 0)):
        item = {"original_width": w, "original_height": h, "value": {"rle": list(declared.to_bytes(4, "big")) + small}}
        with pytest.raises(ValueError, match="brush mask claims|RLE declares"):
            decode_brush(item, 64, 48)
    for rle in ("AAAA", [1, 2], [300, 0, 0, 0, 0], None):
        with pytest.raises(ValueError, match="no RLE byte list"):
            decode_brush({"value": {"rle": rle}}, 64, 48)
    assert decoded == []  # nothing reached the decoder


def test_the_download_deadline_bounds_the_whole_download_not_each_read():
    import http.server
    import socketserver
    import threading
    import time

    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802 - one byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    srv = Server(("127.0.0.1", 0), Trickle)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/slow.png"
        t0 = time.monotonic()
        with pytest.raises(requests.Timeout, match="ADCLICK_DOWNLOAD_TIMEOUT"):
            PolicySession(UrlPolicy(url), timeout_s=1.0).get(url)
        assert time.monotonic() - t0 < 3.0  # the 20 s trickle was cut at the 1 s deadline
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("tid", ["1/../../api/projects", "7", -1, 1.5, True])
def test_a_task_id_that_is_no_whole_number_never_reaches_a_label_studio_url(client, ls, tid):
    body = {"tasks": [{"id": tid, "data": {"image": "s3://bucket/a.png"}}], "project": PROJECT, "label_config": CONFIG,
            "params": {"context": {"result": [kp(50, 50)]}}}
    seen = len(ls.requests)
    r = client.post("/predict", json=body)
    assert r.status_code == 400 and "task id" in r.get_json()["error"]
    assert len(ls.requests) == seen


def test_a_request_path_cannot_forge_a_log_line(auth_client, caplog):
    caplog.set_level("INFO", logger="ml_backend.api")
    forged = "/predict%0A2026-12-07 12:00:00 INFO ml_backend.api: POST /predict -> 200%0D"
    r = auth_client.post(forged, json={})  # no credentials: the 401 is logged with the path
    assert r.status_code == 401
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "ml_backend.api"]
    assert logged and all("\n" not in m and "\r" not in m for m in logged)
    assert any("\\x0a2026-12-07" in m for m in logged)  # kept, escaped


def test_a_huge_label_config_is_refused_quickly(client):
    import time

    labels = "".join(f'<Label value="t{i}"/>' for i in range(16000))
    xml = (f'<View><Image name="image" value="$image"/><BrushLabels name="defect" toName="image">{labels}'
           f'</BrushLabels><KeyPointLabels name="click" toName="image" smart="true">{labels}</KeyPointLabels></View>')
    t0 = time.monotonic()
    r = client.post("/validate", json={"config": xml})
    assert r.status_code == 400 and "at most" in r.get_json()["error"]
    assert time.monotonic() - t0 < 2.0
    many = "".join(f'<Label value="t{i}"/>' for i in range(1500))
    xml = (f'<View><Image name="image" value="$image"/><BrushLabels name="defect" toName="image">{many}'
           f'</BrushLabels><KeyPointLabels name="click" toName="image" smart="true">{many}</KeyPointLabels></View>')
    r = client.post("/validate", json={"config": xml})
    assert r.status_code == 400 and "1500 labels; at most 1000" in r.get_json()["error"]


def test_the_connection_goes_to_the_address_that_was_checked(foreign, monkeypatch):
    """No second DNS lookup between the check and the connection (DNS rebinding): a name the check
    resolved to a (stand-in) public address is connected to at that address, though DNS itself
    would answer differently (here: not at all)."""
    from ml_backend import url_policy

    checked = []

    def resolve_once(host, port):
        checked.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(url_policy, "resolve_addresses", resolve_once)
    monkeypatch.setattr(url_policy, "_public", lambda addr: addr == "127.0.0.1")
    s = PolicySession(UrlPolicy("", allowed_hosts=("*",), max_bytes=1 << 20), timeout_s=5)
    r = s.get(f"http://rebinding.invalid:{foreign.port}/defect.png")
    assert r.status_code == 200 and r.content == foreign.files["/defect.png"]
    assert checked == ["rebinding.invalid"]
