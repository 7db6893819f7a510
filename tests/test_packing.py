"""Packed inference (lm2vec/packing.py): a batch's texts as one unpadded sequence, each attending only to itself."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers

import lm2vec
from lm2vec.packing import PACKED, PACKED_EAGER, enable_packing, packed_states

from .support import random_texts, tiny_config, tiny_encoder, tiny_model, tiny_tokenizer

TEXTS = random_texts(24, seed=5, max_words=30)  # 1 to 30 tokens: many lengths per batch


def padded(encoder: lm2vec.Encoder) -> lm2vec.Encoder:
    """``encoder`` with packing decided off: its padded batches, to compare packed vectors with."""
    encoder._packing = False
    return encoder


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "olmo2", "glm"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_is_bit_identical_in_any_batch_and_equals_padded(model_type: str, padding_side: str):
    enc = tiny_encoder(model_type, padding_side=padding_side)
    together = enc.encode(TEXTS, batch_size=24)
    assert enc.packs() and enc.model.config._attn_implementation == PACKED
    alone = np.stack([enc.encode(t) for t in TEXTS])
    np.testing.assert_array_equal(together, alone)
    # against the padded batch the model computes unpacked, on its eager attention
    eager = padded(tiny_encoder(model_type, padding_side=padding_side, attn_implementation="eager"))
    np.testing.assert_allclose(together, eager.encode(TEXTS, batch_size=24), atol=2e-5)


# Attention whose kernels computed the views of a group of short texts differently by how many texts it held (63 of
# 100 texts moved in the last bits): multi-head latent attention at the released head sizes, tiny otherwise, with
# values narrower than queries on SDPA (DeepSeek-V3: queries and keys 192, values 128; MiniCPM3: 96 and 64), and
# HY-V4's (256 and 256) on its own eager attention (with sinks). Groups are copied first there.
MLA = dict(kv_lora_rank=16, q_lora_rank=16, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2)
MLA_HEADS = {
    "deepseek_v3": dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=1, topk_group=1),
    "minicpm3": dict(qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
    "hy_v4": dict(qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256),
}


@pytest.mark.parametrize("model_type", sorted(MLA_HEADS))
def test_groups_of_short_texts_of_latent_attention_pack_bit_identical(model_type: str):
    texts = random_texts(40, seed=8, max_words=8)
    config = tiny_config(model_type, pad_token_id=3, moe_intermediate_size=32, **MLA, **MLA_HEADS[model_type])
    enc = lm2vec.Encoder(tiny_model(lm2vec.set_bidirectional(config)), tiny_tokenizer(), max_length=64)
    together = enc.encode(texts, batch_size=40)
    assert enc.packs()
    np.testing.assert_array_equal(together, np.stack([enc.encode(t) for t in texts]))


# What a text past some length gets from a model's own attention that packed attention does not apply, by the model
# that has it: sparse attention's selection (DeepSeek-V3.2's DSA: each query attends to the ``index_topk`` keys its
# indexer picks, on SDPA and eager attention only) and LongRoPE's long factors (Phi-3.5, Phi-4-mini: taken for the
# whole sequence once its last position passes ``original_max_position_embeddings``). Both past 16 tokens here.
LONGROPE = dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8, long_factor=[4.0] * 8)
PAST_A_LENGTH = {
    "deepseek_v32": dict(MLA, **MLA_HEADS["deepseek_v3"], index_topk=16, index_n_heads=2, index_head_dim=64),
    "phi3": dict(
        rope_parameters=LONGROPE | {"original_max_position_embeddings": 16}, original_max_position_embeddings=16
    ),
}


@pytest.mark.parametrize("model_type", sorted(PAST_A_LENGTH))
def test_a_model_packs_only_where_no_text_passes_a_length_its_attention_treats_otherwise(model_type: str):
    """Packed, a long text would attend to all its keys (DSA) or hand its long factors to the short texts beside it
    (LongRoPE): such a model packs only where ``max_length`` stays within that length, as with a sliding window."""

    def encoder(max_length: int) -> lm2vec.Encoder:
        config = tiny_config(model_type, pad_token_id=3, moe_intermediate_size=32, **PAST_A_LENGTH[model_type])
        return lm2vec.Encoder(tiny_model(lm2vec.set_bidirectional(config)), tiny_tokenizer(), max_length=max_length)

    texts = random_texts(12, seed=9, max_words=30)
    enc = encoder(64)
    together = enc.encode(texts, batch_size=12)
    assert not enc.packs() and encoder(16).packs()
    np.testing.assert_array_equal(together, np.stack([enc.encode(t) for t in texts]))
    lengths = (4, 20)  # one text within the length, one past it
    ids = torch.full((2, 20), 3)  # the pad id
    ids[0, :4], ids[1] = torch.arange(5, 9), torch.arange(4, 24)
    mask = (torch.arange(20) < torch.tensor(lengths)[:, None]).long()
    with torch.inference_mode():
        own = torch.zeros(2, 20, enc.model.config.hidden_size)
        for row, n in enumerate(lengths):
            own[row, :n] = enc.model(input_ids=ids[row : row + 1, :n], attention_mask=mask[row : row + 1, :n])[0][0]
        enc.model.set_attn_implementation(PACKED)
        assert not torch.allclose(packed_states(enc.model, ids, mask), own, atol=1e-3)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_eager_models_pack_on_their_own_attention(bidirectional: bool):
    """Gemma 2 runs eager (SDPA cannot soft-cap its scores; capped at 0.1 here, so the cap decides every score):
    packed on its own eager attention, each text under the top-left corner of the packed sequence's mask (causal
    or not, as loaded), bit-identical in any batch and equal to the padded batch's vectors."""

    def gemma2() -> lm2vec.Encoder:  # a 128-token window: no text of max_length 64 reaches its edge
        config = tiny_config("gemma2", pad_token_id=3, sliding_window=128, attn_logit_softcapping=0.1)
        model = tiny_model(lm2vec.set_bidirectional(config, bidirectional))
        return lm2vec.Encoder(model, tiny_tokenizer(), max_length=64, bidirectional=bidirectional)

    enc = gemma2()
    assert enc.model.config._attn_implementation == "eager"
    together = enc.encode(TEXTS, batch_size=24)
    assert enc.packs() and enc.model.config._attn_implementation == PACKED_EAGER
    np.testing.assert_array_equal(together, np.stack([enc.encode(t) for t in TEXTS]))
    np.testing.assert_allclose(together, padded(gemma2()).encode(TEXTS, batch_size=24), atol=2e-5)


def test_causal_models_pack_too():
    enc = tiny_encoder(bidirectional=False)
    assert enc.packs()
    batch = enc.tokenization([""] * len(TEXTS), TEXTS)
    with torch.inference_mode():
        packed = packed_states(enc.model, batch.input_ids, batch.attention_mask)
        for row in (0, 7, 23):
            n = int(batch.attention_mask[row].sum())
            alone = enc.model(input_ids=batch.input_ids[row : row + 1, :n]).last_hidden_state[0]
            torch.testing.assert_close(packed[row, :n], alone, atol=1e-5, rtol=1e-5)
            assert not packed[row, n:].any()  # zeros at the padding


def test_texts_side_by_side_and_apart_give_the_same_bits():
    """Texts of one length that lie side by side in the packed sequence (length-sorted, as encode() batches them)
    run as views of it, the others are gathered: the same bits either way."""
    enc = tiny_encoder()
    assert enc.packs()
    batch = enc.tokenization([""] * len(TEXTS), TEXTS)
    order = torch.argsort(batch.attention_mask.sum(1), descending=True, stable=True)
    kinds: list[set[type]] = []
    hook = enc.model.register_forward_hook(
        lambda module, args, kwargs, out: kinds.append({type(where) for _, where in kwargs["segments"]}),
        with_kwargs=True,
    )
    with torch.inference_mode():
        given = enc.token_states(batch.input_ids, batch.attention_mask)
        side_by_side = enc.token_states(batch.input_ids[order], batch.attention_mask[order])
    hook.remove()
    assert torch.Tensor in kinds[0] and kinds[1] == {slice}  # both ways were taken
    assert torch.equal(given[order], side_by_side)


def test_the_packing_check_raises_no_padding_warning():
    """The check's texts hold the tiny tokenizer's pad id (3): its single-text passes carry their attention mask,
    so transformers (GPT-2 checks for pad ids without one) has nothing to warn a user about."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = transformers.utils.logging.get_logger("transformers")
    transformers.utils.logging.warning_once.cache_clear()  # it warns once per process
    logger.addHandler(handler)
    try:
        assert tiny_encoder("gpt2").packs()
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "attention_mask" in r.getMessage()]


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_windowed_attention_is_not_packed_and_stays_batch_invariant(model_type: str):
    """A sliding window (4 tokens here) matters for texts longer than it, which a short check cannot see: such
    models run padded, in batches of one length."""
    enc = tiny_encoder(model_type)
    assert not enc.packs() and not enable_packing(enc.model, enc.max_length)
    assert enc.model.config._attn_implementation == "sdpa"
    np.testing.assert_array_equal(enc.encode(TEXTS, batch_size=24), np.stack([enc.encode(t) for t in TEXTS]))


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text", "starcoder2", "phi3"])
def test_a_window_no_text_reaches_still_packs(model_type: str):
    """max_length 64 below a 65-token window: no text meets its edge, so the model packs, with the padded path's
    vectors; raising max_length to the window turns packing off."""

    def windowed(attention: str) -> lm2vec.Encoder:
        window = 128 if model_type == "gemma3_text" else 65  # Gemma 3 built bidirectional halves it (+ 1): 65
        config = tiny_config(
            model_type,
            pad_token_id=3,
            attn_implementation=attention,
            sliding_window=window,
            max_position_embeddings=128,
        )
        return lm2vec.Encoder(tiny_model(lm2vec.set_bidirectional(config)), tiny_tokenizer(), max_length=64)

    texts = random_texts(16, seed=6, max_words=63)  # up to 63 words: the whole window's width
    enc = windowed("sdpa")
    assert enc.packs()
    together = enc.encode(texts, batch_size=16)
    np.testing.assert_array_equal(together, np.stack([enc.encode(t) for t in texts]))
    np.testing.assert_allclose(together, padded(windowed("eager")).encode(texts, batch_size=16), atol=2e-5)
    enc.max_length = 65
    assert not enc.packs()


def test_a_model_whose_attention_fails_packed_runs_in_padded_batches():
    """Inkling's attention adds a relative-position bias built over the whole sequence: packed, its shapes do not
    fit (a RuntimeError while checking), so it runs in padded batches, as a model the check finds wrong does; its
    vectors keep their bits in any batch (its shared experts' batched products are row-blocked too)."""
    model = tiny_model(lm2vec.set_bidirectional(tiny_config("inkling_text", head_dim=16, pad_token_id=3)))
    assert not enable_packing(model, 64) and model.config._attn_implementation == "sdpa"
    enc = lm2vec.Encoder(model, tiny_tokenizer(), max_length=64)
    np.testing.assert_array_equal(enc.encode(TEXTS, batch_size=24), np.stack([enc.encode(t) for t in TEXTS]))
    assert not enc.packs()


@pytest.mark.parametrize("packs", [True, False])
def test_eager_attention_over_one_shared_key_head_keeps_a_texts_bits_in_any_batch(packs: bool):
    """One key/value head for all query heads (Gemma 3 1B; DeepSeek-V4 at its released head size 512), on eager
    attention: packed groups and padded batches of short texts moved by 5e-7 with how many texts they held."""
    texts = random_texts(40, seed=8, max_words=8)
    config = tiny_config("llama", pad_token_id=3, attn_implementation="eager", num_key_value_heads=1, head_dim=128)
    enc = lm2vec.Encoder(tiny_model(lm2vec.set_bidirectional(config)), tiny_tokenizer(), max_length=64)
    enc = enc if packs else padded(enc)
    together = enc.encode(texts, batch_size=40)
    assert enc.packs() == packs
    np.testing.assert_array_equal(together, np.stack([enc.encode(t) for t in texts]))


def test_training_mode_runs_padded_and_gradients_flow():
    enc = tiny_encoder()
    enc.model.train()
    assert not enc.packs()
    batch = enc.tokenization([""] * 4, TEXTS[:4])
    enc.forward(batch).sum().backward()
    assert all(p.grad is not None for p in enc.model.parameters() if p.requires_grad)


def test_packed_under_bf16_autocast():
    """Training scores STS-B dev under bf16 autocast: SDPA then returns bf16 while the queries are float32."""
    enc = tiny_encoder()
    batch = enc.tokenization([""] * len(TEXTS), TEXTS)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc.forward(batch).float()
        full = enc.forward(batch)
    assert enc.packs() and torch.isfinite(low).all()
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.1)


def test_packed_batches_are_bounded_by_tokens_not_texts():
    """No padding is computed, so ``batch_size`` would only add forward passes: ``max_tokens`` bounds them."""
    enc = tiny_encoder()
    assert enc.packs()  # (its first call checks packing on the model: forward passes not counted here)
    passes: list[int] = []
    hook = enc.model.register_forward_hook(lambda module, args, output: passes.append(1))
    try:
        enc.encode(TEXTS, batch_size=2, max_tokens=1_000_000)
        assert len(passes) == 1
        passes.clear()
        longest = int(enc.tokenization([""] * len(TEXTS), TEXTS).attention_mask.sum(1).max())
        enc.encode(TEXTS, batch_size=1_000, max_tokens=4 * longest)
        assert len(passes) > 1
    finally:
        hook.remove()
