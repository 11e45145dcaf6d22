"""Procedural defect-free textures, in families: the images of one family share one look (as the
parts of one product do) and differ in their instance noise, placement and lighting.

A generic click model trains on real products' defect-free images *and* on these families, so
it learns what a residual against "more of the same surface" looks like on surfaces no data set
holds (grain, brushed metal, weaves, machined grooves, speckled castings), not on one material.
Each family gets its own reference bank: its residuals are against its own kind, as a real
product's are against its own OK parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .synthesis import perlin_noise

__all__ = ["TEXTURE_KINDS", "TextureFamily", "texture_families"]

TEXTURE_KINDS = ("grain", "brushed", "weave", "grooves", "speckle")


def _fbm(size: int, rng: np.random.Generator, octaves: int, base: int, persistence: float) -> np.ndarray:
    """Fractal sum of Perlin octaves (lattice ``base * 2^o``), about unit variance."""
    out = np.zeros((size, size))
    amp, total = 1.0, 0.0
    for o in range(octaves):
        res = min(base << o, size)
        out += amp * perlin_noise((size, size), (res, res), rng)
        total += amp * amp
        amp *= persistence
    return out / np.sqrt(total)


@dataclass(frozen=True)
class TextureFamily:
    """One look: ``kind`` and the parameters every image of the family shares."""

    kind: str
    params: dict = field(default_factory=dict)

    def image(self, rng: np.random.Generator, size: int = 256) -> np.ndarray:
        """One defect-free instance: ``size`` x ``size`` x 3 uint8."""
        p = self.params
        if size & (size - 1):
            raise ValueError(f"texture size must be a power of two, got {size}")
        if self.kind == "grain":
            x = _fbm(size, rng, p["octaves"], p["base"], p["persistence"])
        elif self.kind == "brushed":
            x = ndimage.gaussian_filter(rng.normal(size=(size, size)), (p["along"], p["across"]))
            x = ndimage.rotate(x, p["angle"], reshape=False, order=1, mode="reflect")
            x = x / (x.std() + 1e-9)
        elif self.kind == "weave":
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
            warp = 2.0 * _fbm(size, rng, 2, 2, 0.5)
            oy, ox = rng.uniform(0, p["period"], 2)
            x = (np.sin(2 * np.pi * (yy + oy + warp) / p["period"])
                 * np.sin(2 * np.pi * (xx + ox + warp) / (p["period"] * p["aspect"])))
            x = x + p["noise"] * rng.normal(size=x.shape)
        elif self.kind == "grooves":
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
            cy, cx = np.array(p["centre"]) * size + rng.normal(0, 0.05 * size, 2)
            r = np.hypot(yy - cy, xx - cx)
            x = np.sin(2 * np.pi * r / p["period"]) + p["noise"] * rng.normal(size=r.shape)
            x = ndimage.gaussian_filter(x, 0.7)
        elif self.kind == "speckle":
            x = 0.4 * _fbm(size, rng, 3, 2, 0.5)
            dots = rng.random((size, size)) < p["density"]
            x = x - ndimage.gaussian_filter(dots.astype(np.float64), p["dot_sigma"]) * p["dot_gain"]
        else:
            raise ValueError(f"unknown texture kind {self.kind!r}; choose from {', '.join(TEXTURE_KINDS)}")
        x = (x - x.mean()) / (x.std() + 1e-9)
        # Uneven lighting and a small exposure change, different on every part.
        ramp = np.linspace(-1, 1, size)
        gy, gx = rng.normal(0, p["shading"], 2)
        light = 1.0 + gy * ramp[:, None] + gx * ramp[None, :]
        grey = (p["mean"] * rng.uniform(0.95, 1.05) + p["contrast"] * x) * light
        rgb = grey[..., None] * np.asarray(p["tint"])[None, None, :]
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def images(self, count: int, seed: int, size: int = 256) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [self.image(rng, size) for _ in range(count)]


def texture_families(count: int, seed: int = 0) -> list[TextureFamily]:
    """``count`` families, the kinds in turn, each with its own random look."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = TEXTURE_KINDS[i % len(TEXTURE_KINDS)]
        common = {
            "mean": float(rng.uniform(60, 190)),
            "contrast": float(rng.uniform(8, 35)),
            "shading": float(rng.uniform(0.0, 0.12)),
            # near-grey, sometimes tinted (anodised, rusty, painted parts)
            "tint": [float(t) for t in (1.0 + rng.normal(0, 0.08, 3) if rng.random() < 0.7 else rng.uniform(0.8, 1.2, 3))],
        }
        if kind == "grain":
            extra = {"octaves": int(rng.integers(2, 5)), "base": int(2 ** rng.integers(1, 4)),
                     "persistence": float(rng.uniform(0.4, 0.8))}
        elif kind == "brushed":
            extra = {"along": float(rng.uniform(6, 30)), "across": float(rng.uniform(0.5, 1.5)),
                     "angle": float(rng.uniform(0, 180))}
        elif kind == "weave":
            extra = {"period": float(rng.uniform(6, 24)), "aspect": float(rng.uniform(0.7, 1.4)),
                     "noise": float(rng.uniform(0.1, 0.5))}
        elif kind == "grooves":
            far = rng.random() < 0.5  # near-straight lines from a far centre, or visible arcs
            extra = {"centre": [float(rng.uniform(-3, 4)) if far else float(rng.uniform(-0.5, 1.5)) for _ in range(2)],
                     "period": float(rng.uniform(3, 12)), "noise": float(rng.uniform(0.1, 0.6))}
        else:
            extra = {"density": float(rng.uniform(0.002, 0.02)), "dot_sigma": float(rng.uniform(0.7, 2.0)),
                     "dot_gain": float(rng.uniform(3, 12))}
        out.append(TextureFamily(kind, {**common, **extra}))
    return out
