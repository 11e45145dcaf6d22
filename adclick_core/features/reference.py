"""ReferenceBank: features and global descriptors of defect-free images of one product.

Stored as safetensors (no pickle) with a versioned JSON header, so a bank file is safe to load
from anywhere and can be checked against the extractor that will use it.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .backbone import BackboneConfig, FeatureExtractor, load_image, resolve_device
from ..utils.errors import CheckpointError, EmptyBankError
from ..inference.zoom import SOURCE_SIDE, decode_source, encode_source

__all__ = ["ReferenceBank", "BANK_FORMAT_VERSION", "image_fingerprint"]

# 2: each reference's pixels (``zoom.encode_source``) are stored beside its features, for zoom-in.
# Banks of format 1 still load; they answer on whole images only.
BANK_FORMAT_VERSION = 2
_DECODED_SOURCES = 32  # decoded reference images kept in memory per bank (a few MB each)


def image_fingerprint(image: np.ndarray) -> str:
    """Content hash of a decoded image: the same picture gives the same key wherever it came from."""
    h = hashlib.sha1()
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:16]


class ReferenceBank:
    """Residual-grid features (N x d_f x g x g, float16) and descriptors (N x c1 x q x q) of normals,
    and each normal's pixels (JPEG bytes at a longer side of at most ``SOURCE_SIDE``, or None for
    banks written before they were kept) for zoom-in crops."""

    def __init__(
        self,
        backbone: BackboneConfig,
        features: torch.Tensor | None = None,
        descriptors: torch.Tensor | None = None,
        names: Sequence[str] = (),
        hashes: Sequence[str] = (),
        sources: Sequence[np.ndarray | None] | None = None,
    ):
        self.backbone = backbone
        self.features = features
        self.descriptors = descriptors
        self.names: list[str] = list(names)
        self.hashes: list[str] = list(hashes)
        self.sources: list[np.ndarray | None] = list(sources) if sources is not None else [None] * len(self.names)
        if len(self.sources) != len(self.names):
            raise ValueError(f"{len(self.sources)} sources for {len(self.names)} bank images")
        self._decoded: dict[int, np.ndarray] = {}
        self._decoded_lock = threading.Lock()  # clicks of several annotators share one bank

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        extractor: FeatureExtractor,
        images: Iterable,
        names: Sequence[str] | None = None,
        progress: bool = True,
        batch_size: int = 8,
    ) -> "ReferenceBank":
        bank = cls(extractor.config)
        bank.add(extractor, images, names=names, progress=progress, batch_size=batch_size)
        return bank

    def add(
        self,
        extractor: FeatureExtractor,
        images: Iterable,
        names: Sequence[str] | None = None,
        progress: bool = False,
        batch_size: int = 8,
    ) -> int:
        """Append images (skipping ones already in the bank, by content); returns how many were added."""
        if extractor.config.fingerprint() != self.backbone.fingerprint():
            raise CheckpointError("extractor and bank use different backbone configurations")
        images = list(images)
        if names is None:
            start = len(self)
            names = [str(img) if isinstance(img, (str, os.PathLike)) else f"image-{start + i}" for i, img in enumerate(images)]
        names = list(names)
        known = set(self.hashes)
        feats, descs, new_names, new_hashes, new_sources = [], [], [], [], []
        batch: list[np.ndarray] = []
        bar = tqdm(total=len(images), desc="reference bank", unit="img", disable=not progress)

        def flush() -> None:
            if batch:
                out = extractor(extractor.preprocess(batch))
                feats.append(out.grid.half().cpu())
                descs.append(out.descriptor.float().cpu())
                batch.clear()

        for img, name in zip(images, names):
            arr = load_image(img)
            key = image_fingerprint(arr)
            bar.update(1)
            if key in known:
                continue
            known.add(key)
            batch.append(arr)
            new_names.append(name)
            new_hashes.append(key)
            new_sources.append(encode_source(arr, SOURCE_SIDE))
            if len(batch) == batch_size:
                flush()
        flush()
        bar.close()
        if not new_hashes:
            return 0
        f = torch.cat(feats)
        d = torch.cat(descs)
        # A new bank lives where its extractor runs, so residuals against it run there too (a
        # CPU bank behind a GPU extractor silently moved every residual computation to the CPU).
        dev = self.device if self.features is not None else extractor.device
        self.features = f.to(dev) if self.features is None else torch.cat([self.features, f.to(dev)])
        self.descriptors = d.to(dev) if self.descriptors is None else torch.cat([self.descriptors, d.to(dev)])
        self.names += new_names
        self.hashes += new_hashes
        self.sources += new_sources
        return len(new_hashes)

    # ---------------------------------------------------------------- properties
    def __len__(self) -> int:
        return 0 if self.features is None else int(self.features.shape[0])

    @property
    def device(self) -> torch.device:
        return self.features.device if self.features is not None else torch.device("cpu")

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1(self.backbone.fingerprint().encode())
        for k in self.hashes:
            h.update(k.encode())
        return h.hexdigest()[:16]

    @property
    def has_sources(self) -> bool:
        """Whether any reference's pixels are kept (zoom-in needs them)."""
        return any(src is not None for src in self.sources)

    def source(self, index: int) -> np.ndarray | None:
        """Reference ``index``'s pixels (H x W x 3 uint8, at most ``SOURCE_SIDE`` on the longer
        side), or None where the bank does not keep them. The last few decoded stay in memory."""
        src = self.sources[index]
        if src is None:
            return None
        with self._decoded_lock:
            image = self._decoded.pop(index, None)
        if image is None:
            image = decode_source(src)
        with self._decoded_lock:
            self._decoded[index] = image  # most recently used last
            while len(self._decoded) > _DECODED_SOURCES:
                self._decoded.pop(next(iter(self._decoded)))
        return image

    def require_nonempty(self) -> None:
        if len(self) == 0:
            raise EmptyBankError(
                "the reference bank holds no defect-free image yet: add good images "
                "(e.g. tag tasks OK in Label Studio, or `python -m adclick_core build-bank`)"
            )

    def positions(self, images: Sequence) -> list[int]:
        """Each image's position in the bank, found by file name (as ``MVTecFolder`` names bank
        images), -1 for an image that is not in it or is an array: what ``build_synthetic_pool``
        needs to leave an image out of its own retrieval."""
        index = {n: i for i, n in enumerate(self.names)}
        return [index.get(Path(p).name, -1) if isinstance(p, (str, os.PathLike)) else -1 for p in images]

    def to(self, device: str | torch.device) -> "ReferenceBank":
        dev = resolve_device(device)
        if self.features is not None:
            self.features = self.features.to(dev)
            self.descriptors = self.descriptors.to(dev)
        return self

    def subset(self, indices: Sequence[int]) -> "ReferenceBank":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return ReferenceBank(
            self.backbone,
            self.features[idx.to(self.device)],
            self.descriptors[idx.to(self.device)],
            [self.names[i] for i in idx.tolist()],
            [self.hashes[i] for i in idx.tolist()],
            [self.sources[i] for i in idx.tolist()],
        )

    def nbytes(self) -> int:
        if self.features is None:
            return 0
        kept = sum(src.nbytes for src in self.sources if src is not None)
        return self.features.numel() * self.features.element_size() + self.descriptors.numel() * 4 + kept

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves a half-written bank."""
        self.require_nonempty()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "adclick-reference-bank",
            "format_version": str(BANK_FORMAT_VERSION),
            "backbone": json.dumps(self.backbone.to_dict()),
            "names": json.dumps(self.names),
            "hashes": json.dumps(self.hashes),
            "source_side": str(SOURCE_SIDE),
        }
        tensors = {"features": self.features.contiguous().cpu(), "descriptors": self.descriptors.contiguous().cpu()}
        for i, src in enumerate(self.sources):
            if src is not None:
                tensors[f"source.{i}"] = torch.from_numpy(src)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "ReferenceBank":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"reference bank {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"reference bank {path} is unreadable: {exc}") from exc
        if meta.get("format") != "adclick-reference-bank":
            raise CheckpointError(f"{path} is not an ADClick reference bank")
        if int(meta.get("format_version", "0")) > BANK_FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer version (format {meta['format_version']})")
        names = json.loads(meta["names"])
        sources = [tensors[f"source.{i}"].numpy() if f"source.{i}" in tensors else None for i in range(len(names))]
        bank = cls(
            BackboneConfig.from_dict(json.loads(meta["backbone"])),
            tensors["features"],
            tensors["descriptors"],
            names,
            json.loads(meta["hashes"]),
            sources,
        )
        return bank.to(device)
