"""ReferenceBank: build / add / dedup, safetensors persistence, error cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adclick_core.features.backbone import BackboneConfig, build_extractor
from adclick_core.utils.errors import CheckpointError, EmptyBankError
from adclick_core.features.reference import BANK_FORMAT_VERSION, ReferenceBank, image_fingerprint



@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return build_extractor(BackboneConfig(input_size=64), random_init=True, device="cpu")


def texture(seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, 2)
    v = 128 + 50 * np.sin(xx / 3 + ph[0]) * np.cos(yy / 4 + ph[1]) + rng.normal(0, 8, (size, size))
    rgb = np.stack([v, v * 0.9, v * 1.1], -1)
    return rgb.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def bank(extractor):
    return ReferenceBank.build(extractor, [texture(i) for i in range(4)], names=list("abcd"), progress=False)


def test_build_len_shapes_names(bank, extractor):
    assert len(bank) == 4
    assert bank.features.shape == (4, 256, 8, 8)
    assert bank.features.dtype == torch.float16
    assert bank.descriptors.shape == (4, 24, 8, 8)
    assert bank.names == ["a", "b", "c", "d"]
    assert len(set(bank.hashes)) == 4
    assert bank.hashes[0] == image_fingerprint(texture(0))
    assert bank.backbone == extractor.config
    kept = sum(src.nbytes for src in bank.sources)
    assert bank.nbytes() == 4 * 256 * 64 * 2 + 4 * 24 * 64 * 4 + kept
    # The stored features are the extractor's features of those images.
    want = extractor(extractor.preprocess([texture(2)])).grid.half()
    torch.testing.assert_close(bank.features[2:3], want)


def test_build_batches_give_same_features(extractor, bank):
    small = ReferenceBank.build(extractor, [texture(i) for i in range(4)], progress=False, batch_size=3)
    torch.testing.assert_close(small.features.float(), bank.features.float(), rtol=1e-3, atol=1e-3)
    assert small.hashes == bank.hashes
    assert small.fingerprint == bank.fingerprint  # names do not enter the fingerprint, contents do


def test_duplicates_skipped_by_content(extractor, tmp_path):
    img = texture(7)
    path = tmp_path / "same.png"
    Image.fromarray(img).save(path)
    b = ReferenceBank.build(extractor, [img, img.copy(), path, texture(8)], names=["x", "y", "z", "w"], progress=False)
    assert len(b) == 2  # the array, its copy and its PNG decode are one picture
    assert b.names == ["x", "w"]
    # Names default to str() of paths.
    c = ReferenceBank.build(extractor, [path], progress=False)
    assert c.names == [str(path)]


def test_add_incremental(extractor, bank):
    b = ReferenceBank.build(extractor, [texture(0), texture(1)], names=["a", "b"], progress=False)
    fp_before = b.fingerprint
    assert b.add(extractor, [texture(1), texture(2)], names=["b2", "c"]) == 1  # texture(1) known
    assert len(b) == 3 and b.names == ["a", "b", "c"]
    assert b.fingerprint != fp_before
    assert b.add(extractor, [texture(0)]) == 0
    assert len(b) == 3
    assert b.add(extractor, [texture(3)], names=["d"]) == 1
    # Incremental build equals the one-shot build.
    assert b.hashes == bank.hashes
    assert b.fingerprint == bank.fingerprint
    torch.testing.assert_close(b.features.float(), bank.features.float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.descriptors, bank.descriptors, rtol=1e-4, atol=1e-4)


def test_positions_by_file_name(bank):
    from pathlib import Path

    assert bank.positions([Path("/x/c"), "d", "/y/b", Path("e"), texture(0)]) == [2, 3, 1, -1, -1]


def test_subset(bank):
    s = bank.subset([3, 1])
    assert len(s) == 2 and s.names == ["d", "b"]
    assert torch.equal(s.features[0], bank.features[3])
    assert s.hashes == [bank.hashes[3], bank.hashes[1]]


def test_save_load_round_trip(bank, tmp_path):
    path = bank.save(tmp_path / "sub" / "bank.safetensors")
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    loaded = ReferenceBank.load(path)
    assert len(loaded) == len(bank)
    assert torch.equal(loaded.features, bank.features)
    assert loaded.features.dtype == torch.float16
    assert torch.equal(loaded.descriptors, bank.descriptors)
    assert loaded.names == bank.names
    assert loaded.hashes == bank.hashes
    assert loaded.backbone == bank.backbone
    assert loaded.fingerprint == bank.fingerprint
    assert loaded.device == torch.device("cpu")
    # Overwriting in place works (atomic replace) and reflects the new contents.
    bank.subset([0]).save(path)
    assert len(ReferenceBank.load(path)) == 1


def test_load_missing_corrupt_or_foreign(tmp_path, bank):
    with pytest.raises(CheckpointError, match="does not exist"):
        ReferenceBank.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="unreadable"):
        ReferenceBank.load(garbage)
    good = bank.save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        ReferenceBank.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an ADClick reference bank"):
        ReferenceBank.load(foreign)
    wrong_format = tmp_path / "other.safetensors"
    save_file({"features": torch.zeros(1, 2, 2, 2)}, str(wrong_format), metadata={"format": "something-else"})
    with pytest.raises(CheckpointError, match="not an ADClick reference bank"):
        ReferenceBank.load(wrong_format)


def test_load_newer_format_rejected(tmp_path, bank):
    newer = tmp_path / "newer.safetensors"
    meta = {"format": "adclick-reference-bank", "format_version": str(BANK_FORMAT_VERSION + 1),
            "backbone": json.dumps(bank.backbone.to_dict()), "names": "[]", "hashes": "[]"}
    save_file({"features": bank.features.contiguous(), "descriptors": bank.descriptors.contiguous()}, str(newer),
              metadata=meta)
    with pytest.raises(CheckpointError, match="newer version"):
        ReferenceBank.load(newer)


def test_empty_bank(tmp_path):
    empty = ReferenceBank(BackboneConfig(input_size=64))
    assert len(empty) == 0
    assert empty.nbytes() == 0
    with pytest.raises(EmptyBankError, match="no defect-free image"):
        empty.require_nonempty()
    with pytest.raises(EmptyBankError):
        empty.save(tmp_path / "empty.safetensors")
    assert not (tmp_path / "empty.safetensors").exists()


def test_add_with_other_backbone_rejected(bank, extractor):
    other = build_extractor(BackboneConfig(input_size=96), random_init=True, device="cpu")
    with pytest.raises(CheckpointError, match="different backbone"):
        bank.add(other, [texture(20)])
    with pytest.raises(CheckpointError):
        ReferenceBank(BackboneConfig(input_size=64, feature_dim=128)).add(extractor, [texture(20)])
    assert len(bank) == 4  # nothing was added


def test_the_bank_keeps_each_reference_s_pixels_for_zoom_in(bank, tmp_path):
    assert bank.has_sources and len(bank.sources) == 4
    for i in range(4):
        pixels = bank.source(i)
        assert pixels.shape == texture(i).shape and pixels.dtype == np.uint8
        # JPEG at quality 95: close to the image, not another image
        err = np.abs(pixels.astype(float) - texture(i).astype(float)).mean()
        assert err < 4.0 and err < np.abs(pixels.astype(float) - texture((i + 1) % 4).astype(float)).mean() / 3
    again = ReferenceBank.load(bank.save(tmp_path / "b.safetensors"))
    assert all(np.array_equal(a, b) for a, b in zip(again.sources, bank.sources))
    part = bank.subset([2, 0])
    assert np.array_equal(part.source(0), bank.source(2)) and np.array_equal(part.source(1), bank.source(0))


def test_a_bank_written_before_pixels_were_kept_loads_without_them(bank, tmp_path):
    from safetensors.torch import save_file

    old = tmp_path / "v1.safetensors"
    save_file({"features": bank.features.contiguous(), "descriptors": bank.descriptors.contiguous()}, str(old),
              metadata={"format": "adclick-reference-bank", "format_version": "1",
                        "backbone": json.dumps(bank.backbone.to_dict()), "names": json.dumps(bank.names),
                        "hashes": json.dumps(bank.hashes)})
    loaded = ReferenceBank.load(old)
    assert len(loaded) == 4 and not loaded.has_sources and loaded.source(1) is None
    assert loaded.fingerprint == bank.fingerprint


def test_large_references_are_kept_at_the_source_side(extractor):
    from adclick_core.inference.zoom import SOURCE_SIDE

    wide = np.tile(texture(3), (1, 32, 1))  # 48 x 1536 -> 32 x 1024
    one = ReferenceBank.build(extractor, [wide], progress=False)
    assert one.source(0).shape == (32, SOURCE_SIDE, 3)
