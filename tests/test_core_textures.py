"""Procedural texture families: deterministic, varied within a family, distinct between families."""
from __future__ import annotations

import numpy as np
import pytest

from adclick_core.training.textures import TEXTURE_KINDS, TextureFamily, texture_families


def test_families_cycle_through_every_kind_and_are_reproducible():
    families = texture_families(2 * len(TEXTURE_KINDS), seed=3)
    assert [f.kind for f in families] == list(TEXTURE_KINDS) * 2
    assert families == texture_families(2 * len(TEXTURE_KINDS), seed=3)
    assert families != texture_families(2 * len(TEXTURE_KINDS), seed=4)


@pytest.mark.parametrize("family", texture_families(len(TEXTURE_KINDS), seed=0), ids=lambda f: f.kind)
def test_images_of_a_family_differ_but_look_alike(family):
    a, b = family.images(2, seed=1, size=64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, family.images(2, seed=1, size=64)[0])  # the seed fixes the images
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1  # two parts, not one image twice
    assert a.std() > 2  # a texture, not a flat grey
    # one look: the same mean level (exposure varies by 5 %) and about the same contrast
    assert abs(a.mean() - b.mean()) < 0.12 * max(a.mean(), b.mean()) + 2
    assert 0.5 < a.std() / b.std() < 2


def test_bad_kind_and_size_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown texture kind"):
        TextureFamily("plaid", texture_families(1)[0].params).image(rng, 32)
    with pytest.raises(ValueError, match="power of two"):
        texture_families(1)[0].image(rng, 48)
