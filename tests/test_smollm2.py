"""Integration tests on the real built-in model, SmolLM2-135M-Instruct from its GGUF file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForCausalLM

import lm2vec
from lm2vec.evaluation import cosine_rows
from lm2vec.loading.source import builtin_gguf_path, resolve_source

DATA = Path(os.environ.get("LM2VEC_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STSB_TEST = DATA / "sts" / "stsb" / "test.jsonl"


def stsb_sentences(n: int) -> list[str]:
    if not STSB_TEST.is_file():
        pytest.skip(f"shared data not found at {DATA} (set LM2VEC_DATA)")
    rows = [json.loads(line) for line in STSB_TEST.read_text().splitlines()[:n]]
    return [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]


def test_gguf_special_tokens(smollm2: lm2vec.Encoder):
    tok = smollm2.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|im_end|>"
    ids = tok("The cat sat.").input_ids
    assert ids == tok("The cat sat.", add_special_tokens=False).input_ids  # no BOS prepended
    assert tok.convert_ids_to_tokens(79) == "_"  # the MNTP mask token of the recipe


def test_a_copy_of_the_gguf_file_finds_its_conversion(smollm2: lm2vec.Encoder, tmp_path: Path):
    """GGUF conversions are keyed by the file's content: a copy elsewhere, with a new time (another virtual
    environment's wheel), reuses the converted directory instead of converting (and storing) it again."""
    original = builtin_gguf_path()
    copy = Path(shutil.copy(original, tmp_path / original.name))
    assert copy.stat().st_mtime_ns != original.stat().st_mtime_ns
    assert resolve_source(copy).path == resolve_source(None).path


def test_lm_head_is_tied_and_the_model_still_talks():
    """The GGUF has no output.weight: an untied head would be random and answer nonsense."""
    path = resolve_source(None).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = lm2vec.load(verify=False).tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])


def test_attention_verified_both_ways(smollm2: lm2vec.Encoder):
    smollm2.verify()
    assert smollm2.info()["attention"] == "bidirectional"
    causal = lm2vec.load(bidirectional=False)
    assert causal.info()["attention"] == "causal"
    with pytest.raises(lm2vec.AttentionError):
        lm2vec.verify_attention(causal.model, bidirectional=True)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_invariance(smollm2: lm2vec.Encoder, padding_side: str):
    texts = stsb_sentences(16)  # 32 texts of varied length
    smollm2.tokenizer.padding_side = padding_side
    try:
        batch = smollm2.encode(texts, batch_size=32)
        alone = np.stack([smollm2.encode(text) for text in texts])
        with torch.inference_mode():  # inference: with autograd on, forward() is training's, without the blocks
            padded = smollm2.forward(smollm2.tokenization([""] * len(texts), texts)).numpy()
        # Bit-identical: packed attention (no padding reaches the model) and linear layers in fixed row blocks.
        # Without the blocks, MKL's shape-dependent kernels and the model's massive activations gave up to 3e-4;
        # a padded batch of mixed lengths, up to 2e-3.
        np.testing.assert_array_equal(batch, alone, f"{padding_side} padding")
        np.testing.assert_array_equal(padded, alone, f"{padding_side} padding")
    finally:
        smollm2.tokenizer.padding_side = "right"


@pytest.fixture(scope="module")
def default_encoder() -> lm2vec.Encoder:
    """What ``lm2vec.load()`` gives on this machine (dtype="auto": float32, bf16 or int8 as measured here)."""
    return lm2vec.load()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_default_path_is_batch_invariant(default_encoder: lm2vec.Encoder, padding_side: str):
    """A text alone, then among 32 shorter and longer texts, in encode()'s batches and in one padded batch."""
    texts = sorted(set(stsb_sentences(60)), key=len)
    target, others = texts[len(texts) // 2], texts[:16] + texts[-16:]
    mixed = others[:16] + [target] + others[16:]
    enc = default_encoder
    enc.tokenizer.padding_side = padding_side
    try:
        alone = enc.encode(target)
        in_batch = enc.encode(mixed, batch_size=33)[16]
        with torch.inference_mode():
            padded = enc.forward(enc.tokenization([""] * len(mixed), mixed)).numpy()[16]
    finally:
        enc.tokenizer.padding_side = "right"
    for row in (in_batch, padded):  # the bar is cosine >= 0.99999; packed, it is bit for bit
        np.testing.assert_array_equal(row, alone, f"{enc.info()['blocks']}, {padding_side} padding")


def test_default_path_runs_packed(default_encoder: lm2vec.Encoder):
    """Packing is switched on after comparing a text alone and packed; that check needs float32 products in fixed
    row blocks, else kernel rounding (amplified by the massive activations and bf16 blocks) fails it, and the
    default falls back to slower padded batches (the built-in model's default plan came to 0.97e-3 against a 1e-3
    tolerance, the same plan with its embeddings in int8x2 to 2.4e-3)."""
    assert default_encoder.packs(), default_encoder.info()["blocks"]


def test_default_path_stays_float32_grade(default_encoder: lm2vec.Encoder, smollm2: lm2vec.Encoder):
    """On the untrained model, whose massive activations make it the hard case for lower precision."""
    texts = stsb_sentences(50)
    cosine = cosine_rows(default_encoder.encode(texts), smollm2.encode(texts))
    assert cosine.min() >= 0.99 and cosine.mean() >= 0.999, (default_encoder.dtype, cosine.min(), cosine.mean())


def test_awkward_texts(smollm2: lm2vec.Encoder):
    out = smollm2.encode(["", "   ", "\n", "x" * 100_000, "normal text"])
    assert out.shape == (5, 576) and np.isfinite(out).all()
    assert len(smollm2.tokenization(["x"], ["word " * 100_000]).input_ids[0]) == smollm2.max_length


QUERY = "Given a question, retrieve passages that answer it: "


def test_save_reload_in_sentence_transformers(smollm2: lm2vec.Encoder, tmp_path: Path):
    smollm2.prompts = {"query": QUERY}
    try:
        texts = stsb_sentences(8)
        before = smollm2.encode(texts)
        before_query = smollm2.encode_query(texts)
        path = smollm2.save(tmp_path / "smol")
    finally:
        smollm2.prompts = {}
    np.testing.assert_allclose(lm2vec.load(path, dtype="float32").encode(texts), before, atol=1e-4)
    # sentence-transformers pads mixed lengths and uses plain BLAS products: fp32 rounding, amplified by the
    # untrained model's massive activations (values up to 23), stays below 1e-3.
    st = SentenceTransformer(str(path), device="cpu")
    np.testing.assert_allclose(st.encode(texts), before, atol=1e-3)
    # A prompt ending in a space: sentence-transformers counts its tokens alone, where the space is a token of its
    # own, and so leaves out the text's first word, which that space joins in the row ("ĠWhat"); lm2vec pools it.
    ids, _ = smollm2.tokenization.tokenize([QUERY] * len(texts), texts)
    alone = len(smollm2.tokenizer(QUERY)["input_ids"])
    st_way = smollm2.embed_tokens(ids, [alone] * len(texts)).numpy()
    np.testing.assert_allclose(st.encode_query(texts), st_way, atol=1e-3)
    assert not np.allclose(st_way, before_query, atol=1e-2)
    # Without that space both count alike.
    bare = QUERY.rstrip()
    np.testing.assert_allclose(st.encode(texts, prompt=bare), smollm2.encode(texts, prompt=bare), atol=1e-3)


def test_the_built_in_model_as_a_sentence_transformers_embedding_model_gives_its_vectors(tmp_path: Path):
    """SmolLM2 built into a decoder embedding model by sentence-transformers (last token, Normalize, an instruction
    pooled with the text, plain text rather than its chat template): lm2vec.load gives sentence-transformers'
    vectors, running the model causal as it does (on 300 STS-B dev sentences: cosine >= 0.9999999, |diff| <= 9e-7)."""
    from sentence_transformers import models

    texts = stsb_sentences(8)
    text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    transformer = models.Transformer(
        str(resolve_source(None).path), modality_config=text_only, module_output_name="token_embeddings"
    )
    modules = [transformer, models.Pooling(576, pooling_mode="lasttoken"), models.Normalize()]
    model = SentenceTransformer(
        modules=modules, prompts={"query": "Instruct: find similar sentences\nQuery: "}, device="cpu"
    )
    model.save(str(tmp_path / "st"))
    encoder = lm2vec.load(tmp_path / "st", dtype="float32")
    assert not encoder.bidirectional and encoder.normalize
    for name in (None, "query"):
        np.testing.assert_allclose(
            encoder.encode(texts, prompt_name=name), model.encode(texts, prompt_name=name), atol=1e-4
        )
