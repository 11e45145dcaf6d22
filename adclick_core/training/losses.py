"""Losses and label construction: Normalized Focal Loss (RITM) with an ignore mask."""
from __future__ import annotations

import torch

__all__ = ["normalized_focal_loss", "soft_dice_loss"]


def normalized_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    gamma: float = 2.0,
    alpha: float = 0.5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """NFL: focal weights (1 - p_t)^gamma renormalised per image so they sum to the number of
    valid pixels (normaliser detached, as RITM does); ignored pixels (``valid == 0``) add nothing.

    logits, target, valid: B x 1 x H x W (target in {0, 1}). Returns the mean loss over the batch.
    """
    target = target.float()
    valid = torch.ones_like(target) if valid is None else valid.float()
    prob = torch.sigmoid(logits)
    p_t = torch.where(target > 0.5, prob, 1 - prob)
    alpha_t = torch.where(target > 0.5, alpha, 1 - alpha)
    beta = (1 - p_t) ** gamma * valid
    dims = tuple(range(1, logits.dim()))
    with torch.no_grad():
        scale = valid.sum(dims, keepdim=True) / (beta.sum(dims, keepdim=True) + eps)
    beta = beta * scale
    # log(p_t) from logits for numerical stability: log sigmoid(+-x)
    log_pt = torch.nn.functional.logsigmoid(torch.where(target > 0.5, logits, -logits))
    loss = -alpha_t * beta * log_pt
    per_image = loss.sum(dims) / (valid.sum(dims) + eps)
    return per_image.mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                   eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged. Insensitive to how small the defect is, so short
    trainings do not collapse to "all background" the way pixel losses do on tiny defects."""
    prob = torch.sigmoid(logits)
    target = target.float()
    if valid is not None:
        prob = prob * valid
        target = target * valid
    dims = tuple(range(1, logits.dim()))
    inter = (prob * target).sum(dims)
    union = prob.sum(dims) + target.sum(dims)
    return (1 - (2 * inter + eps) / (union + eps)).mean()
