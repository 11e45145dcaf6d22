"""Location-aware residuals: window matching vs brute force, soft matching, retrieval, anomaly map."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adclick_core.features.backbone import BackboneConfig, build_extractor
from adclick_core.utils.errors import EmptyBankError
from adclick_core.features.reference import ReferenceBank
from adclick_core.features.residuals import (
    ResidualConfig,
    _match_soft,
    _match_window,
    _window_offsets,
    compute_residuals,
    match_residuals,
    positional_embedding,
    retrieve_neighbours,
    similar_bank_images,
)
from tests.images import reshot



def texture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, 2)
    v = 128 + 50 * np.sin(xx / 3 + ph[0]) * np.cos(yy / 4 + ph[1]) + rng.normal(0, 8, (size, size))
    return np.repeat(v.clip(0, 255).astype(np.uint8)[..., None], 3, -1)


def brute_force_window(query: np.ndarray, refs: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """For every query cell the nearest reference vector among cells within ``radius`` (all K images)."""
    k, c, h, w = refs.shape
    best = np.zeros((c, h, w), refs.dtype)
    best_d = np.full((h, w), np.inf)
    for i in range(h):
        for j in range(w):
            for y in range(h):
                for x in range(w):
                    if (y - i) ** 2 + (x - j) ** 2 > radius * radius:
                        continue
                    for kk in range(k):
                        d = float(((refs[kk, :, y, x].astype(np.float64) - query[:, i, j]) ** 2).sum())
                        if d < best_d[i, j]:
                            best_d[i, j] = d
                            best[:, i, j] = refs[kk, :, y, x]
    return best, best_d


# ---------------------------------------------------------------- hard window matching


def test_window_offsets():
    assert sorted(_window_offsets(1.0)) == sorted([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)])
    assert len(_window_offsets(1.5)) == 9  # 3x3 (diagonal sqrt 2 <= 1.5)
    offs = _window_offsets(2.0)
    assert (2, 0) in offs and (2, 1) not in offs and (1, 1) in offs
    assert len(offs) == 13
    assert len(_window_offsets(3.2)) == sum(1 for y in range(-3, 4) for x in range(-3, 4) if x * x + y * y <= 3.2**2)


@pytest.mark.parametrize("radius", [1.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_match_window_equals_brute_force(radius, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(5, 6, 6, generator=g, dtype=dtype)
    refs = torch.randn(3, 5, 6, 6, generator=g, dtype=dtype)
    best, dist = _match_window(query, refs, radius)
    want, want_d = brute_force_window(query.numpy(), refs.numpy(), radius)
    assert best.shape == (5, 6, 6) and dist.shape == (6, 6)
    # The chosen reference vectors are copies: residuals are bit-identical to the brute force ones.
    np.testing.assert_array_equal((best - query).numpy(), want - query.numpy())
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-4, atol=1e-4)
    cfg = ResidualConfig(matching="window", radius=radius)
    np.testing.assert_array_equal(match_residuals(query, refs, cfg).numpy(), want - query.numpy())


@pytest.mark.parametrize(
    "radius, offset, inside",
    [(1.5, (0, 1), True), (1.5, (1, 1), True), (1.5, (2, 0), False), (1.5, (0, 3), False),
     (2.0, (2, 0), True), (2.0, (1, 1), True), (2.0, (2, 1), False), (2.0, (0, 3), False)],
)
def test_window_really_restricts_matches(radius, offset, inside):
    g = torch.Generator().manual_seed(3)
    refs = torch.randn(3, 5, 6, 6, generator=g)
    query = torch.randn(5, 6, 6, generator=g)
    target = torch.full((5,), 10.0)  # far from every random reference vector
    qi, qj = 2, 2
    query[:, qi, qj] = target
    refs[1, :, qi + offset[0], qj + offset[1]] = target
    residual = match_residuals(query, refs, ResidualConfig(matching="window", radius=radius))
    r = residual[:, qi, qj]
    if inside:
        assert torch.count_nonzero(r) == 0
    else:
        assert r.norm() > 5.0  # the exact copy is out of reach: matched to some random vector


def test_window_matches_only_the_same_position_with_small_radius():
    # radius < 1: only the same cell is a candidate, so the residual is the plain difference to the best K.
    g = torch.Generator().manual_seed(4)
    refs = torch.randn(2, 5, 6, 6, generator=g)
    query = torch.randn(5, 6, 6, generator=g)
    best, _ = _match_window(query, refs, 0.5)
    d = ((refs - query[None]) ** 2).sum(1)  # K x h x w
    idx = d.argmin(0)
    want = torch.gather(refs, 0, idx[None, None].expand(1, 5, 6, 6))[0]
    assert torch.equal(best, want)


# ---------------------------------------------------------------- soft matching


def test_soft_matching_picks_exact_match():
    g = torch.Generator().manual_seed(5)
    query = torch.randn(8, 6, 6, generator=g)
    refs = torch.randn(3, 8, 6, 6, generator=g)
    refs[2] = query
    residual = match_residuals(query, refs, ResidualConfig(matching="soft", pos_weight=0.03))
    assert torch.count_nonzero(residual) == 0
    # Without the exact copy the residual is not zero, and is a real reference vector minus the query.
    best, dist = _match_soft(query, refs[:2], 0.03)
    assert (dist > 0).all()
    flat = refs[:2].permute(0, 2, 3, 1).reshape(-1, 8)
    for i, j in [(0, 0), (3, 4), (5, 5)]:
        assert (flat == best[:, i, j]).all(1).any()


def test_soft_matching_prefers_the_same_position():
    # An exact copy far away and a near-copy at the same position: the position embedding picks the
    # near-copy, plain nearest-neighbour matching (pos_weight 0) the far exact copy.
    g = torch.Generator().manual_seed(6)
    query = torch.randn(8, 6, 6, generator=g)
    refs = torch.randn(1, 8, 6, 6, generator=g) * 3
    v = torch.randn(8, generator=g)
    query[:, 1, 1] = v
    refs[0, :, 1, 1] = v + 0.05
    refs[0, :, 5, 4] = v
    best, _ = _match_soft(query, refs, pos_weight=0.5)
    torch.testing.assert_close(best[:, 1, 1], v + 0.05)
    best, _ = _match_soft(query, refs, pos_weight=0.0)
    torch.testing.assert_close(best[:, 1, 1], v)


def test_unknown_matching():
    with pytest.raises(ValueError, match="unknown matching"):
        match_residuals(torch.zeros(2, 3, 3), torch.zeros(1, 2, 3, 3), ResidualConfig(matching="nearest"))


# ---------------------------------------------------------------- positional embedding


@pytest.mark.parametrize("channels, h, w", [(16, 6, 6), (7, 4, 9), (3, 5, 5), (256, 8, 8)])
def test_positional_embedding_shape_range(channels, h, w):
    emb = positional_embedding(channels, h, w)
    assert emb.shape == (channels, h, w)
    assert emb.dtype == torch.float32
    assert emb.min() >= -1.0 and emb.max() <= 1.0
    assert torch.isfinite(emb).all()


def test_positional_embedding_distinguishes_positions():
    emb = positional_embedding(16, 6, 6)
    flat = emb.reshape(16, -1).T
    d = torch.cdist(flat, flat)
    assert (d + torch.eye(36) * 10).min() > 1e-3  # every position has its own code
    # The first quarter encodes the row only, the third the column only.
    assert torch.allclose(emb[:4, :, 0:1].expand(-1, -1, 6), emb[:4])
    assert torch.allclose(emb[8:12, 0:1, :].expand(-1, 6, -1), emb[8:12])
    torch.testing.assert_close(emb[0, 2, 0], torch.tensor(math.sin(2.0)))


# ---------------------------------------------------------------- retrieval and full residuals


@pytest.fixture(scope="module")
def local_extractor():
    # Early stages only: at 64 px a random-init stage 4 sees the whole image; stages 1-2 stay local.
    torch.manual_seed(0)
    return build_extractor(BackboneConfig(input_size=64, stages=(1, 2), feature_dim=None), random_init=True,
                           device="cpu")


@pytest.fixture(scope="module")
def tex_bank(local_extractor):
    return ReferenceBank.build(local_extractor, [texture(i) for i in range(5)], progress=False)


def test_retrieve_neighbours_identical_first_and_exclude(local_extractor, tex_bank):
    cfg = ResidualConfig(k=3)
    for i in (0, 3):
        desc = tex_bank.descriptors[i : i + 1]
        nb = retrieve_neighbours(tex_bank, desc, cfg)
        assert nb.shape == (1, 3)
        assert nb[0, 0].item() == i
        assert len(set(nb[0].tolist())) == 3
        nb = retrieve_neighbours(tex_bank, desc, cfg, exclude=[[i]])
        assert i not in nb[0].tolist()
        assert nb.shape == (1, 3)
    # Batch with different exclusions; K is clipped to what is left.
    desc = tex_bank.descriptors[[1, 2]]
    nb = retrieve_neighbours(tex_bank, desc, ResidualConfig(k=10), exclude=[[1], [2, 0]])
    assert nb.shape[1] == 3  # 5 images, at most 2 excluded
    assert 1 not in nb[0].tolist()
    assert 2 not in nb[1].tolist() and 0 not in nb[1].tolist()
    with pytest.raises(ValueError, match="no reference image left"):
        retrieve_neighbours(tex_bank, desc[:1], cfg, exclude=[[0, 1, 2, 3, 4]])


def test_retrieve_neighbours_empty_bank(local_extractor):
    empty = ReferenceBank(local_extractor.config)
    with pytest.raises(EmptyBankError):
        retrieve_neighbours(empty, torch.zeros(1, 24, 8, 8), ResidualConfig())


@pytest.mark.parametrize("matching", ["window", "soft"])
def test_compute_residuals_defect_stands_out(local_extractor, tex_bank, matching):
    query = texture(0).copy()
    query[8:24, 36:52] = 255  # bright square: grid cells rows 1-2, cols 4-6 at stride 8
    feats = local_extractor(local_extractor.preprocess([query]))
    cfg = ResidualConfig(k=3, radius=2.0, matching=matching)
    res = compute_residuals(feats.grid, feats.descriptor, tex_bank, cfg)
    assert res.residual.shape == (1, local_extractor.feature_dim, 8, 8)
    assert res.distance.shape == (1, 8, 8)
    assert res.neighbours.shape == (1, 3)
    assert res.neighbours[0, 0].item() == 0  # the bank image the query was made from
    torch.testing.assert_close(res.distance, torch.linalg.vector_norm(res.residual, dim=1))
    d = res.distance[0]
    defect = torch.zeros(8, 8, dtype=torch.bool)
    defect[1:3, 4:7] = True
    near = torch.zeros(8, 8, dtype=torch.bool)
    near[0:4, 3:8] = True
    far = ~near
    assert d[defect].mean() > 4 * d[far].mean()
    assert d[defect].min() > d[far].max()
    iy, ix = divmod(int(d.argmax()), 8)
    assert near[iy, ix]
    # Excluding the source image still leaves the defect the most anomalous region.
    res_ex = compute_residuals(feats.grid, feats.descriptor, tex_bank, cfg, exclude=[[0]])
    assert 0 not in res_ex.neighbours[0].tolist()
    d = res_ex.distance[0]
    assert d[defect].mean() > 1.5 * d[far].mean()


def test_compute_residuals_of_a_bank_image_is_zero(local_extractor, tex_bank):
    feats = local_extractor(local_extractor.preprocess([texture(2)]))
    res = compute_residuals(feats.grid, feats.descriptor, tex_bank, ResidualConfig(k=2, radius=1.5))
    assert res.neighbours[0, 0].item() == 2
    # Bank features are float16: the residual is the rounding error only.
    assert res.distance.max() < 1e-2 * tex_bank.features.float().norm(dim=1).mean()


def test_similar_bank_images_finds_the_reshot_copy(local_extractor):
    # five textures plus a re-shot copy of texture 3 at index 5
    bank = ReferenceBank.build(local_extractor, [texture(i) for i in range(5)] + [reshot(texture(3))], progress=False)
    cfg = ResidualConfig(k=3)
    found = similar_bank_images(bank, [3, 5, 0], 2, cfg, chunk=2)  # chunks of 2: the split is seamless
    assert [row[0] for row in found] == [3, 5, 0]  # each image first, then the most similar others
    assert found[0][1] == 5 and found[1][1] == 3
    assert all(len(row) == 3 and len(set(row)) == 3 for row in found)
    assert similar_bank_images(bank, [1, 2], 0, cfg) == [[1], [2]]
    assert [len(r) for r in similar_bank_images(bank, [1], 50, cfg)] == [5]  # one image always stays to match
