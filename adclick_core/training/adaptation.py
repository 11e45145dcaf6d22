"""Per-product adaptation of the click model (the ADClick paper's ADClick*).

The shipped click model learnt what an anomaly's residual looks like on the products it was
trained on. A new product has other textures, other residual magnitudes and other defect sizes;
fine-tuning on the product's own defect-free images, with synthetic anomalies pasted on whole
images and on zoom-in crops, shows it that product in minutes on a CPU. No defect of the product
is needed: the references a project already has are enough. Measured, it helps some products and
costs pooled AP on others (docs/results.md), so the backend runs it only when asked.

Once a project has accepted masks of its own real defects, they join the synthetic anomalies
(``adapt_click(defects=...)``): the model then learns the product's actual defects as well.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..utils.checkpoint import ensemble_members, replace_member
from ..utils.errors import InputError
from ..inference.predictor import ClickPredictor
from .synthesis import AnomalySynthesizer
from .distributed import Distributed
from .click import ClickTrainConfig, ProgressFn, build_defect_pool, build_synthetic_pool, concat_pools, train_click

__all__ = ["AdaptConfig", "adapt_click", "MIN_REFERENCES"]

MIN_REFERENCES = 8  # fewer defect-free images than this teach the model the images, not the product

# The anomaly mix of the shipped click model's members (trained_on.synthesizer), used where the
# base checkpoint records none.
_DEFAULT_MIX = {"p_edge": 0.3, "p_uneven": 0.35}


@dataclass
class AdaptConfig:
    """How the click model is fine-tuned on one product's defect-free images."""

    iterations: int = 300
    lr: float = 3e-4
    warmup: int = 30
    batch_size: int = 8
    per_image: int = 2  # synthetic anomalies per reference image
    zoom_share: float = 0.5  # of them on zoom-in crops (the rest on whole images)
    max_images: int = 200  # references used at most (evenly spread over the bank)
    max_extra_clicks: int = 3
    member: int = 0  # the ensemble member fine-tuned (the others are kept as they are)
    # With the project's own masks (``adapt_click(defects=...)``): the share of training samples
    # drawn from them (each mask whole and as a zoom-in crop), the rest synthetic anomalies.
    mask_share: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def member_weights(pred: ClickPredictor, member: int) -> tuple[dict, dict]:
    """(state dict, synthesizer mix) of the model to fine-tune: the checkpoint itself, or one
    member of an ensemble."""
    members = getattr(pred.model, "members", None)
    trained_on = pred.checkpoint_info.get("trained_on") or {}
    if members is None:
        return pred.model.state_dict(), dict(trained_on.get("synthesizer") or _DEFAULT_MIX)
    if not 0 <= member < len(members):
        raise InputError(f"the click model has {len(members)} members; member {member} does not exist")
    recorded = (trained_on.get("members") or [{}] * len(members))[member]
    mix = ((recorded or {}).get("trained_on") or {}).get("synthesizer") or _DEFAULT_MIX
    return members[member].state_dict(), dict(mix)


def adapt_click(
    pred: ClickPredictor,
    out: str | Path,
    config: AdaptConfig | None = None,
    normals: Sequence | None = None,
    progress: bool = True,
    callback: ProgressFn | None = None,
    defects: Sequence[tuple] | None = None,
) -> dict:
    """Fine-tune ``pred``'s click model (an ensemble: its member ``config.member``) on its bank's
    product and write the checkpoint ``out`` (atomically; an ensemble stays an ensemble).
    ``normals``: the defect-free images (paths or arrays) to paste anomalies on; None: the bank's
    own references (their stored pixels), each left out of its own residual. ``defects``: the
    project's own (image, mask) pairs, accepted masks of real defects, learnt from beside the
    synthetic anomalies (``config.mask_share`` of the samples). Returns a summary (seconds, pool
    size, losses)."""
    config = config or AdaptConfig()
    if defects and not 0.0 < config.mask_share < 1.0:
        raise InputError(f"mask_share must lie strictly between 0 and 1, got {config.mask_share}")
    bank = pred.bank
    t0 = time.time()
    if normals is None:
        if not bank.has_sources:
            raise InputError("the reference bank keeps no reference pixels (an older bank file): rebuild it")
        usable = [i for i, src in enumerate(bank.sources) if src is not None]
        step = max(1, len(usable) // max(1, config.max_images))
        index = usable[::step][: config.max_images]
        images: list = [bank.source(i) for i in index]
    else:
        images = list(normals)[:: max(1, len(normals) // max(1, config.max_images))][: config.max_images]
        index = bank.positions(images)
    if len(images) < (1 if defects else MIN_REFERENCES):
        raise InputError(f"adaptation needs at least {MIN_REFERENCES} defect-free images (1 with masks to learn "
                         f"from), got {len(images)}")
    state, mix = member_weights(pred, config.member)
    pool = build_synthetic_pool(
        pred.extractor, bank, images, pred.residual_config, per_image=config.per_image, seed=config.seed,
        progress=progress, bank_index=index, synthesizer=AnomalySynthesizer(**mix), zoom_share=config.zoom_share,
        zoom=pred.zoom or None,
    )
    weights = None
    if defects:
        real = build_defect_pool(pred.extractor, bank, defects, pred.residual_config, seed=config.seed,
                                 progress=progress, zoom=pred.zoom or None)
        weights = np.concatenate([np.full(len(pool), (1.0 - config.mask_share) / len(pool)),
                                  np.full(len(real), config.mask_share / len(real))])
        pool = concat_pools([pool, real])
    t_pool = time.time() - t0
    if callback is not None:
        callback(0.0, f"training pool of {len(pool)} samples in {t_pool:.0f} s")
    tcfg = ClickTrainConfig(iterations=config.iterations, batch_size=config.batch_size, lr=config.lr,
                            warmup=config.warmup, max_extra_clicks=config.max_extra_clicks, seed=config.seed,
                            model=pred.model.config)
    meta = {
        "backbone": pred.extractor.config.to_dict(),
        "residual_config": pred.residual_config.to_dict(),
        "bank_fingerprint": bank.fingerprint,
        "trained_on": {"references": len(images), "synthetic_per_image": config.per_image, "synthesizer": mix,
                       "zoom_share": config.zoom_share, "pool_seconds": round(t_pool, 1),
                       "threads": torch.get_num_threads()},
        "adapted": {"config": config.to_dict(), "references": len(images), "masks": len(defects or ())},
    }
    members = getattr(pred.model, "members", None)
    # An ensemble stays one: the adapted member takes its place beside the others, which keep
    # answering as they were trained (what they know of other products is not overwritten).
    trained = out if members is None else Path(out).with_name(f".{Path(out).name}.member.tmp")
    try:
        _, summary = train_click(pool, tcfg, out=trained, meta=meta, device=pred.device, progress=progress,
                                 callback=callback, checkpoint_every=0, init_state=state, sample_weights=weights)
        if members is not None and Distributed.current().is_main:  # under torchrun rank 0 wrote the member
            base = ensemble_members({"state_dict": pred.model.state_dict(), **pred.checkpoint_info})
            replace_member(base, config.member, trained, f"member {config.member} adapted", out,
                           adapted=meta["adapted"])
    finally:
        if members is not None:
            Path(trained).unlink(missing_ok=True)
    summary.update({"checkpoint": str(out), "references": len(images), "masks": len(defects or ()),
                    "pool_size": len(pool),
                    "pool_seconds": round(t_pool, 1), "total_seconds": round(time.time() - t0, 1)})
    return summary
