"""MVTec-style folder data sets: ``train/good``, ``test/<type>``, ``ground_truth/<type>/<name>_mask.png``."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..features.backbone import load_image
from .errors import DataError

__all__ = ["Sample", "MVTecFolder", "load_mask"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    image_path: Path
    defect_type: str  # "good" for defect-free images
    mask_path: Path | None

    @property
    def is_defective(self) -> bool:
        return self.defect_type != "good"

    @property
    def name(self) -> str:
        return f"{self.defect_type}/{self.image_path.stem}"

    def image(self) -> np.ndarray:
        return load_image(self.image_path)

    def mask(self, hw: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean ground truth at the image size (all False for good images)."""
        if self.mask_path is None:
            if hw is None:
                with Image.open(self.image_path) as im:
                    hw = (im.height, im.width)
            return np.zeros(hw, dtype=bool)
        return load_mask(self.mask_path)


def load_mask(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class MVTecFolder:
    """One product category in MVTec layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "train" / "good").is_dir():
            raise DataError(f"{self.root} is not an MVTec-style folder: no train/good folder of defect-free images")

    def train_good(self) -> list[Path]:
        return _images(self.root / "train" / "good")

    @property
    def defect_types(self) -> list[str]:
        test = self.root / "test"
        return sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != "good") if test.is_dir() else []

    def test_samples(self, defective_only: bool = False) -> list[Sample]:
        out: list[Sample] = []
        if not defective_only:
            out += [Sample(p, "good", None) for p in _images(self.root / "test" / "good")]
        for dt in self.defect_types:
            for p in _images(self.root / "test" / dt):
                mask = self.root / "ground_truth" / dt / f"{p.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"no ground-truth mask {mask} for {p}")
                out.append(Sample(p, dt, mask))
        return out

    def reference_bank(self, extractor, cache: str | Path | None = None, progress: bool = True):
        """The folder's ReferenceBank (train/good): see ``cached_bank``."""
        return cached_bank(extractor, self.train_good(), cache, progress)


def cached_bank(extractor, paths: list[Path], cache: str | Path | None = None, progress: bool = True):
    """The ReferenceBank of ``paths``: loaded from ``cache`` if it exists, fits the extractor's
    backbone and keeps its references' pixels, else built (and written to ``cache`` when given)."""
    from ..features.reference import ReferenceBank

    if cache and Path(cache).is_file():
        bank = ReferenceBank.load(cache, device=extractor.device)
        if bank.backbone.fingerprint() != extractor.config.fingerprint():
            log.warning("bank %s was built with another backbone; rebuilding", cache)
        elif not bank.has_sources:
            log.warning("bank %s keeps no reference pixels (an older format: no zoom-in); rebuilding", cache)
        else:
            return bank
    bank = ReferenceBank.build(extractor, paths, names=[p.name for p in paths], progress=progress)
    if cache:
        bank.save(cache)
    return bank
