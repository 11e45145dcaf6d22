"""A click checkpoint trained a few iterations on a toy folder's train/good: the shared stand-in
for a real click model wherever the weights are not the point."""
from __future__ import annotations

from pathlib import Path

import torch

from adclick_core.features.backbone import BackboneConfig, build_extractor
from adclick_core.utils.data import MVTecFolder
from adclick_core.models import ADClickConfig
from adclick_core.features.reference import ReferenceBank
from adclick_core.features.residuals import ResidualConfig
from adclick_core.training.click import ClickTrainConfig, build_synthetic_pool, train_click


def train_tiny_click(data: Path, out: Path, backbone: BackboneConfig, residual: ResidualConfig,
                     random_init: bool, iterations: int = 5) -> ReferenceBank:
    """Train a 2-block, 16-wide click model on ``data``'s train/good (one synthetic anomaly per
    image) and save it to ``out``; returns the bank it was trained against."""
    torch.manual_seed(0)
    extractor = build_extractor(backbone, random_init=random_init, device="cpu")
    normals = MVTecFolder(data).train_good()
    bank = ReferenceBank.build(extractor, normals, names=[p.name for p in normals], progress=False)
    pool = build_synthetic_pool(extractor, bank, normals, residual, per_image=1, seed=0, progress=False,
                                bank_index=list(range(len(normals))))
    model = ADClickConfig(in_channels=extractor.feature_dim, embed_dim=16, depth=2, num_heads=2, window_size=4,
                          grid_size=extractor.grid_size, input_size=backbone.input_size,
                          fine_channels=extractor.fine_channels, head_channels=8, drop_path=0.0)
    train_click(pool, ClickTrainConfig(iterations=iterations, batch_size=4, lr=3e-3, warmup=2, ema_decay=0.9,
                                       model=model),
                out=out, meta={"backbone": backbone.to_dict(), "residual_config": residual.to_dict(),
                               "bank_fingerprint": bank.fingerprint},
                device="cpu", progress=False, checkpoint_every=0)
    return bank
