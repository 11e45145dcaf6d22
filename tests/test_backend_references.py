"""Reference banks: OK-tagged tasks through the export API, the folder, persistence, webhooks."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from ml_backend.api import create_app
from ml_backend.model import Backend, Settings
from tests.test_backend_fakes import TOKEN, FakeBank, FakeLabelStudio, FakePredictor, png_bytes

REPO = Path(__file__).resolve().parents[1]
CONFIG = (REPO / "label_config" / "interactive_weak.xml").read_text()
PROJECT = "1.1700000000"


def verdict(v):
    return [{"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": [v]}}]


def ls_task(tid, v=None, url=None):
    t = {"id": tid, "data": {"image": url or f"/data/upload/1/t{tid}.png"}, "project": 1, "annotations": []}
    if v:
        t["annotations"].append({"id": tid * 10, "result": verdict(v), "was_cancelled": False,
                                 "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"})
    return t


@pytest.fixture
def ls(monkeypatch):
    s = FakeLabelStudio()
    for i in range(1, 8):
        s.add_file(f"/data/upload/1/t{i}.png", png_bytes(32, 24, seed=i))
    s.exports["1"] = [ls_task(1, "OK"), ls_task(2, "OK"), ls_task(3, "NG"), ls_task(4)]
    monkeypatch.setenv("LABEL_STUDIO_URL", s.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    yield s
    s.close()


def backend(tmp_path, **kw):
    st = Settings(model_dir=tmp_path / "models", image_cache_dir=str(tmp_path / "cache"), bank_refresh_s=0, **kw)
    return Backend(st, predictor_factory=FakePredictor, bank_cls=FakeBank)


def wait_jobs(b):
    b.executor.submit(lambda: None).result(timeout=30)


def click(c):
    ctx = {"result": [{"type": "keypointlabels", "from_name": "click", "to_name": "image",
                       "value": {"x": 50, "y": 50, "keypointlabels": ["crack"]}}]}
    return c.post("/predict", json={"tasks": [{"id": 5, "data": {"image": "/data/upload/1/t5.png"}}],
                                    "project": PROJECT, "label_config": CONFIG, "params": {"context": ctx}})


def test_bank_from_ok_tasks_is_built_on_setup_and_persisted(tmp_path, ls):
    b = backend(tmp_path)
    c = create_app(b).test_client()
    assert c.post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 200
    wait_jobs(b)
    m = b.model_for(PROJECT)
    assert len(m.references.bank) == 2
    assert m.references.sources == ["task:1", "task:2"]
    assert (m.dir / "bank.safetensors").is_file() and (m.dir / "bank_sources.json").is_file()
    assert click(c).status_code == 200

    # A new process loads the bank from disk and fetches no reference image again.
    ls.requests.clear()
    b2 = backend(tmp_path)
    c2 = create_app(b2).test_client()
    assert click(c2).status_code == 200
    assert len(b2.model_for(PROJECT).references.bank) == 2
    assert not any("t1.png" in r or "t2.png" in r for r in ls.requests)


def set_up(tmp_path):
    """(backend, client, the project's references) after /setup built its bank of the 2 OK tasks."""
    b = backend(tmp_path)
    c = create_app(b).test_client()
    c.post("/setup", json={"project": PROJECT, "schema": CONFIG})
    wait_jobs(b)
    return b, c, b.model_for(PROJECT).references


def test_webhook_ok_tag_extends_the_bank_and_ng_removes(tmp_path, ls):
    b, c, refs = set_up(tmp_path)
    fp0 = refs.bank.fingerprint
    ls.tasks[6] = ls_task(6, "OK")  # as Label Studio has it once the annotator submitted
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
            "task": {"id": 6, "data": {"image": "/data/upload/1/t6.png"}},
            "annotation": {"id": 60, "result": verdict("OK")}}
    t0 = time.time()
    r = c.post("/webhook", json=hook)
    assert r.status_code == 200 and time.time() - t0 < 1.0
    wait_jobs(b)
    assert len(refs.bank) == 3 and "task:6" in refs.sources and refs.bank.fingerprint != fp0

    # Task 1 re-labelled NG: the next sync rebuilds without it.
    ls.exports["1"] = [ls_task(1, "NG"), ls_task(2, "OK"), ls_task(6, "OK")]
    hook = {"action": "ANNOTATION_UPDATED", "project": {"id": 1, "label_config": CONFIG},
            "task": {"id": 1, "data": {"image": "/data/upload/1/t1.png"}},
            "annotation": {"id": 10, "result": verdict("NG")}}
    assert c.post("/webhook", json=hook).status_code == 200
    wait_jobs(b)
    assert sorted(refs.sources) == ["task:2", "task:6"] and len(refs.bank) == 2


def test_reference_folder_and_limit(tmp_path, ls):
    d = tmp_path / "good"
    d.mkdir()
    for i in range(4):
        (d / f"g{i}.png").write_bytes(png_bytes(32, 24, seed=50 + i))
    (d / "notes.txt").write_text("ignored")
    b = backend(tmp_path, reference_dir=str(d), max_references=5)
    c = create_app(b).test_client()
    assert click(c).status_code == 200
    refs = b.model_for(PROJECT).references
    assert len(refs.bank) == 5  # 4 files + 1 of the 2 OK tasks
    assert sum(s.startswith("file:") for s in refs.sources) == 4


def test_export_refused_is_reported(tmp_path, ls, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "c" * 40)
    b = backend(tmp_path)
    c = create_app(b).test_client()
    r = click(c)
    assert r.status_code in (409, 424)
    assert "LABEL_STUDIO_API_KEY" in r.get_json()["error"]


def test_a_forged_ok_webhook_changes_no_bank(tmp_path, ls):
    b, c, refs = set_up(tmp_path)
    fp0, requests0 = refs.bank.fingerprint, len(ls.requests)
    other = {**ls_task(7, "OK"), "project": 2}  # another project's OK task
    ls.tasks[7] = other
    forged = [
        # task 3 is NG in Label Studio; the body claims OK and brings its own image
        {"id": 3, "data": {"image": "data:image/png;base64,AAAA"}, "project": 1},
        {"id": 7, "data": {"image": "/data/upload/1/t7.png"}, "project": 1},  # another project's task
        {"id": 99, "data": {"image": "/data/upload/1/t5.png"}, "project": 1},  # no such task
    ]
    for task in forged:
        hook = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG}, "task": task,
                "annotation": {"id": 1, "result": verdict("OK")}}
        assert c.post("/webhook", json=hook).status_code == 200
        wait_jobs(b)
    assert refs.bank.fingerprint == fp0 and sorted(refs.sources) == ["task:1", "task:2"]
    fetched = [r for r in ls.requests[requests0:] if not r.startswith("/api/")]
    assert fetched == []  # no image of a forged task was downloaded
