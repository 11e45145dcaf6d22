"""The click prior (models/prior.py): distances by hand, agreement with the residual-cut baseline,
and an untrained prior model answering exactly the prior."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from adclick_core.inference.baselines import residual_cut_probability
from adclick_core.inference.clicks import Click, encode_clicks
from adclick_core.models import ADClick, ADClickConfig
from adclick_core.models.prior import click_distances, normalized_magnitude, residual_cut_prior
from tests.test_core_models import tiny


def test_click_distances_by_hand():
    # 64-px input, 8 x 8 grid: a 1-px click disk at pixel (x=28, y=20) touches cell (row 2, col 3).
    maps = encode_clicks([[Click(28, 20, True)]], None, 64, 0.4)
    d = click_distances(maps, (8, 8))
    assert d.shape == (1, 2, 8, 8)
    assert d[0, 0, 2, 3] == 0
    assert torch.isclose(d[0, 0, 2, 7], torch.tensor(4.0))
    assert torch.isclose(d[0, 0, 6, 6], torch.tensor(5.0))  # 3-4-5 triangle
    assert (d[0, 1] > 1000).all()  # no negative click


def test_click_distances_match_brute_force_over_a_batch():
    # Several clicks per map, maps with no click of a kind, and one image with no click at all:
    # every cell's distance is the minimum over all touched cells, computed here the slow way.
    rng = np.random.default_rng(3)
    clicks = [[Click(int(x), int(y), bool(p)) for x, y, p in zip(rng.integers(0, 64, n), rng.integers(0, 64, n),
                                                                 rng.random(n) < 0.6)] for n in (0, 1, 3, 6)]
    maps = encode_clicks(clicks, None, 64, 3.0)
    d = click_distances(maps, (8, 8))
    touched = F.adaptive_max_pool2d(maps[:, :2], (8, 8)) > 0
    cells = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).view(-1, 2)
    for b in range(len(clicks)):
        for k in range(2):
            hit = cells[touched[b, k].flatten()]
            want = torch.cdist(cells, hit).amin(1) if len(hit) else torch.full((64,), 1e4)
            torch.testing.assert_close(d[b, k].flatten(), want)
    assert (d[0] == 1e4).all()  # the image without clicks


def test_normalized_magnitude_is_scale_invariant_and_clipped():
    g = torch.Generator().manual_seed(0)
    res = torch.randn(2, 5, 8, 8, generator=g)
    a, b = normalized_magnitude(res), normalized_magnitude(res * 7.0)
    assert torch.allclose(a, b, atol=1e-6)
    assert a.min() >= 0 and a.max() == 1.0
    assert torch.isclose(a[0, 0].flatten().sort().values[-1], torch.tensor(1.0))


def test_prior_matches_the_residual_cut_baseline_away_from_forced_disks():
    g = 16
    gen = torch.Generator().manual_seed(1)
    res = torch.randn(1, 6, g, g, generator=gen)
    res[:, :, 3:7, 4:9] *= 4  # a "defect"
    clicks = [Click(5, 4, True), Click(12, 12, False)]  # at cell centres of a g-pixel image
    # Click maps on a g-pixel "input" so one pixel = one cell; tiny disks touch one cell each.
    maps = encode_clicks([clicks], None, g, 0.4)
    prior = residual_cut_prior(res, maps)[0, 3].numpy()
    amap = res[0].norm(dim=0).numpy()
    base = residual_cut_probability(amap, clicks)
    yy, xx = np.mgrid[0:g, 0:g]
    far = np.ones((g, g), bool)
    for c in clicks:
        far &= (yy - c.y) ** 2 + (xx - c.x) ** 2 > 6 ** 2  # outside the baseline's forced disks
    assert far.sum() > 50
    np.testing.assert_allclose(prior[far], base[far], atol=1e-4)


def test_prior_is_zero_without_positive_click():
    res = torch.randn(1, 4, 8, 8)
    maps = encode_clicks([[Click(10, 10, False)]], None, 64, 5.0)
    assert residual_cut_prior(res, maps)[0, 3].abs().max() == 0


def test_untrained_prior_model_answers_the_prior():
    torch.manual_seed(0)
    model = ADClick(tiny(prior=True)).eval()
    res = torch.randn(1, 8, 8, 8)
    res[:, :, 2:5, 2:5] *= 5
    maps = encode_clicks([[Click(24, 24, True)]], None, 64, 5.0)
    with torch.no_grad():
        prob = torch.sigmoid(model(res, maps, torch.randn(1, 4, 16, 16)))
    expected = F.interpolate(residual_cut_prior(res, maps)[:, 3:], size=(16, 16), mode="bilinear",
                             align_corners=False).clamp(1e-3, 1 - 1e-3)
    assert torch.allclose(prob, expected, atol=1e-5)
    # ...and the correction is trainable: every head parameter gets a gradient.
    model.train()
    model(res, maps, torch.randn(1, 4, 16, 16)).sum().backward()
    assert model.refine_head.refine[-1].weight.grad.abs().sum() > 0
    assert model.prior_scale.grad is not None


def test_untrained_token_model_ranks_cells_by_residual_magnitude():
    torch.manual_seed(0)
    model = ADClick(tiny(prior=True, head="token")).eval()
    assert model.use_map_prior and not model.use_prior
    torch.nn.init.zeros_(model.token_head.proj.weight)  # the learnt correction, switched off
    torch.nn.init.zeros_(model.token_head.proj.bias)
    res = torch.randn(2, 8, 8, 8)
    res[0, :, 2:5, 2:5] *= 5
    maps = encode_clicks([[], []], None, 64, 5.0)
    with torch.no_grad():
        logits = model(res, maps)
    mag = (res * res).mean(1, keepdim=True)
    # Same order as the magnitude map, across both images (what pixel AP sees).
    order_logits = logits.flatten().argsort()
    assert torch.equal(order_logits, mag.flatten().argsort())
    assert logits[0, 0, 3, 3] > 0 > logits.median()


def test_old_checkpoints_load_without_the_prior():
    cfg = tiny().to_dict()
    cfg.pop("prior")
    assert ADClickConfig.from_dict(cfg).prior is False
    assert ADClickConfig.from_dict(tiny(prior=True).to_dict()).prior is True
