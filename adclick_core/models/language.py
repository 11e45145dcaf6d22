"""Language fusion: LAVT's pixel-word attention module (PWAM) with a language gate.

PWAM(tokens, context): queries from pixels, keys/values from words (or prompt vectors); the
attended language feature multiplies a projected pixel feature element-wise (LAVT); a tanh gate
computed from the fused feature scales what is added back: ``out = tokens + gate(fused) * fused``.
The gate's last layer starts at zero, so a freshly attached PWAM is the identity.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .swin import ResidualSwinTrunk

__all__ = ["PWAM", "attach_language", "language_blocks", "split_context"]

def split_context(context) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``context`` is B x L x Z, B x Z (one prompt vector) or ``(context, key_padding_mask)``."""
    mask = None
    if isinstance(context, (tuple, list)):
        context, mask = context
    if context.dim() == 2:
        context = context.unsqueeze(1)
    if context.dim() != 3:
        raise ValueError(f"language context must be B x L x Z or B x Z, got shape {tuple(context.shape)}")
    return context, mask


class PWAM(nn.Module):
    """Pixel-word attention + language gate over B x h x w x D tokens.

    dim: pixel token width D; text_dim: word/prompt width Z; num_heads: attention heads (D must
    divide). Key padding masks follow PyTorch's convention: True marks a padded word to ignore.
    """

    def __init__(self, dim: int, text_dim: int, num_heads: int = 1, dropout: float = 0.0, gate_hidden: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.text_dim, self.num_heads = dim, text_dim, num_heads
        self.scale = (dim // num_heads) ** -0.5
        # pixel projection (LAVT vis_project)
        self.vis_project = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
        # spatial image-language attention (LAVT SpatialImageLanguageAttention; LayerNorm for InstanceNorm)
        self.query_norm = nn.LayerNorm(dim)
        self.f_query = nn.Linear(dim, dim)
        self.f_key = nn.Linear(text_dim, dim)
        self.f_value = nn.Linear(text_dim, dim)
        self.attn_out = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        # multimodal projection (LAVT project_mm)
        self.project_mm = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
        # language gate (LAVT res_gate): tanh(W2 relu(W1 f)) - W2 zero-initialised -> gate 0 at start
        hidden = gate_hidden or dim
        self.gate = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.Tanh())
        nn.init.zeros_(self.gate[2].weight)

    def attend(self, tokens: torch.Tensor, words: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """B x N x D pixels, B x L x Z words -> B x N x D language feature per pixel."""
        b, n, d = tokens.shape
        h = self.num_heads
        q = self.f_query(self.query_norm(tokens)).view(b, n, h, d // h).transpose(1, 2)  # B h N d'
        k = self.f_key(words).view(b, -1, h, d // h).transpose(1, 2)  # B h L d'
        v = self.f_value(words).view(b, -1, h, d // h).transpose(1, 2)
        sim = (q @ k.transpose(-1, -2)) * self.scale  # B h N L
        if key_padding_mask is not None:
            pad = key_padding_mask.to(torch.bool).view(b, 1, 1, -1)
            sim = sim.masked_fill(pad, float("-inf"))
            attn = torch.softmax(sim, dim=-1)
            attn = attn.masked_fill(pad.all(-1, keepdim=True), 0.0)  # all padded: avoid NaN rows
        else:
            attn = torch.softmax(sim, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.attn_out(out)

    def forward(self, tokens: torch.Tensor, context, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens B x h x w x D; context B x L x Z, B x Z or (context, mask) -> B x h x w x D."""
        words, mask = split_context(context)
        if key_padding_mask is not None:
            mask = key_padding_mask
        shape = tokens.shape
        x = tokens.reshape(shape[0], -1, shape[-1])
        words = words.to(dtype=x.dtype, device=x.device)
        if words.shape[0] == 1 and x.shape[0] > 1:  # one prompt for the whole batch
            words = words.expand(x.shape[0], -1, -1)
            mask = None if mask is None else mask.expand(x.shape[0], -1)
        fused = self.project_mm(self.vis_project(x) * self.attend(x, words, mask))
        if mask is not None:  # a sample whose words are all padding gets no language at all
            fused = fused * (~mask.to(torch.bool)).any(-1).to(fused.dtype).view(-1, 1, 1)
        out = x + self.gate(fused) * fused
        return out.reshape(shape)


def attach_language(
    trunk: "ResidualSwinTrunk", text_dim: int, after_blocks: Sequence[int], num_heads: int = 1, dropout: float = 0.0
) -> None:
    """Put a fresh :class:`PWAM` into ``trunk.fusion[i]`` for each block index ``i`` (negative
    indices count from the end); the trunk applies it after block ``i`` when given a context."""
    depth = len(trunk.fusion)
    dim = trunk.norm.normalized_shape[0]
    for i in after_blocks:
        j = int(i)
        if not -depth <= j < depth:
            raise ValueError(f"block index {i} out of range for a trunk of depth {depth}")
        trunk.fusion[j % depth] = PWAM(dim, text_dim, num_heads=num_heads, dropout=dropout)


def language_blocks(trunk: "ResidualSwinTrunk") -> list[int]:
    """Indices of the trunk blocks followed by a PWAM."""
    return [i for i, f in enumerate(trunk.fusion) if isinstance(f, PWAM)]
