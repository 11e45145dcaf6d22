"""Small stand-ins for the core's ClickPredictor / ReferenceBank, for the backend's UNIT tests only
(no weights, no torch maths). The end-to-end tests use the real core.

The fake predictor paints a disk of radius ``r`` around each positive click and removes one
around each negative click, which makes click -> mask round trips easy to check.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np

from adclick_core.inference.clicks import Click
from adclick_core.utils.errors import EmptyBankError, InputError


class FakeConfig:
    def fingerprint(self) -> str:
        return "fake-backbone"


class FakeExtractor:
    config = FakeConfig()


class FakeBank:
    """Keeps content hashes only."""

    def __init__(self, hashes=(), names=()):
        self.hashes = list(hashes)
        self.names = list(names)
        self.backbone = FakeConfig()

    @classmethod
    def build(cls, extractor, images, names=None, progress=False, batch_size=8):
        b = cls()
        b.add(extractor, images, names=names)
        return b

    def add(self, extractor, images, names=None, progress=False, batch_size=8):
        images = list(images)
        names = list(names) if names is not None else [str(i) for i in range(len(images))]
        n = 0
        for img, name in zip(images, names):
            h = hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()[:16]
            if h in self.hashes:
                continue
            self.hashes.append(h)
            self.names.append(name)
            n += 1
        return n

    def __len__(self):
        return len(self.hashes)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1("".join(self.hashes).encode()).hexdigest()[:16]

    def save(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"hashes": self.hashes, "names": self.names}))
        return Path(path)

    @classmethod
    def load(cls, path, device="cpu"):
        d = json.loads(Path(path).read_text())
        return cls(d["hashes"], d["names"])


class FakeState:
    def __init__(self, image: np.ndarray):
        self.image = image
        self.original_hw = image.shape[:2]
        self.features = np.zeros((4,) + image.shape[:2], dtype=np.float32)  # "residuals"


class FakePredictor:
    def __init__(self, bank=None, radius: float = 6.0, shared=None):
        self.bank = bank
        self.radius = radius
        self.extractor = FakeExtractor()
        self.device = "cpu"
        # Shared between with_bank copies, like the weights of the real one.
        self.shared = shared if shared is not None else {"set_image": 0, "predict": 0, "calls": [],
                                                         "lock": threading.Lock()}

    @classmethod
    def from_checkpoint(cls, path=None, bank=None, device="auto"):
        return cls(bank)

    def with_bank(self, bank):
        return FakePredictor(bank, self.radius, self.shared)

    def with_refinement(self, config):
        return self  # the fake's disks have no boundary to refine

    def set_image(self, image: np.ndarray) -> FakeState:
        if self.bank is None or len(self.bank) == 0:
            raise EmptyBankError("the reference bank holds no defect-free image yet")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"expected HxWx3 uint8, got {image.shape} {image.dtype}")
        with self.shared["lock"]:
            self.shared["set_image"] += 1
        return FakeState(image)

    def anomaly_map(self, state: FakeState) -> np.ndarray:
        """Brightness as the "residual" map."""
        return state.image.astype(np.float32).mean(-1)

    def predict(self, state: FakeState, clicks: list[Click], prev_mask=None, defect_type=None) -> np.ndarray:
        h, w = state.image.shape[:2]
        for c in clicks:
            if not (0 <= c.x < w and 0 <= c.y < h):
                raise InputError(f"click ({c.x:.1f}, {c.y:.1f}) is outside the {w}x{h} image")
        with self.shared["lock"]:
            self.shared["predict"] += 1
            self.shared["calls"].append(
                {"clicks": list(clicks), "defect_type": defect_type, "prev_mask": prev_mask is not None}
            )
        yy, xx = np.mgrid[0:h, 0:w]
        prob = np.zeros((h, w), np.float32)
        for c in clicks:
            disk = (yy - c.y) ** 2 + (xx - c.x) ** 2 <= self.radius ** 2
            prob[disk] = 0.9 if c.positive else 0.0
        return prob


# ---------------------------------------------------------------- a tiny fake Label Studio server
import http.server
import io as _io
import socketserver
from urllib.parse import parse_qs, urlparse

from PIL import Image

TOKEN = "a" * 40


def png_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class FakeLabelStudio:
    """Serves ``/data/upload/<project>/<name>`` images, ``/api/projects/<id>/export`` and
    ``/api/tasks/<id>`` (``tasks``, else the task in any export) with legacy-token auth, like Label
    Studio does (401 on a wrong token, 404 on unknown files)."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.files: dict[str, bytes] = {}
        self.exports: dict[str, list] = {}
        self.tasks: dict[int, dict] = {}
        self.requests: list[str] = []
        self.redirects: dict[str, str] = {}  # path -> Location (cloud storage: LS answers a presigned URL)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                if self.headers.get("Authorization") != f"Token {outer.token}":
                    return self._send(401, b'{"detail":"Invalid token."}', "application/json")
                u = urlparse(self.path)
                if u.path.startswith("/api/projects/") and u.path.endswith("/export"):
                    pid = u.path.split("/")[3]
                    if pid not in outer.exports:
                        return self._send(404, b'{"detail":"Not found."}', "application/json")
                    return self._send(200, json.dumps(outer.exports[pid]).encode(), "application/json")
                parts = u.path.strip("/").split("/")
                if len(parts) == 3 and parts[:2] == ["api", "tasks"] and parts[2].isdigit():
                    task = outer.task(int(parts[2]))
                    if task is None:
                        return self._send(404, b'{"detail":"Not found."}', "application/json")
                    return self._send(200, json.dumps(task).encode(), "application/json")
                key = u.path
                if u.path.startswith("/storage-data/uploaded"):
                    key = "/data/" + parse_qs(u.query).get("filepath", [""])[0]
                if key in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[key])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if key in outer.files:
                    return self._send(200, outer.files[key], "image/png")
                return self._send(404, b"not found", "text/plain")

            def _send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def task(self, tid: int) -> dict | None:
        if tid in self.tasks:
            return self.tasks[tid]
        for pid, tasks in self.exports.items():
            for t in tasks:
                if t.get("id") == tid:
                    return {"project": int(pid), **t}
        return None

    def add_file(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return path

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class ForeignServer:
    """An image server that is not Label Studio: serves ``files`` to anyone, records the headers
    it was sent, and answers ``redirects`` with a 302."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802
                outer.seen.append((self.path, self.headers.get("Authorization")))
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = outer.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                body = body if body is not None else b"not found"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        # "localhost", not the Label Studio host's "127.0.0.1": another origin on a loopback address
        self.url = f"http://localhost:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
