"""Bounds on the work and the state one client can cause: the request reader of the gunicorn
worker, the per-request decode budget and deadline, image shapes, live projects, the model
folder's disk budget, and the private, hash-checked image cache."""
from __future__ import annotations

import io
import os
import stat
import time

import numpy as np
import pytest
from PIL import Image

from ml_backend import budget, convert
from ml_backend.api import create_app
from ml_backend.errors import BackendError, TooLarge
from ml_backend.images import ImageCache, ImageLoader, Credentials
from ml_backend.server import MAX_HEAD_BYTES, request_complete
from tests.test_backend_api import CONFIG, PROJECT, backend, client, env, kp, ls, make_backend, refs_dir, task  # noqa: F401
from tests.test_backend_fakes import TOKEN, png_bytes


# ---------------------------------------------------------------- the request reader
@pytest.mark.parametrize("raw, complete", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\n", False),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"POST /predict HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\"", False),
    (b"POST /predict HTTP/1.1\r\ncontent-length: 5\r\n\r\n{\"a\"}", True),
    (b"POST /predict HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", True),  # for the app's 413
    (b"POST /predict HTTP/1.1\r\nContent-Length: nope\r\n\r\n", True),  # for gunicorn's 400
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", False),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * (MAX_HEAD_BYTES + 10), 431),
])
def test_a_request_goes_to_a_thread_only_once_it_is_whole(raw, complete):
    assert request_complete(raw, max_body=1 << 20) == complete


# ---------------------------------------------------------------- decode budget, deadline, shapes
def _png(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_one_request_decodes_at_most_its_pixel_budget():
    with budget.request_budget(seconds=60, pixels=3 * 64 * 48):
        for _ in range(3):
            convert.decode_image(_png(64, 48))
        with pytest.raises(TooLarge, match="ADCLICK_MAX_REQUEST_PIXELS"):
            convert.decode_image(_png(64, 48))
    convert.decode_image(_png(64, 48))  # outside a request: no budget


def test_a_request_past_its_deadline_is_a_503():
    with budget.request_budget(seconds=0.05, pixels=10**9):
        budget.check_deadline()
        time.sleep(0.1)
        with pytest.raises(budget.DeadlinePassed) as e:
            budget.check_deadline()
    assert e.value.status == 503 and "ADCLICK_REQUEST_DEADLINE" in e.value.message


@pytest.mark.parametrize("w, h, what", [(8, 2000, "ADCLICK_MAX_IMAGE_ASPECT"), (2000, 8, "ADCLICK_MAX_IMAGE_ASPECT"),
                                        (31000, 1600, "ADCLICK_MAX_IMAGE_SIDE")])
def test_images_of_extreme_shape_are_refused_before_decoding(w, h, what):
    im = Image.new("1", (w, h))  # tiny file, many pixels
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    with pytest.raises(TooLarge, match=what):
        convert.decode_image(buf.getvalue())


def test_predict_with_more_pixels_than_the_budget_is_a_413(client, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ADCLICK_MAX_REQUEST_PIXELS", str(64 * 48))
    r = client.post("/predict", json={"tasks": [task(), task("/data/upload/1/other.png", tid=8)],
                                      "project": PROJECT, "label_config": CONFIG,
                                      "params": {"context": {"result": [kp(50, 50)]}}})
    assert r.status_code == 413 and "ADCLICK_MAX_REQUEST_PIXELS" in r.get_json()["error"]


# ---------------------------------------------------------------- live projects and disk budget
def test_idle_projects_leave_memory_and_busy_ones_stay(tmp_path, refs_dir, env):  # noqa: F811
    b = make_backend(tmp_path, refs_dir, max_projects=3)
    try:
        first = b.model_for("1.1", label_config=CONFIG)
        for i in range(2, 6):
            b.model_for(f"{i}.1", label_config=CONFIG)
        live = {m.project_id for m in b.models()}
        assert len(live) == 3 and "1" not in live and "5" in live
        # all three busy: a fourth project cannot get in
        for m in b.models():
            m.busy = lambda: True
        with pytest.raises(BackendError) as e:
            b.model_for("9.1", label_config=CONFIG)
        assert e.value.status == 503 and "ADCLICK_MAX_PROJECTS" in e.value.message
        # once one is idle again, an evicted project comes back: a new object on its own folder
        del b.models()[0].busy
        back = b.model_for("1.1", label_config=CONFIG)
        assert back is not first and back.dir == first.dir and len(b.models()) == 3
    finally:
        b.executor.shutdown(wait=True)


def test_projects_unused_for_the_idle_time_leave_memory(tmp_path, refs_dir, env):  # noqa: F811
    b = make_backend(tmp_path, refs_dir, project_idle_s=0.05)
    try:
        b.model_for("1.1", label_config=CONFIG)
        time.sleep(0.1)
        b.model_for("2.1", label_config=CONFIG)
        assert [m.project_id for m in b.models()] == ["2"]
    finally:
        b.executor.shutdown(wait=True)


def test_above_the_disk_budget_nothing_new_is_written(tmp_path, refs_dir, env, caplog):  # noqa: F811
    b = make_backend(tmp_path, refs_dir, max_disk_mb=0.001)
    (tmp_path / "models").mkdir(parents=True, exist_ok=True)
    (tmp_path / "models" / "big.bin").write_bytes(b"x" * 4096)
    try:
        app = create_app(b).test_client()
        r = app.post("/predict", json={"tasks": [task()], "project": PROJECT, "label_config": CONFIG,
                                       "params": {"context": {"result": [kp(50, 50)]}}})
        assert r.status_code == 200  # the bank is built and answers, only not saved
        m = b.models()[0]
        assert not list(m.dir.glob("bank*")) and "ADCLICK_MAX_DISK_MB" in caplog.text
        r = app.post("/train", json={"project": PROJECT, "label_config": CONFIG})
        assert r.status_code == 507 and "ADCLICK_MAX_DISK_MB" in r.get_json()["error"]
    finally:
        b.executor.shutdown(wait=True)


# ---------------------------------------------------------------- image cache
def test_the_image_cache_is_private_unpredictable_and_checked(tmp_path):
    root = tmp_path / "cache"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    cache = ImageCache(root, max_bytes=1 << 20)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    cache.put("creds", "http://ls/x.png", b"image bytes")
    assert cache.get("creds", "http://ls/x.png") == b"image bytes"
    assert cache.get("other creds", "http://ls/x.png") is None
    (f,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert "x.png" not in f.name and ImageCache(root, 1 << 20)._name("creds", "http://ls/x.png") in f.name
    f.write_bytes(b"planted bytes")  # changed on disk: dropped, not served
    assert cache.get("creds", "http://ls/x.png") is None and not f.exists()


def test_a_cache_folder_of_another_user_or_a_link_is_not_used(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    cache = ImageCache(link, 1 << 20)
    assert cache.root != link and stat.S_IMODE(os.stat(cache.root).st_mode) == 0o700


def test_uploads_are_downloaded_through_label_studio_not_read_from_its_folder(tmp_path, ls, monkeypatch):  # noqa: F811
    # Label Studio's upload folder on this machine holds other bytes than Label Studio serves
    data_dir = tmp_path / "xdg-data" / "label-studio"  # the SDK's get_data_dir()
    (data_dir / "media" / "upload" / "1").mkdir(parents=True)
    (data_dir / "media" / "upload" / "1" / "defect.png").write_bytes(png_bytes(8, 8, seed=9))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    loader = ImageLoader(tmp_path / "ic")
    data = loader.fetch("/data/upload/1/defect.png", Credentials(ls.url, TOKEN, "env"), task_id=7)
    assert data == png_bytes(64, 48, seed=1) and any("defect.png" in r for r in ls.requests)
