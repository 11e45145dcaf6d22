"""Tiny synthetic images shared by the core tests: a periodic texture (a stand-in for a
defect-free surface) and the same texture with a bright square pasted in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def texture(seed: int, hw: tuple[int, int] = (64, 64)) -> np.ndarray:
    """H x W x 3 uint8: sine texture with a random phase and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, 2)
    v = 128 + 50 * np.sin(xx / 3 + ph[0]) * np.cos(yy / 4 + ph[1]) + rng.normal(0, 8, hw)
    return np.stack([v, v * 0.9, v * 1.1], -1).clip(0, 255).astype(np.uint8)


def reshot(image: np.ndarray, seed: int = 7) -> np.ndarray:
    """The same part shot again: 5 % brighter, other pixel noise (a bank's near-duplicate)."""
    noise = np.random.default_rng(seed).normal(0, 3, image.shape)
    return np.clip(image.astype(np.float32) * 1.05 + noise, 0, 255).astype(np.uint8)


def defective(
    seed: int,
    hw: tuple[int, int] = (64, 64),
    size_range: tuple[int, int] = (10, 18),
    margin: int = 4,
    square_seed: int = 1000,
    texture_seed: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """A textured normal image with a bright square pasted in, and its exact mask."""
    rng = np.random.default_rng(square_seed + seed)
    img = texture(texture_seed + seed, hw)
    s = int(rng.integers(*size_range))
    y, x = int(rng.integers(margin, hw[0] - s - margin)), int(rng.integers(margin, hw[1] - s - margin))
    img[y : y + s, x : x + s] = 245
    mask = np.zeros(hw, bool)
    mask[y : y + s, x : x + s] = True
    return img, mask


def write_mvtec(
    root: Path,
    normals: list[np.ndarray],
    defects: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    good_tests: list[np.ndarray] = (),
) -> Path:
    """An MVTec-layout folder: ``normals`` in train/good, ``good_tests`` in test/good and per defect
    type its (image, boolean mask) pairs in test/<type> and ground_truth/<type>/<name>_mask.png."""
    for sub in ["train/good", "test/good"] + [f"{d}/{t}" for t in defects for d in ("test", "ground_truth")]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(normals):
        Image.fromarray(img).save(root / "train" / "good" / f"{i:03d}.png")
    for i, img in enumerate(good_tests):
        Image.fromarray(img).save(root / "test" / "good" / f"{i:03d}.png")
    for t, pairs in defects.items():
        for i, (img, mask) in enumerate(pairs):
            Image.fromarray(img).save(root / "test" / t / f"{i:03d}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / "ground_truth" / t / f"{i:03d}_mask.png")
    return root
