"""Input embeddings: residual tokens (1x1 patch embedding of r^2) and click / previous-mask maps."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["residual_features", "ResidualEmbedding", "ClickEmbedding"]


def residual_features(residual: torch.Tensor, kind: str = "square") -> torch.Tensor:
    """The network input built from the signed residual r (ALGORITHM.md: r * r by default)."""
    if kind == "square":
        return residual * residual
    if kind == "abs":
        return residual.abs()
    if kind == "abs_square":
        return torch.cat([residual.abs(), residual * residual], dim=1)
    raise ValueError(f"unknown residual input {kind!r} (square, abs, abs_square)")


class ResidualEmbedding(nn.Module):
    """Each residual cell becomes one token: per-channel scaling, 1x1 conv, LayerNorm."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        # Typical magnitude of each input channel on normal data, set once from training data so
        # the raw squared residuals (heavy-tailed, backbone-specific) reach the network at unit scale.
        self.register_buffer("input_scale", torch.ones(in_channels))
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x C x h x w -> B x h x w x D
        x = x / self.input_scale.view(1, -1, 1, 1)
        x = torch.log1p(x)  # compresses the long tail of r^2 while keeping order
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ClickEmbedding(nn.Module):
    """Positive / negative click disks and the previous mask (3 x S x S) -> tokens on the grid."""

    def __init__(self, dim: int, stride: int = 8, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        widths = [16, 32, dim]
        n = int(round(torch.log2(torch.tensor(float(stride))).item()))
        for i in range(n):
            out = widths[min(i, len(widths) - 1)] if i < n - 1 else dim
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1)]
            if i < n - 1:
                layers += [nn.GELU()]
            ch = out
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)  # start as "no click information", learn to use it
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:  # B x 3 x S x S -> B x h x w x D
        return self.net(maps).permute(0, 2, 3, 1)
