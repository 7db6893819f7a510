"""The bidirectional switch, verified on every architecture and attention implementation."""

from __future__ import annotations

import pytest
import torch

import lm2vec
from lm2vec.attention import UNSUPPORTED, first_token_moves, set_bidirectional, verify_attention
from tests.support import ARCHITECTURES, VOCAB, tiny_config, tiny_model

IMPLEMENTATIONS = ("eager", "sdpa")
# What transformers itself does not offer (not an lm2vec limitation).
NOT_IN_TRANSFORMERS = {("gemma2", "sdpa"): "transformers has no SDPA attention for Gemma 2"}
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
    if (model_type, impl) in NOT_IN_TRANSFORMERS:
        pytest.skip(NOT_IN_TRANSFORMERS[model_type, impl])
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


@pytest.mark.parametrize("model_type,impl", sorted(UNSUPPORTED))
def test_unsupported_entries_are_really_causal(model_type: str, impl: str):
    """The table is not a guess: bypass it and verify() catches the silent causal fallback."""
    config = tiny_config(model_type, attn_implementation=impl)
    config.is_causal = False  # the bare switch, without lm2vec's table
    model = tiny_model(config)
    with pytest.raises(lm2vec.AttentionError, match="should be bidirectional but is causal"):
        verify_attention(model, bidirectional=True)


def test_verify_catches_the_module_flag_trap():
    """Flipping only the attention modules' is_causal (the old recipe) leaves padded batches causal."""
    model = build("llama", "sdpa", bidirectional=False)
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    with pytest.raises(lm2vec.AttentionError):
        verify_attention(model, bidirectional=True)


def test_gemma3_uses_its_own_flag():
    config = tiny_config("gemma3_text")
    set_bidirectional(config)
    assert config.use_bidirectional_attention is True and config.is_causal is False
    set_bidirectional(config, False)
    assert config.use_bidirectional_attention is False and config.is_causal is True
