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

from adclick_core.clicks import Click
from adclick_core.errors import EmptyBankError, InputError


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

    def set_image(self, image: np.ndarray) -> FakeState:
        if self.bank is None or len(self.bank) == 0:
            raise EmptyBankError("the reference bank holds no defect-free image yet")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"expected HxWx3 uint8, got {image.shape} {image.dtype}")
        with self.shared["lock"]:
            self.shared["set_image"] += 1
        return FakeState(image)

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
