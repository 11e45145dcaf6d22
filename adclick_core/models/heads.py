"""Mask heads: per-token logits (ADClick-Seg style) plus a light stride-4 refinement (ADClick)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenHead", "RefineHead"]


class TokenHead(nn.Module):
    """One logit per residual cell."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # B x h x w x D -> B x 1 x h x w
        return self.proj(tokens).permute(0, 3, 1, 2)


class RefineHead(nn.Module):
    """Upsample tokens x2 and refine with stage-1 image features and the click maps at stride 4.

    The residual grid (stride 8) is too coarse for thin cracks; the first backbone stage carries
    the edges needed to place the boundary, the click maps keep clicked pixels honest.
    """

    def __init__(self, dim: int, fine_channels: int, hidden: int = 32, click_channels: int = 3,
                 guidance_channels: int = 0):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.fine = nn.Conv2d(fine_channels, hidden, 1) if fine_channels > 0 else None
        self.guidance_channels = guidance_channels if fine_channels > 0 else 0
        in_ch = hidden * (2 if self.fine is not None else 1) + click_channels + 1 + self.guidance_channels
        self.refine = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(
        self,
        tokens: torch.Tensor,
        coarse_logits: torch.Tensor,
        fine: torch.Tensor | None,
        click_maps: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.fine is not None and fine is None:
            raise ValueError("this model's refine head needs the stage-1 features (fine=...)")
        x = self.reduce(tokens.permute(0, 3, 1, 2))
        size = (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        coarse = F.interpolate(coarse_logits, size=size, mode="bilinear", align_corners=False)
        parts = [x]
        if self.fine is not None and fine is not None:
            parts.append(self.fine(F.interpolate(fine, size=size, mode="bilinear", align_corners=False)))
        parts += [F.adaptive_max_pool2d(click_maps, size), coarse]
        if self.guidance_channels:
            parts.append(F.interpolate(guidance, size=size, mode="bilinear", align_corners=False))
        return coarse + self.refine(torch.cat(parts, dim=1))
