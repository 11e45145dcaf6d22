"""Start Training and ADClick-Seg pre-annotation, with fakes (no weights): export -> SegItems
conversion for each label kind, the background job (model_version changes only at the end, a
second request is answered at once, a failure keeps the old model and is reported in /health),
and /predict without context answering masks + an OK/NG verdict from a (fake) Seg model."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from ml_backend.api import create_app
from ml_backend.convert import parse_label_config, seg_items_of, task_labels
from ml_backend.model import Backend, Settings
from tests.test_backend_fakes import TOKEN, FakeBank, FakeLabelStudio, FakePredictor, png_bytes

REPO = Path(__file__).resolve().parents[1]
CONFIG = (REPO / "label_config" / "interactive_weak.xml").read_text()
CFG = parse_label_config(CONFIG)
PROJECT = "1.1700000000"
W, H = 64, 48


def rle_item(mask: np.ndarray, label: str, w: int = W, h: int = H) -> dict:
    return {"from_name": "defect", "to_name": "image", "type": "brushlabels", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": [int(v) for v in mask2rle(np.where(mask, 255, 0).astype(np.uint8))],
                      "brushlabels": [label]}}


def rect_item(x, y, w, h, label: str) -> dict:
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": W,
            "original_height": H, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                            "rectanglelabels": [label]}}


def verdict(v: str) -> dict:
    return {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [v]}}


def exported(tid: int, results: list, url="/data/upload/1/defect.png", **ann) -> dict:
    return {"id": tid, "data": {"image": url},
            "annotations": [{"id": tid * 10, "result": results, "was_cancelled": False,
                             "updated_at": "2026-01-01T00:00:00Z", **ann}]}


def square(y0=10, y1=20, x0=30, x1=44) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------- export -> SegItems


def test_brush_masks_become_exact_masks_per_defect_type():
    m1, m2 = square(), square(30, 40, 5, 15)
    labels, why = task_labels(exported(1, [rle_item(m1, "crack"), rle_item(m2, "crack"),
                                           rle_item(square(0, 5, 0, 5), "fray")]), CFG)
    assert labels is not None, why
    image = np.zeros((H, W, 3), np.uint8)
    items = {it.defect_type: it for it in seg_items_of(labels, image)}
    assert set(items) == {"crack", "fray"}
    assert np.array_equal(items["crack"].mask, m1 | m2) and items["crack"].mask.dtype == bool
    assert items["fray"].mask.sum() == 25 and items["crack"].image is image
    assert items["crack"].click_prob is None and not items["crack"].boxes


def test_brush_mask_of_another_size_is_resized_to_the_image():
    m = np.zeros((2 * H, 2 * W), bool)
    m[20:40, 60:88] = True
    labels, _ = task_labels(exported(1, [rle_item(m, "crack", 2 * W, 2 * H)]), CFG)
    item = seg_items_of(labels, np.zeros((H, W, 3), np.uint8))[0]
    assert item.mask.shape == (H, W) and np.array_equal(item.mask, square(10, 20, 30, 44))


def test_rectangles_become_pixel_boxes_with_their_label():
    labels, _ = task_labels(exported(2, [rect_item(25.0, 50.0, 50.0, 25.0, "break"), verdict("NG")]), CFG)
    items = seg_items_of(labels, np.zeros((H, W, 3), np.uint8))
    assert len(items) == 1
    it = items[0]
    assert it.defect_type == "break" and it.mask is None
    assert it.boxes == ((16.0, 24.0, 48.0, 36.0),)


def test_verdicts_become_tags():
    image = np.zeros((H, W, 3), np.uint8)
    ok, _ = task_labels(exported(3, [verdict("OK")]), CFG)
    ng, _ = task_labels(exported(4, [verdict("NG")]), CFG)
    (a,), (b,) = seg_items_of(ok, image), seg_items_of(ng, image)
    assert (a.tag, a.defect_type, a.mask) == ("OK", None, None)
    assert (b.tag, b.defect_type) == ("NG", None)


def test_unusable_tasks_are_skipped_with_a_reason():
    assert task_labels({"id": 5, "data": {}, "annotations": []}, CFG) == (None, "no finished (non-cancelled) annotation")
    cancelled = exported(6, [verdict("OK")], was_cancelled=True)
    assert task_labels(cancelled, CFG)[0] is None
    kp_only = exported(7, [{"from_name": "click", "to_name": "image", "type": "keypointlabels",
                            "value": {"x": 1, "y": 1, "keypointlabels": ["crack"]}}])
    labels, why = task_labels(kp_only, CFG)
    assert labels is None and "no brush mask" in why


def test_latest_annotation_wins():
    t = exported(8, [verdict("OK")])
    t["annotations"].append({"id": 99, "result": [rle_item(square(), "uneven")], "was_cancelled": False,
                             "updated_at": "2026-02-01T00:00:00Z"})
    labels, _ = task_labels(t, CFG)
    assert set(labels.masks) == {"uneven"} and labels.tag is None


# ---------------------------------------------------------------- the job


class FakeSeg:
    """Stands in for SegPredictor: a square of 0.9 on images whose first pixel matches ``hot``."""

    residual_config = None

    def __init__(self, path, hot: bytes):
        self.path = path
        self.hot = hot
        self.defect_types = ["crack", "fray"]
        self.calls = 0

    def predict_per_type(self, state, defect_types):
        self.calls += 1
        prob = np.zeros(state.image.shape[:2], np.float32)
        if state.image[0, 0].tobytes() == self.hot:
            prob[10:20, 30:44] = 0.9
        low = np.full_like(prob, 0.1)
        return {t: (prob if t == "crack" else low) for t in defect_types}


class Trainer:
    def __init__(self, fail: str | None = None):
        self.gate = threading.Event()
        self.fail = fail
        self.calls = []

    def __call__(self, items, extractor, bank, iterations, rcfg, types, out, progress, device, init=None):
        self.calls.append({"items": items, "iterations": iterations, "types": list(types), "out": out, "init": init})
        progress(0.5, "iteration 1/2")
        assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError(self.fail)
        Path(out).write_bytes(b"checkpoint")
        progress(1.0, "checkpoint written")
        return None, {"iterations": iterations, "labelled_images": len(items)}


@pytest.fixture
def ls(monkeypatch):
    server = FakeLabelStudio()
    server.add_file("/data/upload/1/defect.png", png_bytes(W, H, seed=1))
    server.add_file("/data/upload/1/other.png", png_bytes(W, H, seed=2))
    server.exports["1"] = [
        exported(1, [rle_item(square(), "crack"), verdict("NG")]),
        exported(2, [rect_item(10, 10, 30, 30, "fray")], url="/data/upload/1/other.png"),
        exported(3, [verdict("OK")], url="/data/upload/1/other.png"),
        {"id": 4, "data": {"image": "/data/upload/1/defect.png"}, "annotations": []},
    ]
    monkeypatch.setenv("LABEL_STUDIO_URL", server.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    yield server
    server.close()


def make(tmp_path, trainer, **kw):
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    for i in range(2):
        (refs / f"g{i}.png").write_bytes(png_bytes(W, H, seed=100 + i))
    hot = np.asarray(__import__("ml_backend.convert", fromlist=["x"]).decode_image(png_bytes(W, H, seed=1)))[0, 0].tobytes()
    loaded = []

    def loader(path, bank, device, extractor):
        assert Path(path).read_bytes() == b"checkpoint"
        s = FakeSeg(path, hot)
        loaded.append(s)
        return s

    settings = Settings(model_dir=tmp_path / "models", reference_dir=str(refs), image_cache_dir=str(tmp_path / "ic"),
                        bank_refresh_s=0, seg_iterations=7, **kw)
    b = Backend(settings, predictor_factory=FakePredictor, bank_cls=FakeBank, seg_trainer=trainer, seg_loader=loader)
    b.loaded = loaded
    return b


def start(client):
    return client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1, "label_config": CONFIG}})


def trained(tmp_path):
    """A backend whose first training (gate open) ran to "done": (backend, client, trainer)."""
    trainer = Trainer()
    trainer.gate.set()
    backend = make(tmp_path, trainer)
    client = create_app(backend).test_client()
    start(client)
    assert wait_state(client)["state"] == "done"
    return backend, client, trainer


def wait_state(client, states=("done", "failed"), timeout=10.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        tr = client.get("/health").get_json()["training"]["1"]
        if tr["state"] in states:
            return tr
        time.sleep(0.02)
    raise AssertionError(f"training did not reach {states}: {tr}")


def setup_version(client):
    return client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).get_json()["model_version"]


def test_training_runs_in_the_background_and_swaps_the_version_at_the_end(tmp_path, ls):
    trainer = Trainer()
    backend = make(tmp_path, trainer)
    client = create_app(backend).test_client()
    v0 = setup_version(client)
    assert v0.startswith("ADClick-click")
    t0 = time.time()
    r = start(client)
    assert time.time() - t0 < 1.0 and r.get_json()["status"] == "training started"
    tr = wait_state(client, ("running",))
    deadline = time.time() + 10.0
    while not trainer.calls:  # bounded: a job that dies before training must fail the test, not hang it
        assert time.time() < deadline, client.get("/health").get_json()["training"]["1"]
        time.sleep(0.01)
    # While it runs: the old version keeps serving, a second request is answered at once.
    assert setup_version(client) == v0
    t0 = time.time()
    r2 = start(client)
    assert time.time() - t0 < 1.0 and r2.get_json()["status"] == "already training"
    h = client.get("/health").get_json()["training"]["1"]
    assert h["state"] == "running" and h["percent"] == 50.0 and "iteration" in h["message"]
    trainer.gate.set()
    tr = wait_state(client)
    assert tr["state"] == "done", tr
    assert len(trainer.calls) == 1
    call = trainer.calls[0]
    assert call["iterations"] == 7 and call["types"] == list(CFG.defect_types)
    v1 = setup_version(client)
    assert v1.startswith("ADClick-Seg-") and v1 != v0
    res = tr["last_result"]
    assert res["version"] == v1 and res["seconds"] >= 0 and res["summary"]["exported_tasks"] == 4
    assert res["summary"]["skipped"] == {"no finished (non-cancelled) annotation": 1}
    assert Path(res["checkpoint"]).name == f"seg-{v1}.pt" and Path(res["checkpoint"]).is_file()
    assert tr["error"] is None and tr["percent"] == 100.0
    assert client.get("/health").get_json()["seg_model"]["projects"] == {"1": v1}
    # A restarted backend finds the model again (loaded lazily).
    other = make(tmp_path, Trainer())
    oc = create_app(other).test_client()
    assert setup_version(oc) == v1


def test_all_label_kinds_reach_the_trainer(tmp_path, ls):
    _, client, trainer = trained(tmp_path)
    items = trainer.calls[0]["items"]
    by = {(it.defect_type, it.tag) for it in items}
    assert by == {("crack", "NG"), ("fray", None), (None, "OK")}, by
    crack = next(it for it in items if it.defect_type == "crack")
    assert np.array_equal(crack.mask, square()) and crack.image.shape == (H, W, 3)
    fray = next(it for it in items if it.defect_type == "fray")
    assert fray.boxes == ((6.4, 4.8, 25.6, 19.2),) or np.allclose(fray.boxes, [(6.4, 4.8, 25.6, 19.2)])
    # The rectangle reached training as the click model's answer to it: a positive click inside the
    # box, the answer cut to the box.
    assert fray.clicks and fray.clicks[0].positive
    assert 6.4 <= fray.clicks[0].x < 25.6 and 4.8 <= fray.clicks[0].y < 19.2
    assert fray.click_prob.shape == (H, W) and fray.click_prob.max() > 0.5
    assert not fray.click_prob[:, 26:].any() and not fray.click_prob[20:].any()


def test_a_box_the_click_model_cannot_answer_trains_as_a_plain_box(tmp_path, ls, monkeypatch):
    from adclick_core.utils.errors import InputError

    def refuse(self, state, clicks, prev_mask=None, defect_type=None):
        raise InputError("simulated: no answer for these clicks")

    monkeypatch.setattr(FakePredictor, "predict", refuse)
    backend, client, trainer = trained(tmp_path)
    fray = next(it for it in trainer.calls[0]["items"] if it.defect_type == "fray")
    assert fray.click_prob is None and len(fray.boxes) == 1  # kept, as "normal outside, unknown inside"
    assert client.get("/health").get_json()["training"]["1"]["state"] == "done"


def test_a_failing_training_keeps_the_old_model_and_reports_the_error(tmp_path, ls):
    backend, client, _ = trained(tmp_path)
    v1 = setup_version(client)
    bad = Trainer(fail="CUDA out of memory (simulated)")
    bad.gate.set()
    backend.seg_trainer = bad
    time.sleep(1.1)  # another second: another version name
    start(client)
    tr = wait_state(client)
    assert tr["state"] == "failed" and "CUDA out of memory" in tr["error"]
    assert tr["model_version"] == v1 and tr["last_result"]["version"] == v1
    assert setup_version(client) == v1
    # Pre-annotation still uses the old model.
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/defect.png"}}],
                                      "project": PROJECT, "label_config": CONFIG})
    assert r.get_json()["results"][0]["model_version"] == v1


def test_nothing_to_train_on_fails_clearly(tmp_path, ls):
    ls.exports["1"] = [{"id": 4, "data": {"image": "/data/upload/1/defect.png"}, "annotations": []}]
    client = create_app(make(tmp_path, Trainer())).test_client()
    v0 = setup_version(client)
    start(client)
    tr = wait_state(client)
    assert tr["state"] == "failed" and "nothing to train on" in tr["error"]
    assert setup_version(client) == v0


def test_train_every_n_annotations(tmp_path, ls):
    trainer = Trainer()
    trainer.gate.set()
    client = create_app(make(tmp_path, trainer, train_every=2)).test_client()
    setup_version(client)
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
            "task": {"id": 1, "data": {"image": "/data/upload/1/defect.png"}},
            "annotation": {"result": [rle_item(square(), "crack")]}}
    client.post("/webhook", json=body)
    assert client.get("/health").get_json()["training"]["1"]["state"] == "idle"
    client.post("/webhook", json=body)
    assert wait_state(client)["state"] == "done"


# ---------------------------------------------------------------- pre-annotation


def test_preannotation_answers_masks_and_a_verdict_with_the_new_version(tmp_path, ls):
    trainer = Trainer()
    trainer.gate.set()
    backend = make(tmp_path, trainer)
    client = create_app(backend).test_client()
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/defect.png"}}],
                                      "project": PROJECT, "label_config": CONFIG})
    assert r.get_json()["results"][0]["result"] == []  # no Seg model yet
    start(client)
    assert wait_state(client)["state"] == "done"
    version = setup_version(client)
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/defect.png"}},
             {"id": 2, "data": {"image": "/data/upload/1/other.png"}},
             {"id": 3, "data": {"image": "/data/upload/1/missing.png"}}]
    r = client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200
    res = r.get_json()["results"]
    assert len(res) == 3 and all(x["model_version"] == version for x in res)
    regions = [x for x in res[0]["result"] if x["type"] == "brushlabels"]
    assert len(regions) == 1 and regions[0]["value"]["brushlabels"] == ["crack"]
    mask = decode_rle(regions[0]["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 127
    assert np.array_equal(mask, square()) and regions[0]["score"] == pytest.approx(0.9)
    (choice,) = [x for x in res[0]["result"] if x["type"] == "choices"]
    assert choice["value"]["choices"] == ["NG"] and choice["from_name"] == "verdict"
    assert res[0]["score"] == pytest.approx(0.9)
    assert [x["type"] for x in res[1]["result"]] == ["choices"]
    assert res[1]["result"][0]["value"]["choices"] == ["OK"] and res[1]["score"] == pytest.approx(0.1)
    assert res[2]["result"] == []  # a missing image: empty, the batch survives


# ---------------------------------------------------------------- masks that came from clicks


def kp_item(x_px, y_px, label, positive=True):
    item = {"from_name": "click", "to_name": "image", "type": "keypointlabels", "original_width": W,
            "original_height": H, "value": {"x": (x_px + 0.5) / W * 100, "y": (y_px + 0.5) / H * 100,
                                            "width": 0.5, "keypointlabels": [label]}}
    if not positive:
        item["is_positive"] = False
    return item


def test_an_unedited_click_suggestion_becomes_a_click_item():
    r = rle_item(square(), "crack")
    r["origin"] = "prediction"
    labels, _ = task_labels(exported(1, [kp_item(36, 14, "crack"), kp_item(5, 5, "crack", False), r]), CFG)
    assert set(labels.clicks) == {"crack"}
    image = np.zeros((H, W, 3), np.uint8)
    seen = []

    def replay(img, clicks, label):
        seen.append((clicks, label))
        return np.full((H, W), 0.25, np.float32)

    (item,) = seg_items_of(labels, image, replay)
    assert item.mask is None and item.click_prob is not None and item.click_prob.shape == (H, W)
    assert [(c.x, c.y, c.positive) for c in item.clicks] == [(36.0, 14.0, True), (5.0, 5.0, False)]
    assert seen[0][1] == "crack"
    # Without a replay function, or once edited / painted, the mask is exact.
    assert seg_items_of(labels, image)[0].mask is not None
    for origin in ("prediction-changed", "manual"):
        r["origin"] = origin
        labels, _ = task_labels(exported(1, [kp_item(36, 14, "crack"), r]), CFG)
        assert labels.clicks == {}
        assert seg_items_of(labels, image, replay)[0].mask is not None


def test_click_suggestions_are_replayed_with_the_click_model_for_training(tmp_path, ls):
    r = rle_item(square(), "crack")
    r["origin"] = "prediction"
    ls.exports["1"] = [exported(1, [kp_item(36, 14, "crack"), kp_item(38, 15, "crack"), r])]
    backend, client, trainer = trained(tmp_path)
    (item,) = trainer.calls[0]["items"]
    assert item.mask is None and len(item.clicks) == 2
    # The fake click model paints 0.9 discs around positive clicks.
    assert item.click_prob[14, 36] == pytest.approx(0.9) and item.click_prob[40, 5] == 0.0
    calls = backend.predictor().shared["calls"]
    assert [len(c["clicks"]) for c in calls] == [1, 2] and calls[1]["prev_mask"]


@pytest.mark.parametrize("value,expected", [(None, "shipped"), ("none", None), ("~/pre.pt", "home")])
def test_start_training_continues_from_the_configured_checkpoint(value, expected, tmp_path, ls, monkeypatch):
    """ADCLICK_SEG_INIT: unset = the shipped pre-trained ADClick-Seg (when installed), ``none`` = a
    new model, a path = that checkpoint; the trainer gets it and /health names it."""
    from adclick_core.utils import checkpoint

    shipped = tmp_path / "shipped_seg.pt"
    shipped.write_bytes(b"x")
    monkeypatch.setattr(checkpoint, "SHIPPED_SEG_CHECKPOINT", shipped)
    monkeypatch.setenv("HOME", str(tmp_path))
    trainer = Trainer()
    trainer.gate.set()
    backend = make(tmp_path, trainer, seg_init=value)
    client = create_app(backend).test_client()
    start(client)
    assert wait_state(client)["state"] == "done"
    want = {"shipped": shipped, None: None, "home": tmp_path / "pre.pt"}[expected]
    assert trainer.calls[0]["init"] == want
    assert client.get("/health").get_json()["seg_model"]["starts_from"] == (want.name if want else "a new model")
    shipped.unlink()  # not installed: a new model
    assert Settings(seg_init=None).seg_init_checkpoint() is None
