"""The click prior: the training-free residual map cut by the clicks, on the residual grid.

On real defects the residual magnitude near the clicks is already a strong answer (the
``residual_map`` baseline in ``baselines.py``); a network trained only on synthetic anomalies
in a CPU budget does not rediscover it reliably. So the click model starts from this prior
(as logits) and learns a correction on top, instead of learning region growing from scratch.
This is the same formula as :func:`adclick_core.inference.baselines.residual_cut_probability`, computed
from click disks on the grid (differentiable w.r.t. nothing that is learnt, cheap: g x g).
"""
from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

__all__ = ["click_distances", "normalized_magnitude", "residual_cut_prior", "PRIOR_CHANNELS"]

# Channels :func:`residual_cut_prior` returns: normalized magnitude, positive proximity,
# negative keep factor, prior probability.
PRIOR_CHANNELS = 4
_FAR = 1e4  # distance (cells) used where a click kind is absent


@functools.lru_cache(maxsize=8)
def _cell_distances(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h*w) x (h*w) distances between cell centres: fixed for a grid, so computed once per
    grid and device instead of on every click."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    cells = torch.stack([yy.flatten(), xx.flatten()], 1)
    return torch.cdist(cells, cells)


def click_distances(click_maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B x >=2 x S x S click maps -> B x 2 x h x w distance (in cells) from every cell centre to
    the nearest cell touched by a positive / negative disk (``_FAR`` where there is none)."""
    h, w = grid
    touched = (F.adaptive_max_pool2d(click_maps[:, :2].float(), (h, w)) > 0).flatten(2)  # B x 2 x (h*w)
    d = _cell_distances(h, w, click_maps.device)
    out = torch.full(touched.shape, _FAR, dtype=d.dtype, device=d.device)
    # A click touches a handful of cells: gathering their rows of the cached (symmetric) table
    # costs O(h*w x touched) per map, where masking the whole (h*w)^2 table took ~50 ms a batch of 8 on one thread.
    for b, k in itertools.product(range(touched.shape[0]), range(2)):
        cells = touched[b, k].nonzero()[:, 0]
        if len(cells):
            out[b, k] = d[cells].amin(0)
    return out.view(-1, 2, h, w)


def normalized_magnitude(residual: torch.Tensor, quantile: float = 0.995) -> torch.Tensor:
    """B x C x h x w signed residual -> B x 1 x h x w ||r|| divided by its per-image 99.5th
    percentile and clipped to [0, 1], so a few hot cells do not flatten everything else."""
    mag = residual.float().norm(dim=1, keepdim=True)
    ref = torch.quantile(mag.flatten(1), quantile, dim=1).clamp_min(1e-6)
    return (mag / ref.view(-1, 1, 1, 1)).clamp(0, 1)


def residual_cut_prior(residual: torch.Tensor, click_maps: torch.Tensor, sigma_frac: float = 0.15) -> torch.Tensor:
    """B x 4 x h x w: normalized ||r||, exp(-d_pos^2 / 2s^2), 1 - exp(-d_neg^2 / 2(s/2)^2) and
    their product (the prior probability), with s = ``sigma_frac`` x the grid diagonal.
    Zero prior where there is no positive click."""
    h, w = residual.shape[-2:]
    norm = normalized_magnitude(residual)
    dist = click_distances(click_maps, (h, w))
    s = sigma_frac * float((h * h + w * w) ** 0.5)
    near_pos = torch.exp(-dist[:, :1] ** 2 / (2 * s * s))
    keep_neg = 1 - torch.exp(-dist[:, 1:2] ** 2 / (2 * (s / 2) ** 2))
    return torch.cat([norm, near_pos, keep_neg, norm * near_pos * keep_neg], 1)
