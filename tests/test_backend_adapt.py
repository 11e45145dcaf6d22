"""Per-project adaptation of the click model in the backend, with fakes (no weights): it starts by
itself once a project has enough references, clicks are answered by the shared model until the
adapted one is swapped in (then by it), a restart finds it again, another click checkpoint
ignores it, a failure keeps the model in use, and POST /adapt starts it on demand."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from ml_backend.api import create_app
from ml_backend.model import Backend, Settings
from tests.test_backend_api import CONFIG, PROJECT, H, W, kp, task
from tests.test_backend_fakes import TOKEN, FakeBank, FakeLabelStudio, FakePredictor, png_bytes

REFERENCES = 8  # adclick_core.training.adaptation.MIN_REFERENCES


class AdaptedPredictor(FakePredictor):
    """The fake adapted model: disks twice as wide as the shared fake's."""

    def __init__(self, bank=None, path=None):
        super().__init__(bank, radius=12.0)
        self.path = path

    def with_bank(self, bank):
        other = AdaptedPredictor(bank, self.path)
        other.shared = self.shared
        return other


class Adapter:
    """Stands in for adapt_click: waits for ``gate``, reports progress, writes the file."""

    def __init__(self, fail: str | None = None):
        self.gate = threading.Event()
        self.calls: list[dict] = []
        self.masks: list[list[int]] = []  # per call, the pixels of each mask it was given
        self.fail = fail

    def __call__(self, pred, out, iterations, progress, masks=()):
        self.calls.append({"references": len(pred.bank), "iterations": iterations, "out": out})
        self.masks.append([m.sum() for _, m in masks])
        progress(0.5, "iteration 1/2")
        assert self.gate.wait(30.0), "the test never opened the gate"
        if self.fail:
            raise RuntimeError(self.fail)
        Path(out).write_bytes(b"adapted")
        progress(1.0, "done")
        return {"pool_size": 16}


def loader(path, bank, device, extractor):
    assert Path(path).read_bytes() == b"adapted"
    return AdaptedPredictor(bank, path)


@pytest.fixture
def ls(monkeypatch):
    server = FakeLabelStudio()
    server.add_file("/data/upload/1/defect.png", png_bytes(W, H, seed=1))
    monkeypatch.setenv("LABEL_STUDIO_URL", server.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    yield server
    server.close()


def make(tmp_path, adapter, n_refs=REFERENCES, **kw):
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    for i in range(n_refs):
        (refs / f"g{i}.png").write_bytes(png_bytes(W, H, seed=100 + i))
    settings = Settings(model_dir=tmp_path / "models", reference_dir=str(refs), image_cache_dir=str(tmp_path / "ic"),
                        bank_refresh_s=0, **{"adapt_min_references": REFERENCES, "adapt_iterations": 5, **kw})
    return Backend(settings, predictor_factory=FakePredictor, bank_cls=FakeBank, click_adapter=adapter,
                   click_loader=loader)


def click(client) -> tuple[int, str]:
    """(mask pixels, model_version) of one positive click in the middle of the image."""
    body = {"tasks": [task()], "project": PROJECT, "label_config": CONFIG,
            "params": {"context": {"result": [kp(50, 50)]}}}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.get_json()
    res = r.get_json()["results"][0]
    mask = decode_rle(res["result"][0]["value"]["rle"]).reshape(H, W, 4)[..., 3] > 0
    return int(mask.sum()), res["model_version"]


def wait_adaptation(client, states=("done", "failed"), timeout=30.0) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = client.get("/health").get_json()["adaptation"]["projects"].get("1", {})
        if st.get("state") in states:
            return st
        time.sleep(0.02)
    raise AssertionError(f"adaptation did not reach {states}: {st}")


def test_enough_references_start_an_adaptation_that_is_swapped_in_at_the_end(tmp_path, ls):
    adapter = Adapter()
    backend = make(tmp_path, adapter)
    client = create_app(backend).test_client()
    small, v0 = click(client)  # builds the bank (8 references): the adaptation starts by itself
    st = wait_adaptation(client, ("running",))
    deadline = time.time() + 30.0  # the first adaptation imports adclick_core: seconds on a busy CI machine
    while st["percent"] != 50.0:  # bounded: the adapter reports half way, then waits for the gate
        assert time.time() < deadline, st
        time.sleep(0.02)
        st = wait_adaptation(client, ("running",))
    assert v0.startswith("ADClick-click") and "iteration" in st["message"]
    assert adapter.calls == [{"references": REFERENCES, "iterations": 5, "out": adapter.calls[0]["out"]}]
    assert click(client) == (small, v0)  # served by the shared model meanwhile
    adapter.gate.set()
    st = wait_adaptation(client)
    assert st["state"] == "done", st
    version = st["model_version"]
    assert version.startswith("ADClick-adapted-") and st["last_result"]["summary"]["references"] == REFERENCES
    assert Path(st["last_result"]["checkpoint"]).name == f"click-{version}.pt"
    large, v1 = click(client)
    assert v1 == version and large > 2 * small  # the adapted model answers now
    info = client.get("/health").get_json()["projects"]["1"]
    assert info["click_model"] == version
    # A restart finds the adapted model again.
    again = create_app(make(tmp_path, Adapter())).test_client()
    assert click(again) == (large, version)
    # The same references do not start another adaptation; twice as many do.
    job = backend.models()[0].adapt
    assert job.maybe_start(REFERENCES) is None and job.maybe_start(2 * REFERENCES - 1) is None
    assert job.maybe_start(2 * REFERENCES)["status"] == "adaptation started"
    assert wait_adaptation(client)["state"] == "done" and len(adapter.calls) == 2


def test_an_adapted_model_of_another_click_checkpoint_is_not_used(tmp_path, ls):
    adapter = Adapter()
    client = create_app(make(tmp_path, adapter)).test_client()
    small, v0 = click(client)
    adapter.gate.set()
    assert wait_adaptation(client)["state"] == "done" and click(client)[0] > 2 * small
    other = make(tmp_path, Adapter(), adapt_min_references=0)
    other.click_tag = "click-other-00000000"  # as with another ADCLICK_CHECKPOINT
    oc = create_app(other).test_client()
    n, v = click(oc)
    assert n == small and v == "ADClick-click-other-00000000"


def test_a_failed_adaptation_keeps_the_model_in_use_and_is_not_retried_by_itself(tmp_path, ls):
    adapter = Adapter(fail="out of memory (simulated)")
    backend = make(tmp_path, adapter)
    client = create_app(backend).test_client()
    small, v0 = click(client)
    adapter.gate.set()
    st = wait_adaptation(client)
    assert st["state"] == "failed" and "out of memory" in st["error"] and st["model_version"] is None
    assert click(client) == (small, v0)
    backend.models()[0].adapt.maybe_start(REFERENCES)  # the same bank again: no loop of failures
    assert len(adapter.calls) == 1
    adapter.fail = None  # on demand it runs again
    r = client.post("/adapt", json={"project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200 and r.get_json()["status"] == "adaptation started"
    assert wait_adaptation(client)["state"] == "done"
    assert click(client)[0] > 2 * small


def test_below_the_minimum_nothing_starts_and_on_demand_needs_eight_references(tmp_path, ls):
    adapter = Adapter()
    adapter.gate.set()
    client = create_app(make(tmp_path, adapter, n_refs=3)).test_client()
    click(client)
    time.sleep(0.2)
    assert client.get("/health").get_json()["adaptation"]["projects"]["1"]["state"] == "idle"
    r = client.post("/adapt", json={"project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200
    st = wait_adaptation(client)
    assert st["state"] == "failed" and "at least 8" in st["error"] and not adapter.calls
    r = client.post("/adapt", json={"project": "2.1700000000"})
    assert r.status_code == 400 and "label config" in r.get_json()["error"]


def test_adaptation_waits_for_a_running_seg_training(tmp_path, ls):
    adapter = Adapter()
    adapter.gate.set()
    backend = make(tmp_path, adapter, adapt_min_references=0)
    client = create_app(backend).test_client()
    click(client)
    assert backend.training_lock.acquire(timeout=1.0)  # as a running ADClick-Seg training holds it
    try:
        client.post("/adapt", json={"project": PROJECT, "label_config": CONFIG})
        st = wait_adaptation(client, ("running",))
        deadline = time.time() + 2.0
        while "waiting for another training" not in (st.get("message") or "") and time.time() < deadline:
            time.sleep(0.02)
            st = client.get("/health").get_json()["adaptation"]["projects"]["1"]
        assert "waiting for another training" in st["message"] and not adapter.calls
    finally:
        backend.training_lock.release()
    assert wait_adaptation(client)["state"] == "done" and len(adapter.calls) == 1


def test_submitted_brush_masks_start_an_adaptation_that_learns_from_them(tmp_path, ls):
    from tests.test_backend_training import exported, rle_item, square, verdict

    adapter = Adapter()
    adapter.gate.set()
    backend = make(tmp_path, adapter, adapt_min_references=0, learn_masks=2)
    client = create_app(backend).test_client()
    small, v0 = click(client)
    first, second = square(), square(20, 30, 10, 20)
    ls.exports["1"] = [exported(1, [rle_item(first, "crack")]), exported(2, [rle_item(second, "crack")]),
                       exported(3, [verdict("OK")])]

    def hook(tid: int, result: list) -> None:
        r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
                                          "task": {"id": tid, "data": {"image": "/data/upload/1/defect.png"}},
                                          "annotation": {"id": 10 * tid, "result": result}})
        assert r.status_code == 200

    hook(3, verdict("OK"))  # a verdict is no mask
    hook(1, [rle_item(first, "crack")])
    time.sleep(0.2)
    assert client.get("/health").get_json()["adaptation"]["projects"]["1"]["state"] == "idle"
    hook(2, [rle_item(second, "crack")])  # the second mask: ADCLICK_LEARN_MASKS=2 reached
    st = wait_adaptation(client)
    assert st["state"] == "done", st
    assert adapter.masks == [[first.sum(), second.sum()]]  # every mask the project has, exported
    summary = st["last_result"]["summary"]
    assert summary["masks"] == 2 and summary["references"] == REFERENCES
    assert click(client)[1] == st["model_version"] != v0
    assert client.get("/health").get_json()["adaptation"]["learn_masks"] == 2


def test_an_adaptation_without_a_readable_export_learns_from_the_references_alone(tmp_path, ls):
    adapter = Adapter()
    adapter.gate.set()
    client = create_app(make(tmp_path, adapter, adapt_min_references=0)).test_client()
    click(client)
    assert client.post("/adapt", json={"project": PROJECT, "label_config": CONFIG}).status_code == 200
    st = wait_adaptation(client)  # the fake Label Studio has no export for this project: 404
    assert st["state"] == "done" and adapter.masks == [[]]
    assert st["last_result"]["summary"]["masks"] == 0 and "masks_error" in st["last_result"]["summary"]


def test_projects_adapt_by_themselves_from_50_references_by_default(monkeypatch):
    """The default measured on products the click model never saw (docs/results.md): 50
    references; ADCLICK_ADAPT_MIN_REFERENCES=0 turns it off."""
    from ml_backend.model import Settings

    monkeypatch.delenv("ADCLICK_ADAPT_MIN_REFERENCES", raising=False)
    assert Settings.from_env().adapt_min_references == 50 == Settings().adapt_min_references
    monkeypatch.setenv("ADCLICK_ADAPT_MIN_REFERENCES", "0")
    assert Settings.from_env().adapt_min_references == 0
