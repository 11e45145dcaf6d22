"""Several click models of one architecture answering together."""
from __future__ import annotations

import torch
from torch import nn

from .adclick import ADClick, ADClickConfig

__all__ = ["ClickEnsemble"]


class ClickEnsemble(nn.Module):
    """The mean of its members' probabilities, returned as logits (a drop-in for ``ADClick``).

    Click models trained on different synthetic anomaly mixes are good at different defects
    (MTD: bands along the image side make large regions better and small holes and cracks worse);
    averaging their probabilities keeps most of each one's strength at the cost of one more
    forward pass per click. ``config`` is the members' shared architecture."""

    def __init__(self, config: ADClickConfig, members: int):
        super().__init__()
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {members}")
        self.config = config
        self.members = nn.ModuleList(ADClick(config) for _ in range(members))

    def forward(
        self,
        residual: torch.Tensor,
        click_maps: torch.Tensor,
        fine: torch.Tensor | None = None,
        language: torch.Tensor | None = None,
    ) -> torch.Tensor:
        probs = torch.stack([torch.sigmoid(m(residual, click_maps, fine, language).float()) for m in self.members])
        return torch.logit(probs.mean(0), eps=1e-6)
