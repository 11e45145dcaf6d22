"""Checkpoints: model weights + everything needed to rebuild and validate them, written atomically."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, MissingWeightsError

__all__ = ["CHECKPOINT_FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "combine_checkpoints",
           "ensemble_members", "save_ensemble", "replace_member", "joint_fingerprint", "SHIPPED_CLICK_CHECKPOINT",
           "SHIPPED_SEG_CHECKPOINT"]

CHECKPOINT_FORMAT_VERSION = 1
SHIPPED_CLICK_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "adclick_click.pt"
# An ADClick-Seg pre-trained with ``pretrain-seg``, installed here by a deployment: what Start
# Training continues from when ADCLICK_SEG_INIT is unset. None is shipped: pre-trained on the other
# development products it did not beat a new model (docs/results.md).
SHIPPED_SEG_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "adclick_seg_pretrained.pt"


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


def joint_fingerprint(fingerprints: list[str]) -> str:
    """The training-bank record of a model trained against several banks: one bank keeps its own
    fingerprint (what single-product checkpoints record), several a hash of all of them in order."""
    if len(set(fingerprints)) == 1:
        return fingerprints[0]
    return hashlib.sha256("+".join(fingerprints).encode()).hexdigest()[:16]


# What members of one ensemble must share: they answer for the same features and residuals. The
# bank they trained against is only a record: at serving time every member reads the residuals
# against the project's own bank, so members trained on other products can answer together.
_MEMBER_MUST_MATCH = ("model_config", "backbone", "residual_config")
# What each member keeps of its own single-model checkpoint, under trained_on["members"]: always,
# and only where it has them.
_MEMBER_RECORD = ("trained_on", "train_config", "train_summary", "bank_fingerprint")
_MEMBER_RECORD_IF_SET = ("init", "adapted")


def ensemble_members(ckpt: dict) -> list[dict]:
    """A checkpoint's models as single-model checkpoints: an ensemble's members (their weights, the
    shared configs and each member's own record), or the checkpoint itself."""
    n = int(ckpt.get("ensemble_members") or 0)
    if not n:
        return [ckpt]
    records = (ckpt.get("trained_on") or {}).get("members") or [{}] * n
    members = []
    for i, record in enumerate(records):
        prefix = f"members.{i}."
        members.append({
            "format_version": ckpt.get("format_version", CHECKPOINT_FORMAT_VERSION), "kind": ckpt.get("kind"),
            "state_dict": {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)},
            **{k: ckpt[k] for k in _MEMBER_MUST_MATCH if k in ckpt},
            **{k: v for k, v in (record or {}).items()
               if k in _MEMBER_RECORD + _MEMBER_RECORD_IF_SET and v is not None},
            "checkpoint": (record or {}).get("checkpoint") or f"member{i}",
        })
    return members


def save_ensemble(out: str | os.PathLike, kind: str, members: list[dict], **meta: Any) -> Path:
    """One ensemble checkpoint (``ensemble_members`` = N, weights under ``members.<i>.``) from N
    single-model checkpoints (dicts as ``load_checkpoint`` returns them, ``checkpoint`` naming each)
    of one architecture, backbone and residual config. Each member's record is kept under
    ``trained_on["members"]``; ``meta`` goes to the top level (atomic write)."""
    if len(members) < 2:
        raise CheckpointError(f"an ensemble needs at least 2 checkpoints, got {len(members)}")
    first = members[0]
    for c in members:
        if c.get("ensemble_members"):
            raise CheckpointError(f"{c.get('checkpoint')} is already an ensemble: combine its single-model "
                                  "checkpoints instead")
        for key in _MEMBER_MUST_MATCH:
            if c.get(key) != first.get(key):
                raise CheckpointError(f"{c.get('checkpoint')} and {first.get('checkpoint')} differ in {key}: "
                                      "they cannot answer together")
    state = {f"members.{i}.{k}": v for i, c in enumerate(members) for k, v in c["state_dict"].items()}
    records = [{"checkpoint": c.get("checkpoint"), **{k: c.get(k) for k in _MEMBER_RECORD},
                **{k: c[k] for k in _MEMBER_RECORD_IF_SET if c.get(k)}} for c in members]
    fingerprints = [c["bank_fingerprint"] for c in members if c.get("bank_fingerprint")]
    return save_checkpoint(out, kind, state, ensemble_members=len(members),
                           **{k: first[k] for k in _MEMBER_MUST_MATCH if k in first},
                           **({"bank_fingerprint": joint_fingerprint(fingerprints)} if fingerprints else {}),
                           trained_on={"members": records}, **meta)


def replace_member(members: list[dict], member: int, trained: str | os.PathLike, note: str,
                   out: str | os.PathLike, kind: str = "adclick_click", **meta: Any) -> Path:
    """The ensemble ``members`` (``ensemble_members``' list) with member ``member`` replaced by the
    single-model checkpoint file ``trained`` (recorded as ``note``), written to ``out``; ``trained``
    is removed. The other members keep answering as they were trained."""
    if not 0 <= member < len(members):
        raise CheckpointError(f"the ensemble has {len(members)} members; member {member} does not exist")
    members = list(members)
    members[member] = {**load_checkpoint(trained, kind), "checkpoint": note}
    try:
        return save_ensemble(out, kind, members, **meta)
    finally:
        Path(trained).unlink(missing_ok=True)


def combine_checkpoints(paths: list[str | os.PathLike], out: str | os.PathLike, kind: str = "adclick_click") -> dict:
    """``save_ensemble`` of the single-model checkpoint files ``paths``. Returns the summary."""
    save_ensemble(out, kind, [{**load_checkpoint(p, kind), "checkpoint": Path(p).name} for p in paths])
    return {"checkpoint": str(out), "members": [str(p) for p in paths], "bytes": Path(out).stat().st_size}
