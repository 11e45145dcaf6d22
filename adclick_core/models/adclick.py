"""ADClick: M_t = Phi(R, M_{t-1}, C_t, V_lang) (Eq. 1) as a plain nn.Module built from a config."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import ClickEmbedding, ResidualEmbedding, residual_features
from .guidance import click_similarity, residual_magnitude
from .heads import RefineHead, TokenHead
from .prior import PRIOR_CHANNELS, residual_cut_prior
from .swin import ResidualSwinTrunk

__all__ = ["ADClickConfig", "ADClick"]


@dataclass
class ADClickConfig:
    in_channels: int = 256  # d_f of the backbone
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
    head: str = "refine"  # "refine": ADClick mask head; "token": ADClick-Seg per-token output
    text_dim: int = 0  # width of prompt features; 0 = no language branch
    language_blocks: tuple[int, ...] = (1, 3)  # PWAM after these trunk blocks
    guidance: bool = True  # click-similarity maps (models/guidance.py)
    # Start from a training-free answer and learn a correction on top: the residual map cut by the
    # clicks (models/prior.py) for the "refine" head, the residual magnitude map for the "token"
    # head (ADClick-Seg sees no clicks). Checkpoints without the key predate it.
    prior: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["language_blocks"] = list(self.language_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ADClickConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d.setdefault("prior", False)
        if "language_blocks" in d:
            d["language_blocks"] = tuple(d["language_blocks"])
        return cls(**d)


class ADClick(nn.Module):
    """Residual tokens + click embedding -> Swin trunk -> mask logits at stride 4."""

    def __init__(self, config: ADClickConfig):
        super().__init__()
        self.config = config
        in_ch = config.in_channels * (2 if config.residual_input == "abs_square" else 1)
        self.residual_embed = ResidualEmbedding(in_ch, config.embed_dim)
        self.click_embed = ClickEmbedding(config.embed_dim, stride=config.input_size // config.grid_size)
        self.use_prior = config.prior and config.head == "refine"
        self.use_map_prior = config.prior and config.head == "token"
        n_prior = PRIOR_CHANNELS if self.use_prior else 0
        # residual similarity (pos, neg) + residual magnitude (+ the prior's channels), on the grid
        self.guidance_embed = nn.Linear(3 + n_prior, config.embed_dim) if config.guidance else None
        self.trunk = ResidualSwinTrunk(
            config.embed_dim, config.depth, config.num_heads, config.window_size, config.grid_size, config.drop_path
        )
        if config.head not in ("refine", "token"):
            raise ValueError(f"unknown head {config.head!r} (refine, token)")
        if config.text_dim > 0:
            from .language import attach_language

            attach_language(self.trunk, config.text_dim, [b for b in config.language_blocks if b < config.depth])
        self.token_head = TokenHead(config.embed_dim)
        self.refine_head = (
            RefineHead(config.embed_dim, config.fine_channels, config.head_channels,
                       guidance_channels=(4 + n_prior) if config.guidance else 0)
            if config.head == "refine" else None
        )
        if self.use_prior or self.use_map_prior:
            # Output = a * prior logit + b + learnt correction. The click model's correction starts
            # at zero, so untrained it answers exactly the prior; the token head keeps its small
            # random init (zero-init there learnt far slower on a toy set: AP +0.03 vs +0.25 in 70
            # steps). The map prior's a, b put a typical normal cell (mean scaled r^2 = 1) at logit
            # -1.3 and keep strong residuals (100x) below saturation, where float32 ties at 1.0.
            self.prior_scale = nn.Parameter(torch.full((1,), 1.0))
            self.prior_bias = nn.Parameter(torch.full((1,), 0.0 if self.use_prior else -2.0))
            if self.refine_head is not None:
                nn.init.zeros_(self.token_head.proj.weight)
                nn.init.zeros_(self.token_head.proj.bias)
                last = self.refine_head.refine[-1]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def forward(
        self,
        residual: torch.Tensor,
        click_maps: torch.Tensor,
        fine: torch.Tensor | None = None,
        language: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """residual B x C x h x w (signed r), click_maps B x 3 x S x S (pos, neg, prev mask),
        fine B x c1 x 2h x 2w, language B x L x Z (or B x Z) prompt features
        -> logits B x 1 x 2h x 2w ("refine" head) or B x 1 x h x w ("token" head)."""
        x = residual_features(residual, self.config.residual_input)
        tokens = self.residual_embed(x) + self.click_embed(click_maps)
        guide = None
        prior = residual_cut_prior(residual, click_maps) if self.use_prior else None
        mag = residual_magnitude(x / self.residual_embed.input_scale.view(1, -1, 1, 1))
        if self.guidance_embed is not None:
            r_sim = click_similarity(residual, click_maps)
            grid_guide = [r_sim, mag] + ([prior] if prior is not None else [])
            tokens = tokens + self.guidance_embed(torch.cat(grid_guide, 1).permute(0, 2, 3, 1))
            if fine is not None:
                f_sim = click_similarity(fine, click_maps)
                coarse_guide = [r_sim] + ([prior] if prior is not None else [])
                guide = torch.cat([f_sim, F.interpolate(torch.cat(coarse_guide, 1), size=fine.shape[-2:],
                                                        mode="bilinear", align_corners=False)], 1)
        if language is not None and language.dim() == 2:
            language = language[:, None]
        tokens = self.trunk(tokens, language if self.config.text_dim > 0 else None)
        coarse = self.token_head(tokens)
        if self.refine_head is None:
            return coarse + self.prior_scale * mag + self.prior_bias if self.use_map_prior else coarse
        logits = self.refine_head(tokens, coarse, fine, click_maps, guide)
        if prior is None:
            return logits
        p = F.interpolate(prior[:, 3:], size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return logits + self.prior_scale * torch.logit(p, eps=1e-3) + self.prior_bias
