"""PWAM (pixel-word attention with a language gate) and attaching it to the residual Swin trunk."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adclick_core.models.language import PWAM, attach_language, language_blocks


def _pwam(dim: int = 16, text_dim: int = 12, heads: int = 2) -> PWAM:
    torch.manual_seed(0)
    return PWAM(dim, text_dim, num_heads=heads)


def test_shape_preserved_and_starts_as_identity():
    m = _pwam()
    x = torch.randn(2, 5, 6, 16)
    out = m(x, torch.randn(2, 1, 12))
    assert out.shape == x.shape
    assert torch.equal(out, x)  # gate's last layer is zero -> tanh(0) = 0


def test_gradients_reach_the_gate_and_then_change_the_output():
    m = _pwam()
    x = torch.randn(2, 4, 4, 16)
    ctx = torch.randn(2, 1, 12)
    m(x, ctx).pow(2).sum().backward()
    g = m.gate[2].weight.grad
    assert g is not None and g.abs().sum() > 0
    with torch.no_grad():
        m.gate[2].weight -= 0.1 * g
    assert not torch.allclose(m(x, ctx), x)


def _opened(dim=16, text_dim=12, heads=2) -> PWAM:
    """A PWAM whose gate is open, so the language actually changes the output."""
    m = _pwam(dim, text_dim, heads)
    nn.init.normal_(m.gate[2].weight, std=0.5)
    return m


def test_language_changes_output_per_sample_and_one_prompt_broadcasts():
    m = _opened()
    x = torch.randn(2, 4, 4, 16)
    c = torch.randn(2, 1, 12)
    out = m(x, c)
    assert not torch.allclose(out, m(x, torch.randn(2, 1, 12)))
    # B x Z and a single prompt for the whole batch are accepted
    assert torch.allclose(m(x, c[:, 0]), out, atol=1e-6)
    shared = m(x, c[:1])
    assert torch.allclose(shared[0], out[0], atol=1e-6)
    assert torch.allclose(shared[1], m(x[1:], c[:1])[0], atol=1e-6)


def test_three_words_with_padding_mask_equal_the_unpadded_words():
    m = _opened()
    x = torch.randn(2, 3, 5, 16)
    words = torch.randn(2, 3, 12)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    out = m(x, words, key_padding_mask=pad)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # sample 0 sees words 0-1 only, sample 1 word 0 only: the padded words must not matter
    ref0 = m(x[:1], words[:1, :2])
    ref1 = m(x[1:], words[1:, :1])
    assert torch.allclose(out[0], ref0[0], atol=1e-5)
    assert torch.allclose(out[1], ref1[0], atol=1e-5)
    # the (context, mask) tuple form - how the trunk passes one argument - gives the same
    assert torch.allclose(m(x, (words, pad)), out, atol=1e-6)
    # without the mask the third word does change sample 0
    assert not torch.allclose(m(x, words)[0], out[0], atol=1e-4)


def test_fully_padded_context_is_identity():
    m = _opened()
    x = torch.randn(1, 2, 2, 16)
    out = m(x, torch.randn(1, 2, 12), key_padding_mask=torch.ones(1, 2, dtype=torch.bool))
    assert torch.allclose(out, x)


def test_bad_head_count_rejected():
    with pytest.raises(ValueError):
        PWAM(10, 4, num_heads=3)


def test_attach_language_fills_trunk_slots_and_runs():
    from adclick_core.models.swin import ResidualSwinTrunk

    torch.manual_seed(0)
    trunk = ResidualSwinTrunk(dim=16, depth=4, num_heads=2, window_size=4, grid_size=8)
    attach_language(trunk, text_dim=12, after_blocks=[1, -1], num_heads=2)
    assert language_blocks(trunk) == [1, 3]
    assert isinstance(trunk.fusion[0], nn.Identity) and isinstance(trunk.fusion[2], nn.Identity)
    assert trunk.fusion[1].dim == 16 and trunk.fusion[1].text_dim == 12
    trunk.eval()
    x = torch.randn(2, 8, 8, 16)
    ctx = torch.randn(2, 1, 12)
    base = trunk(x)
    out = trunk(x, ctx)
    assert out.shape == x.shape
    assert torch.allclose(out, base, atol=1e-6)  # fresh PWAMs: identity
    for i in language_blocks(trunk):
        nn.init.normal_(trunk.fusion[i].gate[2].weight, std=0.5)
    assert not torch.allclose(trunk(x, ctx), base, atol=1e-4)
    with pytest.raises(ValueError):
        attach_language(trunk, 12, [4])
