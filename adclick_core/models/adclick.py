"""ADClick: M_t = Phi(R, M_{t-1}, C_t, V_lang) (Eq. 1) as a plain nn.Module built from a config."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .embeddings import ClickEmbedding, ResidualEmbedding, residual_features
from .heads import RefineHead, TokenHead
from .swin import ResidualSwinTrunk

__all__ = ["ADClickConfig", "ADClick"]


@dataclass
class ADClickConfig:
    in_channels: int = 176  # d_f of the backbone
    residual_input: str = "square"
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 4
    window_size: int = 8
    grid_size: int = 32  # input_size / 8
    input_size: int = 256
    fine_channels: int = 24  # stage-1 channels fed to the refine head; 0 = off
    head_channels: int = 32
    click_radius: float = 5.0
    drop_path: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ADClickConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ADClick(nn.Module):
    """Residual tokens + click embedding -> Swin trunk -> mask logits at stride 4."""

    def __init__(self, config: ADClickConfig):
        super().__init__()
        self.config = config
        in_ch = config.in_channels * (2 if config.residual_input == "abs_square" else 1)
        self.residual_embed = ResidualEmbedding(in_ch, config.embed_dim)
        self.click_embed = ClickEmbedding(config.embed_dim, stride=config.input_size // config.grid_size)
        self.trunk = ResidualSwinTrunk(
            config.embed_dim, config.depth, config.num_heads, config.window_size, config.grid_size, config.drop_path
        )
        self.token_head = TokenHead(config.embed_dim)
        self.refine_head = RefineHead(config.embed_dim, config.fine_channels, config.head_channels)

    def forward(
        self,
        residual: torch.Tensor,
        click_maps: torch.Tensor,
        fine: torch.Tensor | None = None,
        language: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """residual B x C x h x w (signed r), click_maps B x 3 x S x S (pos, neg, prev mask),
        fine B x c1 x 2h x 2w -> logits B x 1 x 2h x 2w."""
        x = residual_features(residual, self.config.residual_input)
        tokens = self.residual_embed(x) + self.click_embed(click_maps)
        tokens = self.trunk(tokens, language)
        coarse = self.token_head(tokens)
        return self.refine_head(tokens, coarse, fine, click_maps)
