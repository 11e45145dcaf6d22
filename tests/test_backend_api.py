"""The HTTP protocol through Flask's test client, with a fake click model and a fake Label Studio
file server (real HTTP on 127.0.0.1): happy paths, caching, and every bad input -> clear 4xx JSON."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from ml_backend.api import create_app
from ml_backend.model import Backend, Settings
from tests.test_backend_fakes import TOKEN, FakeBank, FakeLabelStudio, FakePredictor, png_bytes

REPO = Path(__file__).resolve().parents[1]
CONFIG = (REPO / "label_config" / "interactive_weak.xml").read_text()
PROJECT = "1.1700000000"
W, H = 64, 48


@pytest.fixture
def ls():
    server = FakeLabelStudio()
    server.add_file("/data/upload/1/defect.png", png_bytes(W, H, seed=1))
    server.add_file("/data/upload/1/other.png", png_bytes(W, H, seed=2))
    server.add_file("/data/upload/1/corrupt.png", b"\x89PNG\r\n\x1a\nthis is not really a png")
    yield server
    server.close()


@pytest.fixture
def refs_dir(tmp_path):
    d = tmp_path / "refs"
    d.mkdir()
    for i in range(3):
        (d / f"good{i}.png").write_bytes(png_bytes(W, H, seed=100 + i))
    return d


def make_backend(tmp_path, refs_dir=None, predictor_factory=FakePredictor, **kw):
    settings = Settings(
        model_dir=tmp_path / "models", reference_dir=str(refs_dir) if refs_dir else None,
        image_cache_dir=str(tmp_path / "imgcache"), bank_refresh_s=0, **kw,
    )
    return Backend(settings, predictor_factory=predictor_factory, bank_cls=FakeBank)


@pytest.fixture
def env(monkeypatch, ls):
    monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    for k in ("LABEL_STUDIO_HOST", "LABEL_STUDIO_ACCESS_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return ls


@pytest.fixture
def backend(tmp_path, refs_dir, env):
    b = make_backend(tmp_path, refs_dir)
    yield b
    b.executor.shutdown(wait=True)


@pytest.fixture
def client(backend):
    return create_app(backend).test_client()


def kp(x, y, label="crack", positive=None):
    item = {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
            "from_name": "click", "to_name": "image", "type": "keypointlabels"}
    if positive is not None:
        item["is_positive"] = positive
    return item


def task(url="/data/upload/1/defect.png", tid=7):
    return {"id": tid, "data": {"image": url}, "project": 1}


def predict(client, points, url="/data/upload/1/defect.png", config=CONFIG, tasks=None):
    body = {"tasks": tasks or [task(url)], "project": PROJECT, "label_config": config,
            "params": {"context": {"result": points} if points is not None else None}}
    return client.post("/predict", json=body)


def assert_error(resp, status, *words):
    assert resp.status_code == status, resp.get_json()
    body = resp.get_json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    for w in words:
        assert w in body["error"], body["error"]
    # Label Studio only shows the reason phrase: it carries the message too.
    assert body["error"][:40].encode("ascii", "replace").decode() in resp.status
    return body["error"]


# ---------------------------------------------------------------- happy paths


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.get_json()
    assert h["status"] == "UP" and h["model_class"] == "ADClickModel"
    assert "Interactive preannotations" in h["hint"] and "Auto-Annotation" in h["hint"]
    assert h["seg_model"]["iterations"] >= 1 and h["seg_model"]["projects"] == {}
    assert "state_cache" in h and "projects" in h


def test_setup_returns_model_version(client):
    r = client.post("/setup", json={"project": PROJECT, "schema": CONFIG, "hostname": "http://x", "access_token": "t"})
    assert r.status_code == 200
    assert r.get_json()["model_version"].startswith("ADClick-")


def test_click_returns_brush_rle_at_the_click(client, backend):
    r = predict(client, [kp(50, 50)])
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert len(body["results"]) == 1
    res = body["results"][0]
    assert res["model_version"].startswith("ADClick-") and 0 < res["score"] <= 1
    (item,) = res["result"]
    assert item["type"] == "brushlabels" and item["from_name"] == "defect" and item["to_name"] == "image"
    assert (item["original_width"], item["original_height"]) == (W, H)
    assert item["value"]["brushlabels"] == ["crack"]
    mask = decode_rle(item["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 127
    cy, cx = np.argwhere(mask).mean(axis=0)
    assert abs(cx - 32) < 1.5 and abs(cy - 24) < 1.5  # 50 % of 64 x 48


def test_second_click_reuses_the_image_state_and_previous_mask(client, backend):
    assert predict(client, [kp(20, 20)]).status_code == 200
    assert predict(client, [kp(20, 20), kp(70, 70, positive=False)]).status_code == 200
    assert predict(client, [kp(20, 20), kp(70, 70, positive=False), kp(40, 60)]).status_code == 200
    shared = backend.predictor().shared
    assert shared["set_image"] == 1 and shared["predict"] == 3
    assert [c["prev_mask"] for c in shared["calls"]] == [False, True, True]
    assert [len(c["clicks"]) for c in shared["calls"]] == [1, 2, 3]
    assert [c.positive for c in shared["calls"][-1]["clicks"]] == [True, False, True]
    assert backend.cache.stats()["hits"] == 2
    # another image -> another state
    assert predict(client, [kp(20, 20)], url="/data/upload/1/other.png").status_code == 200
    assert shared["set_image"] == 2


def test_label_selects_defect_type_and_brush_label(client, backend):
    r = predict(client, [kp(30, 30, label="fray")])
    assert r.get_json()["results"][0]["result"][0]["value"]["brushlabels"] == ["fray"]
    assert backend.predictor().shared["calls"][-1]["defect_type"] == "fray"


def test_missing_is_positive_is_a_positive_click(client, backend):
    r = predict(client, [kp(30, 30)])  # no is_positive key at all (restored draft)
    assert r.get_json()["results"][0]["result"], "a missing is_positive must not be negative"
    assert backend.predictor().shared["calls"][-1]["clicks"][0].positive is True


def test_only_negative_clicks_give_an_empty_result(client):
    r = predict(client, [kp(30, 30, positive=False)])
    assert r.status_code == 200
    assert r.get_json()["results"][0]["result"] == []


def test_no_context_means_preannotation_one_result_per_task(client):
    tasks = [task(tid=i) for i in range(3)]
    r = predict(client, None, tasks=tasks)
    assert r.status_code == 200
    res = r.get_json()["results"]
    assert len(res) == 3 and all(x["result"] == [] for x in res)


def test_start_training_is_answered_at_once(client):
    """Details of the training job: tests/test_backend_training.py."""
    t0 = time.time()
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1, "label_config": CONFIG}})
    assert time.time() - t0 < 1.0
    assert r.status_code == 200
    assert r.get_json()["status"] in ("training started", "already training")
    h = client.get("/health").get_json()
    assert h["training"]["1"]["last_request"] and h["training"]["1"]["state"] in ("running", "failed", "done")


def test_versions(client):
    r = client.get("/versions")
    assert r.status_code == 200 and r.get_json()["versions"]


def test_unknown_webhook_actions_are_fine(client):
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert r.status_code == 200


# ---------------------------------------------------------------- bad input -> clear 4xx JSON


def test_malformed_json(client):
    r = client.post("/predict", data="{not json", content_type="application/json")
    assert_error(r, 400, "JSON")
    assert_error(client.post("/predict", json=[1, 2]), 400, "object")
    assert_error(client.post("/setup", data="", content_type="application/json"), 400, "JSON")


def test_missing_tasks_and_project(client):
    assert_error(client.post("/predict", json={"tasks": [], "project": PROJECT}), 400, "tasks")
    assert_error(client.post("/predict", json={"project": PROJECT}), 400, "tasks")
    assert_error(client.post("/setup", json={"schema": CONFIG}), 400, "project")
    assert_error(client.post("/setup", json={"project": "abc", "schema": CONFIG}), 400, "project")
    assert_error(client.post("/webhook", json={"project": {"id": 1}}), 400, "action")


def test_clicks_outside_the_image(client):
    assert_error(predict(client, [kp(120, 50)]), 400, "outside the image")


def test_empty_context(client):
    assert_error(predict(client, []), 400, "empty context")


def test_config_without_our_tags(client):
    bad = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices></View>'
    assert_error(predict(client, [kp(10, 10)], config=bad), 400, "KeyPointLabels")
    assert_error(client.post("/setup", json={"project": PROJECT, "schema": bad}), 400, "KeyPointLabels")


def test_task_without_image(client):
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "x"}}], "project": PROJECT,
                                      "label_config": CONFIG, "params": {"context": {"result": [kp(1, 1)]}}})
    assert_error(r, 400, "data.image")


def test_corrupt_image(client):
    assert_error(predict(client, [kp(10, 10)], url="/data/upload/1/corrupt.png"), 400, "corrupt")


def test_unknown_image_url(client):
    assert_error(predict(client, [kp(10, 10)], url="/data/upload/1/nope.png"), 404, "not found", "nope.png")
    assert_error(predict(client, [kp(10, 10)], url="ftp://example.com/x.png"), 404, "unknown image URL")
    assert_error(predict(client, [kp(10, 10)], url="just-a-name.png"), 404, "unknown image URL")


def test_wrong_token_names_the_api_key(client, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "b" * 40)
    err = assert_error(predict(client, [kp(10, 10)]), 424, "LABEL_STUDIO_API_KEY", "401")
    assert "refused" in err


def test_unreachable_label_studio_names_the_url(client, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")  # discard port: connection refused
    assert_error(predict(client, [kp(10, 10)]), 424, "LABEL_STUDIO_URL")


def test_no_label_studio_url_at_all(client, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL")
    assert_error(predict(client, [kp(10, 10)]), 424, "LABEL_STUDIO_URL")


def test_no_reference_images_yet(tmp_path, env):
    b = make_backend(tmp_path, refs_dir=None)
    env.exports["1"] = []
    c = create_app(b).test_client()
    err = assert_error(predict(c, [kp(10, 10)]), 409, "no defect-free reference images")
    assert "OK" in err and "ADCLICK_REFERENCE_DIR" in err


def test_unknown_endpoint_and_method(client):
    assert_error(client.get("/nope"), 404, "/nope")
    assert_error(client.get("/predict"), 405, "GET")


def test_unexpected_errors_are_500_json_and_the_worker_survives(tmp_path, refs_dir, env):
    class Broken(FakePredictor):
        def predict(self, *a, **k):
            raise RuntimeError("boom")

        def with_bank(self, bank):
            return Broken(bank, self.radius, self.shared)

    b = make_backend(tmp_path, refs_dir, predictor_factory=Broken)
    c = create_app(b).test_client()
    assert_error(predict(c, [kp(10, 10)]), 500, "boom")
    assert c.get("/health").status_code == 200


def test_core_input_errors_become_400(tmp_path, refs_dir, env):
    from adclick_core.utils.errors import InputError

    class Picky(FakePredictor):
        def predict(self, *a, **k):
            raise InputError("click (99, 99) is outside the 64x48 image")

        def with_bank(self, bank):
            return Picky(bank, self.radius, self.shared)

    c = create_app(make_backend(tmp_path, refs_dir, predictor_factory=Picky)).test_client()
    assert_error(predict(c, [kp(10, 10)]), 400, "outside")


def test_missing_weights_are_503_with_the_reason(tmp_path, refs_dir, env):
    from adclick_core.utils.errors import MissingWeightsError

    def no_weights():
        raise MissingWeightsError("no checkpoint at /x.pt; set ADCLICK_CHECKPOINT")

    b = make_backend(tmp_path, refs_dir, predictor_factory=no_weights)
    c = create_app(b).test_client()
    r = predict(c, [kp(10, 10)])
    assert r.status_code == 503 and "ADCLICK_CHECKPOINT" in r.get_json()["error"]
    assert c.get("/health").get_json()["click_model"]["error"]
