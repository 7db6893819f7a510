"""The bidirectional switch, verified on every architecture and attention implementation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import lm2vec
from lm2vec.attention import UNSUPPORTED, causal_blocks, first_token_moves, set_bidirectional, verify_attention
from tests.support import ARCHITECTURES, HYBRIDS, VOCAB, has_sdpa, random_texts, tiny_config, tiny_model, tiny_tokenizer

IMPLEMENTATIONS = ("eager", "sdpa")
# What transformers itself does not offer (not an lm2vec limitation).
CASES = (None, "left", "right")  # alone, inside a left-padded batch, inside a right-padded batch


def build(model_type: str, impl: str, bidirectional: bool) -> torch.nn.Module:
    config = tiny_config(model_type, attn_implementation=impl)
    set_bidirectional(config, bidirectional)
    return tiny_model(config)


def test_matrix_covers_the_required_architectures():
    required = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2"}
    required |= {"gemma3_text", "phi3", "olmo2", "granite", "starcoder2", "stablelm", "gpt_neox", "cohere"}
    assert required <= set(ARCHITECTURES)
    assert len(ARCHITECTURES) >= 15


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_causal_and_bidirectional(model_type: str, impl: str):
    if impl == "sdpa" and not has_sdpa(model_type):
        pytest.skip(f"transformers has no SDPA attention for {model_type}")
    causal = build(model_type, impl, bidirectional=False)
    for case in CASES:
        assert not first_token_moves(causal, case, VOCAB), f"causal {model_type}/{impl} leaks the future ({case})"
    verify_attention(causal, bidirectional=False)
    if (model_type, impl) in UNSUPPORTED:
        with pytest.raises(lm2vec.AttentionError, match="cannot be made bidirectional"):
            build(model_type, impl, bidirectional=True)
        return
    bidirectional = build(model_type, impl, bidirectional=True)
    for case in CASES:
        assert first_token_moves(bidirectional, case, VOCAB), f"{model_type}/{impl} still causal ({case})"
    verify_attention(bidirectional, bidirectional=True)


# Table entries whose bare switch fails inside transformers instead of staying causal, with that failure.
FAILS = {
    "mpt": (AttributeError, "'NoneType' object has no attribute 'to'"),
    "modernbert-decoder": (TypeError, "unsupported operand type(s) for +: 'Tensor' and 'NoneType'"),
}


@pytest.mark.parametrize("model_type,impl", sorted(UNSUPPORTED, key=str))
def test_unsupported_entries_are_really_causal_or_fail(model_type: str, impl: str | None):
    """The table is not a guess: bypass it and verify() catches the silent causal fallback, or transformers fails."""
    config = tiny_config(model_type, attn_implementation=impl or "eager")
    config.is_causal = False  # the bare switch, without lm2vec's table
    model = tiny_model(config)
    error, message = FAILS.get(model_type, (lm2vec.AttentionError, "should be bidirectional but is causal"))
    with pytest.raises(error, match=re.escape(message)):
        verify_attention(model, bidirectional=True)


def test_a_causal_only_architecture_loads_causal_and_refuses_bidirectional_by_name(tmp_path):
    config = tiny_config("mpt", max_seq_len=64)
    set_bidirectional(config, False)
    tiny_model(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    texts = random_texts(6, seed=3)
    causal = lm2vec.load(tmp_path, bidirectional=False, dtype="float32")
    np.testing.assert_array_equal(causal.encode(texts), np.stack([causal.encode([t])[0] for t in texts]))
    with pytest.raises(lm2vec.AttentionError, match="mpt with eager attention cannot be made bidirectional.*"):
        lm2vec.load(tmp_path, dtype="float32")


def test_verify_catches_the_module_flag_trap():
    """Flipping only the attention modules' is_causal (the old recipe) leaves padded batches causal."""
    model = build("llama", "sdpa", bidirectional=False)
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    with pytest.raises(lm2vec.AttentionError):
        verify_attention(model, bidirectional=True)


def test_gemma3_uses_its_own_flag_and_keeps_its_sliding_windows_as_embedding_gemma_runs():
    """Gemma 3 built bidirectional halves its sliding window (it reaches as far both ways as it reached back) and
    saves it doubled back. Set on a built config, the window stayed whole and was saved doubled (8 -> 14 here,
    512 -> 1022), and is_causal False set besides took transformers' generic mask (distance <= window, not <):
    other states than EmbeddingGemma's for any text longer than the window."""
    config = tiny_config("gemma3_text", sliding_window=8)
    set_bidirectional(config)
    assert config.use_bidirectional_attention is True and getattr(config, "is_causal", None) is None
    assert config.to_dict()["sliding_window"] == 8
    native = tiny_config("gemma3_text", sliding_window=8, use_bidirectional_attention=True)  # EmbeddingGemma's way
    ids = torch.arange(4, 16)[None]  # 12 tokens
    ours, theirs = (tiny_model(c)(input_ids=ids).last_hidden_state for c in (config, native))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    set_bidirectional(config, False)
    assert config.use_bidirectional_attention is False and getattr(config, "is_causal", None) is None
    assert config.sliding_window == 8


def hybrid(model_type: str, bidirectional: bool) -> torch.nn.Module:
    config = tiny_config(model_type, num_hidden_layers=4, head_dim=16, **HYBRIDS[model_type][0])
    return tiny_model(set_bidirectional(config, bidirectional))


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_blocks_that_stay_causal_are_named(model_type: str):
    """One bidirectional block moves the first token's final state, so the end-to-end probe passes; each block's
    own mixing is checked too. Blocks that mix no tokens (Nemotron-H's MLP and MoE blocks) are not causal."""
    model = hybrid(model_type, bidirectional=True)
    assert first_token_moves(model, None, VOCAB)
    assert causal_blocks(model, VOCAB) == HYBRIDS[model_type][1]
    with pytest.raises(lm2vec.AttentionError, match=re.escape(f"blocks {HYBRIDS[model_type][1]} of 4 stay causal")):
        verify_attention(model, bidirectional=True)
    verify_attention(hybrid(model_type, bidirectional=False), bidirectional=False)


def test_a_convolution_is_never_packed_and_texts_keep_their_vectors():
    """Packed, LFM2's short convolutions carry the end of one text into the start of the next: its causal encoder
    runs in padded batches, where a text's vector is the same alone and in any batch."""
    encoder = lm2vec.Encoder(hybrid("lfm2", False), tiny_tokenizer(), pooling="last_token", bidirectional=False)
    assert not encoder.packs()
    texts = random_texts(24, seed=1)
    alone = np.stack([encoder.encode([text])[0] for text in texts])
    np.testing.assert_array_equal(encoder.encode(texts, batch_size=8), alone)
