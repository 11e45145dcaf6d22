"""ADClick model (tiny config): shapes, click embedding learns, NFL by hand."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock

from adclick_core.inference.clicks import Click, encode_clicks
from adclick_core.training.losses import normalized_focal_loss
from adclick_core.models import ADClick, ADClickConfig
from adclick_core.models.embeddings import residual_features



def tiny(**kw) -> ADClickConfig:
    base = dict(in_channels=8, embed_dim=16, depth=2, num_heads=2, window_size=4, grid_size=8, input_size=64,
                fine_channels=4, head_channels=8, drop_path=0.0, prior=False)  # prior: test_core_prior.py
    base.update(kw)
    return ADClickConfig(**base)


def inputs(b: int = 2, seed: int = 0, clicks=None):
    g = torch.Generator().manual_seed(seed)
    res = torch.randn(b, 8, 8, 8, generator=g)
    fine = torch.randn(b, 4, 16, 16, generator=g)
    clicks = clicks if clicks is not None else [[Click(20, 30, True)], [Click(40, 10, False)]][:b]
    maps = encode_clicks(clicks, None, 64, 5.0)
    return res, maps, fine


# ---------------------------------------------------------------- shapes


def test_forward_shapes():
    torch.manual_seed(0)
    model = ADClick(tiny())
    res, maps, fine = inputs()
    out = model(res, maps, fine)
    assert out.shape == (2, 1, 16, 16)  # stride 4 of the 64-px input
    assert torch.isfinite(out).all()
    assert model.click_embed(maps).shape == (2, 8, 8, 16)
    assert model.residual_embed(residual_features(res)).shape == (2, 8, 8, 16)


@pytest.mark.parametrize("kind, factor", [("square", 1), ("abs", 1), ("abs_square", 2)])
def test_residual_input_kinds(kind, factor):
    torch.manual_seed(0)
    model = ADClick(tiny(residual_input=kind))
    assert model.residual_embed.proj.in_channels == 8 * factor
    res, maps, fine = inputs()
    assert model(res, maps, fine).shape == (2, 1, 16, 16)
    x = residual_features(res, kind)
    assert x.shape[1] == 8 * factor and (x >= 0).all()
    with pytest.raises(ValueError):
        residual_features(res, "cube")


def test_forward_without_fine_features_when_disabled():
    torch.manual_seed(0)
    model = ADClick(tiny(fine_channels=0))
    res, maps, _ = inputs()
    assert model(res, maps, None).shape == (2, 1, 16, 16)


def test_other_grid_size_at_inference():
    # Swin with dynamic masks: a larger image (12x12 tokens) than the training grid (8x8) works.
    torch.manual_seed(0)
    model = ADClick(tiny()).eval()
    res = torch.randn(1, 8, 12, 12)
    maps = encode_clicks([[Click(50, 50)]], None, 96, 5.0)
    out = model(res, maps, torch.randn(1, 4, 24, 24))
    assert out.shape == (1, 1, 24, 24)


def test_fused_window_attention_matches_timm_reference_path():
    # The trunk switches timm's Swin blocks to scaled_dot_product_attention (speed); the answer and
    # its gradients must be those of timm's explicit softmax path, shifted (masked) windows included.
    torch.manual_seed(0)
    model = ADClick(tiny(depth=2)).eval()
    attns = [b.attn for b in model.trunk.blocks]
    assert all(a.fused_attn for a in attns) and model.trunk.blocks[1].shift_size == (2, 2)
    res, maps, fine = inputs()
    res.requires_grad_(True)
    fused = model(res, maps, fine)
    (g_fused,) = torch.autograd.grad(fused.square().sum(), res)
    for a in attns:
        a.fused_attn = False
    plain = model(res, maps, fine)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), res)
    assert fused.abs().max() > 0.1  # a real answer, not zeros on both sides
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-5)


def test_config_round_trip():
    cfg = tiny()
    assert ADClickConfig.from_dict(cfg.to_dict() | {"not_a_field": 3}) == cfg


def test_residual_scale_is_used():
    torch.manual_seed(0)
    model = ADClick(tiny()).eval()
    res, maps, fine = inputs()
    a = model(res, maps, fine)
    model.residual_embed.input_scale.fill_(100.0)
    b = model(res, maps, fine)
    assert not torch.allclose(a, b)
    assert "residual_embed.input_scale" in model.state_dict()  # saved with the checkpoint


# ---------------------------------------------------------------- click embedding


def test_click_embedding_starts_at_zero_and_gets_gradient():
    torch.manual_seed(0)
    model = ADClick(tiny())
    res, maps, fine = inputs()
    last = model.click_embed.net[-1]
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0
    assert torch.count_nonzero(model.click_embed(maps)) == 0  # "no click information" at init
    target = torch.zeros(2, 1, 16, 16)
    target[0, :, 5:10, 3:8] = 1
    loss = normalized_focal_loss(model(res, maps, fine), target)
    loss.backward()
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert last.bias.grad.abs().sum() > 0


def test_clicks_steer_the_output_after_training_steps():
    """Toy task: the defect is wherever the positive click is; only the clicks tell where.

    Optimised with plain BCE: the NFL value is not monotone in quality (its weights move to the
    hardest pixels as the easy ones are learnt), so it makes a poor progress signal for a test."""
    torch.manual_seed(0)
    model = ADClick(tiny())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    res = torch.randn(4, 8, 8, 8, generator=g) * 0.1
    fine = torch.zeros(4, 4, 16, 16)
    centres = [(16, 16), (48, 16), (16, 48), (48, 48)]
    clicks = [[Click(float(x), float(y))] for x, y in centres]
    maps = encode_clicks(clicks, None, 64, 5.0)
    target = torch.zeros(4, 1, 16, 16)
    for i, (x, y) in enumerate(centres):
        target[i, 0, y // 4 - 3 : y // 4 + 3, x // 4 - 3 : x // 4 + 3] = 1
    empty = encode_clicks([[]] * 4, None, 64, 5.0)
    assert torch.equal(model.click_embed(maps), model.click_embed(empty))  # zero-init: blind to clicks
    losses = []
    for _ in range(40):
        loss = F.binary_cross_entropy_with_logits(model(res, maps, fine), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    # The click embedding now carries the clicks into the trunk.
    diff = (model.click_embed(maps) - model.click_embed(empty)).abs().mean()
    assert diff > 1e-3
    # Moving the click moves the prediction.
    with torch.no_grad():
        out = torch.sigmoid(model(res[:1], maps[:1], fine[:1]))[0, 0]
        moved = torch.sigmoid(model(res[:1], encode_clicks([[Click(48.0, 48.0)]], None, 64, 5.0), fine[:1]))[0, 0]
    assert out[1:7, 1:7].mean() > 0.5 > out[9:15, 9:15].mean()
    assert moved[9:15, 9:15].mean() > 0.5 > moved[1:7, 1:7].mean()


# ---------------------------------------------------------------- Normalized Focal Loss


def _bce(p: float) -> float:
    return -math.log(p)


def test_nfl_perfect_prediction_is_zero():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:6] = 1
    logits = (target * 2 - 1) * 30
    loss = normalized_focal_loss(logits, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)


def test_nfl_uniform_prediction_equals_weighted_bce():
    # Equal focal weights everywhere normalise to 1: NFL = alpha * BCE.
    target = torch.ones(1, 1, 4, 4)
    loss = normalized_focal_loss(torch.zeros(1, 1, 4, 4), target, alpha=0.5)
    assert loss.item() == pytest.approx(0.5 * math.log(2), rel=1e-5)
    loss = normalized_focal_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), alpha=0.25)
    assert loss.item() == pytest.approx(0.75 * math.log(2), rel=1e-5)


def test_nfl_two_pixels_by_hand():
    # One hard pixel (p_t = 0.1), one easy (p_t = 0.9), gamma 2, alpha 0.5.
    p_hard, p_easy = 0.1, 0.9
    logits = torch.tensor([math.log(p_hard / (1 - p_hard)), math.log(p_easy / (1 - p_easy))]).view(1, 1, 1, 2)
    target = torch.ones(1, 1, 1, 2)
    w_hard, w_easy = (1 - p_hard) ** 2, (1 - p_easy) ** 2
    norm = 2 / (w_hard + w_easy)
    want = 0.5 * (norm * w_hard * _bce(p_hard) + norm * w_easy * _bce(p_easy)) / 2
    assert normalized_focal_loss(logits, target).item() == pytest.approx(want, rel=1e-5)


def test_nfl_ignored_pixels_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    valid = torch.ones(2, 1, 8, 8)
    valid[:, :, :3] = 0
    base = normalized_focal_loss(logits, target, valid)
    changed = logits.clone()
    changed[:, :, :3] = torch.randn(2, 1, 3, 8, generator=g) * 20
    changed_target = target.clone()
    changed_target[:, :, :3] = 1 - changed_target[:, :, :3]
    assert normalized_focal_loss(changed, changed_target, valid).item() == pytest.approx(base.item(), rel=1e-6)
    # ... and it equals the loss of the valid part alone.
    alone = normalized_focal_loss(logits[:, :, 3:], target[:, :, 3:])
    assert base.item() == pytest.approx(alone.item(), rel=1e-5)
    # No gradient reaches ignored pixels.
    x = logits.clone().requires_grad_(True)
    normalized_focal_loss(x, target, valid).backward()
    assert torch.count_nonzero(x.grad[:, :, :3]) == 0
    assert torch.count_nonzero(x.grad[:, :, 3:]) > 0
    # Changing a valid pixel does change the loss.
    changed = logits.clone()
    changed[:, :, 5] += 3
    assert normalized_focal_loss(changed, target, valid).item() != pytest.approx(base.item(), rel=1e-4)


def test_nfl_all_ignored_is_zero_and_finite():
    loss = normalized_focal_loss(torch.randn(1, 1, 4, 4), torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_nfl_confident_wrong_worse_than_uncertain():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    wrong = (1 - 2 * target) * 5  # confidently inverted
    uncertain = torch.zeros_like(target)
    slightly_right = (2 * target - 1) * 1
    l_wrong = normalized_focal_loss(wrong, target).item()
    l_unc = normalized_focal_loss(uncertain, target).item()
    l_right = normalized_focal_loss(slightly_right, target).item()
    assert l_wrong > 3 * l_unc
    assert l_unc > l_right


def test_nfl_batch_mean_of_images():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 6, 6, generator=g)
    target = (torch.rand(2, 1, 6, 6, generator=g) > 0.7).float()
    both = normalized_focal_loss(logits, target).item()
    each = [normalized_focal_loss(logits[i : i + 1], target[i : i + 1]).item() for i in range(2)]
    assert both == pytest.approx(sum(each) / 2, rel=1e-6)


def test_cached_shift_mask_is_timms_mask_for_every_grid():
    # The trunk builds each shifted block's attention mask once per grid shape; the answer on a
    # grid seen before and on a new one must be what timm's per-forward mask gives.
    torch.manual_seed(0)
    model = ADClick(tiny(depth=2)).eval()
    block = model.trunk.blocks[1]
    for g in (8, 12, 8):
        x = torch.randn(1, g, g, block.norm1.normalized_shape[0])
        cached = block.get_attn_mask(x)
        fresh = SwinTransformerBlock.get_attn_mask(block, x)
        assert cached is not None and torch.equal(cached, fresh)
    assert len(block._mask_cache) == 2
    res = torch.randn(1, 8, 12, 12)
    maps = encode_clicks([[Click(50, 50)]], None, 96, 5.0)
    fine = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        cached_out = model(res, maps, fine)
        for b in model.trunk.blocks:
            b._mask_cache.clear()
            b.get_attn_mask = functools.partial(SwinTransformerBlock.get_attn_mask, b)
        plain_out = model(res, maps, fine)
    torch.testing.assert_close(cached_out, plain_out)
