"""Checkpoints: model weights + everything needed to rebuild and validate them, written atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, MissingWeightsError

__all__ = ["CHECKPOINT_FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "SHIPPED_CLICK_CHECKPOINT"]

CHECKPOINT_FORMAT_VERSION = 1
SHIPPED_CLICK_CHECKPOINT = Path(__file__).parent / "weights" / "adclick_click.pt"


def save_checkpoint(path: str | os.PathLike, kind: str, state_dict: dict, **meta: Any) -> Path:
    """Write ``{format_version, kind, state_dict, **meta}``; meta must be plain Python data.

    Temp file + rename: a reader never sees a half-written file, a crash never corrupts the old one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, "kind": kind,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, **meta}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike | None, kind: str) -> dict:
    """Load safely (``weights_only=True``: no pickled code) and check what kind of model it holds."""
    path = Path(path) if path else SHIPPED_CLICK_CHECKPOINT
    if not path.is_file():
        raise MissingWeightsError(
            f"checkpoint {path} does not exist"
            + (" (the shipped click checkpoint is missing: reinstall the package or train one with "
               "`python -m adclick_core train-click`)" if path == SHIPPED_CLICK_CHECKPOINT else "")
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (kind={ckpt.get('kind') if isinstance(ckpt, dict) else None})")
    if int(ckpt.get("format_version", 0)) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version of adclick_core")
    return ckpt
