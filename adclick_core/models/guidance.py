"""Click guidance: how much each position resembles what the clicks marked.

A click says "this is (not) the defect". Cosine similarity between every position's features and
the mean feature under the positive (negative) click discs turns that into dense maps the network
can use from its first iterations, instead of having to learn region growing from click disks
alone - which needs far more training than a CPU budget allows. Computed on the residual
(what differs from the references) and on the stage-1 image features (what it looks like).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["click_similarity", "residual_magnitude"]


def click_similarity(features: torch.Tensor, click_maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """features B x C x h x w, click_maps B x >=2 x S x S (positive, negative disks, ...)
    -> B x 2 x h x w cosine similarity to the positive / negative click prototype (0 where no click)."""
    h, w = features.shape[-2:]
    disks = F.adaptive_avg_pool2d(click_maps[:, :2], (h, w))  # B x 2 x h x w, fraction of cell clicked
    f = F.normalize(features - features.mean(dim=(2, 3), keepdim=True), dim=1, eps=eps)
    weight = disks.sum(dim=(2, 3))  # B x 2
    proto = torch.einsum("bchw,bkhw->bkc", f, disks) / weight.clamp_min(eps)[..., None]
    sim = torch.einsum("bchw,bkc->bkhw", f, F.normalize(proto, dim=-1, eps=eps))
    return sim * (weight > eps).float()[..., None, None]


def residual_magnitude(x: torch.Tensor) -> torch.Tensor:
    """B x C x h x w network input (already scaled) -> B x 1 x h x w mean magnitude, log-compressed."""
    return torch.log1p(x.mean(dim=1, keepdim=True))
