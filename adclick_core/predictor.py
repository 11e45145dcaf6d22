"""The API the backend uses (SamPredictor style): set the expensive image state once, click many times."""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import BackboneConfig, FeatureExtractor, build_extractor, load_image, resolve_device
from .baselines import gray_image
from .checkpoint import load_checkpoint
from .clicks import Click, encode_clicks, scale_clicks
from .errors import CheckpointError, InputError
from .models import ADClick, ADClickConfig, ClickEnsemble
from .reference import ReferenceBank, image_fingerprint
from .refinement import RefineConfig, refine_answer
from .residuals import ResidualConfig, compute_residuals

__all__ = ["ImageState", "ClickPredictor", "SegPredictor", "smooth_probability", "seg_probabilities",
           "gate_by_image_score", "MapFusion", "fuse_with_map", "smooth_map", "SEG_BLUR_SIGMA"]

SEG_BLUR_SIGMA = 4.0  # px at the output size: ADClick-Seg maps are smoothed as in the papers' evaluation


@dataclass
class ImageState:
    """Everything the light part needs for one image; cache it per image."""

    original_hw: tuple[int, int]
    residual: torch.Tensor  # 1 x C x g x g
    fine: torch.Tensor  # 1 x c1 x 2g x 2g
    distance: torch.Tensor  # g x g training-free anomaly map
    image_key: str
    bank_fingerprint: str
    gray: np.ndarray | None = None  # H x W uint8, original size: boundary refinement (click states only)

    @property
    def nbytes(self) -> int:
        extra = self.gray.nbytes if self.gray is not None else 0
        return extra + sum(t.numel() * t.element_size() for t in (self.residual, self.fine, self.distance))


def _upsample(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def smooth_map(x: torch.Tensor, hw: tuple[int, int], sigma: float = SEG_BLUR_SIGMA) -> torch.Tensor:
    """B x 1 x h x w -> B x 1 x H x W, bilinear, then Gaussian-smoothed (sigma px at H x W)."""
    x = _upsample(x.float(), hw)
    if sigma > 0:
        from torchvision.transforms.functional import gaussian_blur

        k = 2 * int(math.ceil(3 * sigma)) + 1
        x = gaussian_blur(x, [k, k], [sigma, sigma])
    return x


def smooth_probability(logits: torch.Tensor, hw: tuple[int, int], sigma: float = SEG_BLUR_SIGMA) -> torch.Tensor:
    """B x 1 x h x w logits -> B x 1 x H x W probabilities, Gaussian-smoothed (sigma px at H x W)."""
    return smooth_map(torch.sigmoid(logits.float()), hw, sigma)


def _image_score(per_type: dict[str, torch.Tensor]) -> torch.Tensor:
    """B x 1 x 1 x 1: each image's strongest answer over all its maps."""
    return torch.stack([p.flatten(1).amax(1) for p in per_type.values()]).amax(0).view(-1, 1, 1, 1)


def _each_map(per_type: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    """``fn`` on each map; a map shared by several types (no language branch) is done once and
    stays one tensor."""
    done: dict[int, torch.Tensor] = {}
    for p in per_type.values():
        if id(p) not in done:
            done[id(p)] = fn(p)
    return {t: done[id(p)] for t, p in per_type.items()}


def gate_by_image_score(per_type: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each B x 1 x H x W map times its image's score (the maximum over all the maps).

    One image's map is ranked against other images' (pooled pixel AP, one threshold for a whole
    project): a lukewarm pixel in an image whose strongest answer is weak is less likely a defect
    than the same value in an image with a confident defect. Measured on MTD, 5 clicks, fold 0:
    pixel AP 0.595 -> 0.605; image ranking unchanged (the new score is the old one squared).
    Shared maps (no language branch) stay one tensor."""
    score = _image_score(per_type)
    return _each_map(per_type, lambda p: p * score)


@dataclass(frozen=True)
class MapFusion:
    """ADClick-Seg's answer fused with the training-free map ||r||, for models trained on
    synthetic anomalies alone: ``(p + weight * min(d / reference, clip)) * score ** gate_exponent``,
    divided by ``1 + weight * clip`` to stay in [0, 1]; ``score`` is the image score (the maximum
    of all the model's maps).

    Such a model learns from relit composites that a brighter normal surface is normal, and with
    it to trust the residual magnitude less; the map localises small holes and edge chips better,
    the model the large uneven patches (MTD: see SegTrainConfig.map_fusion_weight).
    ``reference``: the ||r|| that counts as 1, the 99th percentile over defect-free reference
    images, each against the rest of the bank (set at training time)."""

    weight: float
    reference: float
    gate_exponent: float = 0.5
    clip: float = 3.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "MapFusion | None":
        if not d:
            return None
        return cls(**{k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__})


def fuse_with_map(per_type: dict[str, torch.Tensor], distance: torch.Tensor,
                  fusion: MapFusion) -> dict[str, torch.Tensor]:
    """``MapFusion`` on each B x 1 x H x W map; ``distance``: ||r|| smoothed to the same size."""
    prior = fusion.weight * (distance / fusion.reference).clamp(0, fusion.clip)
    factor = _image_score(per_type) ** fusion.gate_exponent / (1 + fusion.weight * fusion.clip)
    return _each_map(per_type, lambda p: (p + prior) * factor)


@torch.no_grad()
def seg_probabilities(
    model: ADClick,
    residual: torch.Tensor,
    types: Sequence[str],
    prompt_features: dict[str, torch.Tensor] | None = None,
    hw: tuple[int, int] | None = None,
    fine: torch.Tensor | None = None,
    sigma: float = SEG_BLUR_SIGMA,
) -> dict[str, torch.Tensor]:
    """ADClick-Seg's answer (zero clicks) per defect type: B x 1 x H x W smoothed probabilities
    (``hw`` default: the model input size). A model without language gives one map, shared by
    every type (the same tensor object)."""
    s = model.config.input_size
    hw = hw or (s, s)
    maps = encode_clicks([[] for _ in range(len(residual))], None, s, model.config.click_radius).to(residual.device)
    if model.config.text_dim == 0:
        prob = smooth_probability(model(residual, maps, fine), hw, sigma)
        return {t: prob for t in types}
    features = prompt_features or {}
    for t in types:
        if t not in features:
            raise InputError(f"defect type {t!r} is unknown to this model (known: {sorted(features)})")
    return {t: smooth_probability(model(residual, maps, fine, features[t].expand(len(residual), -1)), hw, sigma)
            for t in types}


class _ResidualPredictor:
    """Shared part of both predictors: extractor + reference bank -> per-image residual state."""

    def __init__(
        self,
        model: ADClick,
        extractor: FeatureExtractor,
        bank: ReferenceBank | None,
        residual_config: ResidualConfig,
        device: torch.device,
        checkpoint_info: dict | None = None,
    ):
        self.model = model.eval().to(device)
        self.extractor = extractor
        self.bank = bank.to(device) if bank is not None else ReferenceBank(extractor.config)
        self.residual_config = residual_config
        self.device = device
        self.checkpoint_info = checkpoint_info or {}
        if self.model.config.in_channels != extractor.feature_dim:
            raise CheckpointError("checkpoint and backbone disagree on the feature dimension")

    @staticmethod
    def _load(path, kind: str, bank: ReferenceBank | None, device, backbone_weights, random_init_backbone,
              residual_config: ResidualConfig | None, extractor: FeatureExtractor | None = None):
        ckpt = load_checkpoint(path, kind)
        dev = resolve_device(device)
        backbone = BackboneConfig.from_dict(ckpt["backbone"])
        if bank is not None and bank.backbone.fingerprint() != backbone.fingerprint():
            raise CheckpointError(
                f"the reference bank was built with backbone {bank.backbone.to_dict()}, "
                f"the checkpoint needs {backbone.to_dict()}: rebuild the bank"
            )
        if extractor is None or extractor.config.fingerprint() != backbone.fingerprint():
            extractor = build_extractor(backbone, weights=backbone_weights, random_init=random_init_backbone, device=dev)
        mcfg = ADClickConfig.from_dict(ckpt["model_config"])
        members = int(ckpt.get("ensemble_members") or 1)
        model = ClickEnsemble(mcfg, members) if members > 1 else ADClick(mcfg)
        try:
            model.load_state_dict(ckpt["state_dict"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit the recorded model config: {exc}") from exc
        rcfg = residual_config or ResidualConfig.from_dict(ckpt.get("residual_config", {}))
        info = {k: v for k, v in ckpt.items() if k not in ("state_dict", "prompt_features")}
        return ckpt, model, extractor, rcfg, dev, info

    def with_bank(self, bank: ReferenceBank):
        """A predictor for another reference bank sharing this one's weights (cheap)."""
        other = copy.copy(self)
        other.bank = bank.to(self.device)
        return other

    @torch.no_grad()
    def set_image(self, image: "np.ndarray | str | os.PathLike") -> ImageState:
        """Backbone features + location-aware residuals for one image: the expensive step."""
        self.bank.require_nonempty()
        arr = load_image(image)
        feats = self.extractor(self.extractor.preprocess([arr]))
        res = compute_residuals(feats.grid, feats.descriptor, self.bank, self.residual_config)
        return ImageState(
            original_hw=(int(arr.shape[0]), int(arr.shape[1])),
            residual=res.residual,
            fine=feats.fine.to(self.device),
            distance=res.distance[0],
            image_key=image_fingerprint(arr),
            bank_fingerprint=self.bank.fingerprint,
        )

    def anomaly_map(self, state: ImageState) -> np.ndarray:
        """Training-free anomaly map ||r|| at the original image size."""
        return _upsample(state.distance[None, None].float(), state.original_hw)[0, 0].cpu().numpy()


class ClickPredictor(_ResidualPredictor):
    """ADClick inference: residual state per image, then clicks -> probability map at image size.

    Small answers get their edges refined on the full-resolution image (``refinement.py``);
    ``with_refinement(None)`` gives the model's raw answer.
    """

    refinement: RefineConfig | None = RefineConfig()

    def set_image(self, image: "np.ndarray | str | os.PathLike") -> ImageState:
        """The residual state plus the grayscale copy that boundary refinement reads (Seg states
        go without it)."""
        arr = load_image(image)
        state = super().set_image(arr)
        state.gray = np.round(gray_image(arr) * 255.0).astype(np.uint8)
        return state

    def with_refinement(self, config: RefineConfig | None) -> "ClickPredictor":
        """A predictor sharing these weights whose answers are refined with ``config`` (None: raw)."""
        other = copy.copy(self)
        other.refinement = config
        return other

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | None = None,
        bank: ReferenceBank | None = None,
        device: str | torch.device = "auto",
        backbone_weights: str | os.PathLike | None = None,
        random_init_backbone: bool = False,
        residual_config: ResidualConfig | None = None,
    ) -> "ClickPredictor":
        """Load a click checkpoint (None: the one shipped with the package) and its backbone."""
        _, model, extractor, rcfg, dev, info = cls._load(
            path, "adclick_click", bank, device, backbone_weights, random_init_backbone, residual_config)
        return cls(model, extractor, bank, rcfg, dev, info)

    @torch.no_grad()
    def predict(
        self,
        state: ImageState,
        clicks: Sequence[Click],
        prev_mask: np.ndarray | None = None,
        defect_type: str | None = None,
    ) -> np.ndarray:
        """Probability map (H x W float32 in [0, 1], original size) for the clicks so far.

        ``prev_mask``: the previous answer (H x W, probabilities or 0/1), or None.
        ``defect_type`` selects the language prompt once the language branch is enabled.
        """
        h, w = state.original_hw
        for c in clicks:
            if not (np.isfinite(c.x) and np.isfinite(c.y) and 0 <= c.x <= w and 0 <= c.y <= h):
                raise InputError(f"click ({c.x:.1f}, {c.y:.1f}) lies outside the {w}x{h} image")
        s = self.model.config.input_size
        prev = None
        if prev_mask is not None:
            pm = np.asarray(prev_mask, dtype=np.float32)
            if pm.shape != (h, w):
                raise InputError(f"prev_mask has shape {pm.shape}, expected {(h, w)}")
            if pm.max(initial=0) > 1:
                pm = pm / 255.0
            prev = _upsample(torch.from_numpy(pm)[None, None], (s, s))
        maps = encode_clicks([scale_clicks(clicks, (h, w), (s, s))], prev, s, self.model.config.click_radius)
        logits = self.model(state.residual, maps.to(self.device), state.fine)
        prob = torch.sigmoid(_upsample(logits, (h, w)))[0, 0].float().cpu().numpy()
        if self.refinement is not None and state.gray is not None:
            prob = refine_answer(prob, state.gray, clicks, self.refinement)
        return prob


class SegPredictor(_ResidualPredictor):
    """ADClick-Seg inference: zero clicks, once per defect type, pixel-wise max (Eq. 7)."""

    def __init__(self, *args, prompt_features: dict[str, torch.Tensor] | None = None,
                 blur_sigma: float = SEG_BLUR_SIGMA,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_features = {k: v.to(self.device) for k, v in (prompt_features or {}).items()}
        self.blur_sigma = blur_sigma

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        bank: ReferenceBank | None = None,
        device: str | torch.device = "auto",
        backbone_weights: str | os.PathLike | None = None,
        random_init_backbone: bool = False,
        residual_config: ResidualConfig | None = None,
        extractor: FeatureExtractor | None = None,
    ) -> "SegPredictor":
        """Load an ADClick-Seg checkpoint; ``extractor`` reuses an already loaded backbone if it fits."""
        if path is None:
            raise CheckpointError("no ADClick-Seg checkpoint given (train one first)")
        ckpt, model, extractor, rcfg, dev, info = cls._load(
            path, "adclick_seg", bank, device, backbone_weights, random_init_backbone, residual_config, extractor)
        return cls(model, extractor, bank, rcfg, dev, info, prompt_features=ckpt.get("prompt_features") or {})

    @property
    def defect_types(self) -> list[str]:
        return list(self.checkpoint_info.get("defect_types") or ["defect"])

    @property
    def threshold(self) -> float:
        """Probability at which a pixel is called defective: calibrated on the training labels
        when the checkpoint was written (``train_seg``), else 0.5."""
        return float(self.checkpoint_info.get("threshold") or 0.5)

    # True / False: gate maps or not whatever the checkpoint says (evaluation ablations); None: as
    # the checkpoint's threshold was calibrated.
    gate: bool | None = None

    @property
    def map_fusion(self) -> MapFusion | None:
        """The checkpoint's fusion with the training-free map (models trained unsupervised), else None."""
        return MapFusion.from_dict(self.checkpoint_info.get("map_fusion"))

    @property
    def gated(self) -> bool:
        """Whether maps are scaled by the image score (``gate_by_image_score``): ``gate`` if set,
        else the checkpoint's setting; checkpoints without it predate gating."""
        if self.gate is not None:
            return self.gate
        return bool((self.checkpoint_info.get("train_config") or {}).get("gate_by_image_score", False))

    def predict_per_type(self, state: ImageState, defect_types: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Anomaly probability per defect type, H x W float32 at the original size (one shared
        array for every type when the model has no language branch)."""
        types = list(defect_types or self.defect_types)
        probs = seg_probabilities(self.model, state.residual, types, self.prompt_features, state.original_hw,
                                  state.fine, self.blur_sigma)
        fusion = self.map_fusion
        if fusion is not None:  # carries its own image-score gate
            distance = smooth_map(state.distance[None, None].to(self.device), state.original_hw, self.blur_sigma)
            probs = fuse_with_map(probs, distance, fusion)
        elif self.gated:
            probs = gate_by_image_score(probs)
        arrays: dict[int, np.ndarray] = {}  # tensor id -> array: a shared map is converted once
        out: dict[str, np.ndarray] = {}
        for t, p in probs.items():
            if id(p) not in arrays:
                arrays[id(p)] = p[0, 0].cpu().numpy()
            out[t] = arrays[id(p)]
        return out

    def predict(
        self, image: "np.ndarray | str | os.PathLike | ImageState", defect_types: Sequence[str] | None = None
    ) -> tuple[np.ndarray, float]:
        """(anomaly map H x W float32 in [0, 1], image score = max of the smoothed map)."""
        state = image if isinstance(image, ImageState) else self.set_image(image)
        per_type = self.predict_per_type(state, defect_types)
        amap = np.max(np.stack(list(per_type.values())), axis=0)
        return amap.astype(np.float32), float(amap.max())
