"""The encoder API on tiny random models: shapes, batch invariance, prompts, save and reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from sentence_transformers import SentenceTransformer

import lm2vec
from lm2vec.blocks import blocks
from lm2vec.quantization import lower_precision
from tests.support import ARCHITECTURES, random_texts, tiny_config, tiny_encoder, tiny_model, tiny_tokenizer

TEXTS = random_texts(20, seed=1)


def test_shapes_and_output_types():
    enc = tiny_encoder()
    assert enc.encode("w4 w5").shape == (64,)
    assert enc.encode([]).shape == (0, 64)
    assert enc.encode(TEXTS[:3]).shape == (3, 64)
    tensor = enc.encode(TEXTS[:3], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    normed = enc.encode(TEXTS[:3], normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)


def test_truncated_names_the_texts_encode_cuts():
    enc = tiny_encoder()
    enc.max_length = 6
    longer = [i for i, text in enumerate(TEXTS) if len(text.split()) > 6]  # one word, one token
    assert 0 < len(longer) < len(TEXTS)
    assert enc.truncated(TEXTS) == longer
    with_instruction = [i for i, text in enumerate(TEXTS) if len(text.split()) > 4]
    assert enc.truncated(TEXTS, instruction="w4 w5 ") == with_instruction
    assert enc.truncated(TEXTS[longer[0]]) == [0] and enc.truncated([]) == []


def test_max_length_set_later_cuts_texts_as_one_given_at_construction():
    """Also through sentence-transformers' name, ``max_seq_length``; the saved settings follow."""
    enc = tiny_encoder()
    cut_from_start = enc.with_model(enc.model, max_length=6)
    assert not np.array_equal(enc.encode(TEXTS), cut_from_start.encode(TEXTS))  # TEXTS run past 6 tokens
    enc.max_seq_length = 6
    assert enc.max_length == 6 and enc.settings()["max_length"] == 6
    np.testing.assert_array_equal(enc.encode(TEXTS), cut_from_start.encode(TEXTS))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be a positive integer"):
            enc.max_length = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        lm2vec.load("no-such-model-folder", max_length=0)  # refused before anything loads


def test_max_length_stays_within_the_models_positions(tmp_path: Path):
    """GPT-2's learned position table ends at n_positions: past it a long text failed with an IndexError. A length
    asked for past it is refused; a default or saved length is cut to it."""
    config = tiny_config("gpt2", pad_token_id=3)
    lm2vec.set_bidirectional(config)
    model = tiny_model(config)
    assert config.max_position_embeddings == 64
    enc = lm2vec.Encoder(model, tiny_tokenizer())
    assert enc.max_length == 64  # not 512
    long_text = " ".join(["w7"] * 300)
    assert enc.encode(long_text).shape == (64,)
    message = "max_length 65 is more than the 64 positions of this model"
    with pytest.raises(ValueError, match=message):
        enc.max_length = 65
    for length, refused in ((65, message), (0, "max_length must be a positive integer, got 0")):
        with pytest.raises(ValueError, match=refused):
            lm2vec.Encoder(model, tiny_tokenizer(), max_length=length)
    path = enc.save(tmp_path / "gpt2")
    (path / "sentence_bert_config.json").write_text('{"max_seq_length": 512}')  # a saved length past the table
    back = lm2vec.load(path, dtype="float32")
    assert back.max_length == 64
    np.testing.assert_array_equal(back.encode(long_text), enc.encode(long_text))
    (path / "model.safetensors").write_bytes(b"not weights")  # refused from the config, before the weights load
    with pytest.raises(ValueError, match=message):
        lm2vec.load(path, max_length=65)


SIDES = ("left", "right")


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_invariance(model_type: str, padding_side: str):
    """Every architecture, float32 and in lower precision: mixture-of-experts layers too (transformers' grouped
    expert product and Qwen2-MoE's one-column gate once moved a text by cosine 1e-7 between batches)."""
    enc = tiny_encoder(model_type, padding_side=padding_side)
    experts = getattr(enc.model.config, "_experts_implementation", None)
    for kind in ("float32", "lowered"):
        if kind != "float32":
            lower_precision(enc.model, ("bfloat16", "int8x2") * (len(blocks(enc.model)) // 2))
        together = enc.encode(TEXTS, batch_size=8)
        alone = np.stack([enc.encode(t) for t in TEXTS])
        np.testing.assert_array_equal(together, alone, err_msg=kind)
    assert getattr(enc.model.config, "_experts_implementation", None) == experts  # switched only while encoding


@pytest.mark.parametrize("pooling", list(lm2vec.PoolingMode))
def test_padding_side_does_not_matter(pooling):
    left = tiny_encoder(pooling=pooling, padding_side="left")
    right = tiny_encoder(pooling=pooling, padding_side="right")
    np.testing.assert_array_equal(left.encode(TEXTS), right.encode(TEXTS))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_padding_side_does_not_matter_on_any_architecture(model_type: str):
    """Bit for bit, also on the models that run padded (sliding windows, eager attention): where attention met the
    masked key once moved their embeddings by 1e-7 between a left- and a right-padding tokenizer."""
    left, right = (tiny_encoder(model_type, padding_side=side) for side in SIDES)
    np.testing.assert_array_equal(left.encode(TEXTS, batch_size=8), right.encode(TEXTS, batch_size=8))


def test_instruction_forms_agree_and_matter():
    enc = tiny_encoder(prompts={"query": "w5 w6 ", "document": ""})
    pair = enc.encode([("w5 w6 ", TEXTS[0])])[0]
    np.testing.assert_allclose(enc.encode(TEXTS[0], instruction="w5 w6 "), pair, atol=1e-6)
    np.testing.assert_allclose(enc.encode(TEXTS[0], prompt="w5 w6 "), pair, atol=1e-6)
    np.testing.assert_allclose(enc.encode(TEXTS[0], prompt_name="query"), pair, atol=1e-6)
    np.testing.assert_allclose(enc.encode_query(TEXTS[0]), pair, atol=1e-6)
    np.testing.assert_allclose(enc.encode_document(TEXTS[0]), enc.encode(TEXTS[0]), atol=1e-6)
    assert not np.allclose(pair, enc.encode(TEXTS[0]), atol=1e-4)  # attended to, so it changes the vector


def test_prompt_errors():
    enc = tiny_encoder(prompts={"query": "w5 "})
    with pytest.raises(ValueError, match="unknown prompt_name 'passage'"):
        enc.encode("w4", prompt_name="passage")
    with pytest.raises(ValueError, match="either prompt or instruction"):
        enc.encode("w4", prompt="a", instruction="b")
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode("w4", batch_size=0)


@pytest.mark.parametrize(
    "options,error,message",
    [  # each was taken: a string batch size failed deep inside, "no" normalized, True kept one dimension
        (dict(batch_size="8"), ValueError, "batch_size must be a positive integer, got '8'"),
        (dict(max_tokens=1.5), ValueError, "max_tokens must be a positive integer, got 1.5"),
        (dict(normalize_embeddings="no"), TypeError, "normalize_embeddings must be True or False, got 'no'"),
        (dict(convert_to_tensor="no"), TypeError, "convert_to_tensor must be True or False, got 'no'"),
        (dict(truncate_dim=True), ValueError, "truncate_dim must be an integer from 1 to the model's dimension 64"),
    ],
)
def test_encode_options_of_the_wrong_type_are_refused(options: dict, error: type[Exception], message: str):
    with pytest.raises(error, match=message):
        tiny_encoder().encode(TEXTS, **options)


def st_encode(path: Path, texts: list[str], **kwargs) -> np.ndarray:
    return SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True, **kwargs)


def test_similarity_is_sentence_transformers_cosine_matrix(tmp_path: Path):
    enc = tiny_encoder()
    queries, documents = enc.encode(TEXTS[:2]), enc.encode(TEXTS[2:5])
    scores = enc.similarity(queries, documents)
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    by_hand = queries @ documents.T / np.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(documents, axis=1))
    np.testing.assert_allclose(scores.numpy(), by_hand, atol=1e-6)
    st = SentenceTransformer(str(enc.save(tmp_path / "enc")), device="cpu")
    torch.testing.assert_close(scores, st.similarity(queries, documents))
    torch.testing.assert_close(enc.similarity(queries[0], torch.as_tensor(documents)), scores[:1])  # one vector


@pytest.mark.parametrize("name", ["dot", "euclidean", "manhattan"])
def test_the_similarity_function_a_model_names_is_used_saved_and_read(tmp_path: Path, name: str):
    """A model saved with ``similarity_fn_name`` "dot" (or a distance) is compared by it in sentence-transformers;
    lm2vec wrote "cosine" for every model and compared by cosine whatever a loaded model named."""
    base = tiny_encoder()
    enc = base.with_model(base.model, similarity_fn_name=name)
    queries, documents = enc.encode(TEXTS[:3]), enc.encode(TEXTS[3:6])
    st = SentenceTransformer(str(enc.save(tmp_path / "enc")), device="cpu")
    assert st.similarity_fn_name == name
    torch.testing.assert_close(enc.similarity(queries, documents), st.similarity(queries, documents))
    torch.testing.assert_close(enc.similarity_pairwise(queries, documents), st.similarity_pairwise(queries, documents))
    assert lm2vec.load(tmp_path / "enc").similarity_fn_name == name
    config = tmp_path / "enc" / "config_sentence_transformers.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"similarity_fn_name": "cos"}))
    with pytest.raises(lm2vec.ModelLoadError, match="similarity_fn_name must be one of cosine, dot, euclidean"):
        lm2vec.load(tmp_path / "enc")
    with pytest.raises(ValueError, match="similarity_fn_name must be one of"):
        base.with_model(base.model, similarity_fn_name=None)


@pytest.mark.parametrize("pooling", list(lm2vec.PoolingMode))
def test_save_reloads_identically_in_lm2vec_and_sentence_transformers(tmp_path: Path, pooling):
    enc = tiny_encoder(pooling=pooling, prompts={"query": "w5 w6 "})
    before = enc.encode(TEXTS)
    before_query = enc.encode(TEXTS, prompt_name="query")
    path = enc.save(tmp_path / "enc")
    reloaded = lm2vec.load(path, dtype="float32")
    assert reloaded.pooling == pooling and reloaded.prompts == {"query": "w5 w6 "} and reloaded.bidirectional
    np.testing.assert_allclose(reloaded.encode(TEXTS), before, atol=1e-5)
    np.testing.assert_allclose(st_encode(path, TEXTS), before, atol=1e-5)
    np.testing.assert_allclose(st_encode(path, TEXTS, prompt_name="query"), before_query, atol=1e-5)


def test_causal_encoder_reloads_causal(tmp_path: Path):
    enc = tiny_encoder(bidirectional=False, pooling="weighted_mean")
    path = enc.save(tmp_path / "causal")
    assert "- Attention: causal\n- Pooling: weighted_mean" in (path / "README.md").read_text()  # the model card
    reloaded = lm2vec.load(path, dtype="float32")
    assert not reloaded.bidirectional
    np.testing.assert_allclose(reloaded.encode(TEXTS), enc.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("merge", [True, False])
def test_lora_adapters_merged_or_kept(tmp_path: Path, merge: bool):
    """Either way the encoder reloads with its settings (an unmerged adapter is not the reference's layout)."""
    settings = {"pooling": "last_token", "max_length": 12, "prompts": {"query": "w5 w6 "}}
    enc = tiny_encoder(**settings)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    enc.model = get_peft_model(enc.model, lora)
    before = enc.encode(TEXTS, prompt_name="query")
    plain = tiny_encoder(**settings).encode(TEXTS, prompt_name="query")
    assert not np.allclose(before, plain, atol=1e-4)  # the adapter does something
    assert enc.truncated(TEXTS, prompt_name="query")  # some texts run past max_length
    path = enc.save(tmp_path / "lora", merge_adapters=merge)
    assert (path / "adapter_config.json").exists() != merge
    back = lm2vec.load(path, dtype="float32")
    assert (back.pooling.value, back.max_length, back.prompts, back.reference_style) == (*settings.values(), None)
    np.testing.assert_allclose(back.encode(TEXTS, prompt_name="query"), before, atol=1e-5)
    np.testing.assert_allclose(st_encode(path, TEXTS, prompt_name="query"), before, atol=1e-5)


def test_saved_files(tmp_path: Path):
    import json

    path = tiny_encoder(pooling="weighted_mean").save(tmp_path / "enc")
    assert json.loads((path / "config.json").read_text())["is_causal"] is False
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_weightedmean_tokens"] and not pooling["include_prompt"]
    assert not list(path.glob("*.bin")) and list(path.glob("*.safetensors"))
    card = (path / "README.md").read_text()
    assert "- Attention: bidirectional" in card and f"; {tiny_encoder().dim} dimensions; at most 64 tokens" in card
    assert {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"} <= {
        p.name for p in path.iterdir()
    }


def test_gemma3_flag_is_saved(tmp_path: Path):
    path = tiny_encoder("gemma3_text").save(tmp_path / "g3")
    config = json.loads((path / "config.json").read_text())
    assert config["use_bidirectional_attention"] is True and "is_causal" not in config
    assert lm2vec.load(path, dtype="float32").bidirectional


def test_tokenizer_fixture_is_word_level():
    assert tiny_tokenizer()("w4 w17").input_ids == [4, 17]


def test_max_tokens_changes_batching_not_embeddings():
    enc = tiny_encoder()
    np.testing.assert_array_equal(enc.encode(TEXTS, max_tokens=16), enc.encode(TEXTS, batch_size=64))
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        enc.encode(TEXTS, max_tokens=0)


def test_cpu_batches_are_bounded_by_tokens_by_default(monkeypatch: pytest.MonkeyPatch):
    enc = tiny_encoder()
    texts = [" ".join(f"w{4 + (i + j) % 50}" for j in range(10)) for i in range(8)]  # 8 texts of 10 tokens
    unbounded = enc.encode(texts, batch_size=8, max_tokens=10**9)
    monkeypatch.setattr(lm2vec.encoder, "CPU_MAX_TOKENS", 20)
    rows = []
    hook = enc.model.register_forward_hook(  # tokens per forward pass: packed (see packing.py)
        lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    bounded = enc.encode(texts, batch_size=8)
    hook.remove()
    assert enc.packs() and rows == [20, 20, 20, 20]
    np.testing.assert_array_equal(bounded, unbounded)


@pytest.mark.parametrize("packed", [True, False])
def test_encoding_keeps_no_kv_cache(packed: bool):
    """An encoder predicts no next token: a KV cache would only hold every layer's keys and values for the whole
    pass (on the built-in model, 43 of the 134 MB a 1,024-token pass allocated)."""
    enc = tiny_encoder("llama" if packed else "mistral")  # Mistral's 4-token window: never packed
    assert enc.packs() is packed  # (its first call checks packing on the model: not counted here)
    caches = []
    hook = enc.model.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))
    try:
        enc.encode(TEXTS[:4])
    finally:
        hook.remove()
    assert caches and all(cache is None for cache in caches)


def test_chunked_tokenization_gives_the_same_embeddings(monkeypatch: pytest.MonkeyPatch):
    """A corpus larger than one tokenization chunk is tokenized chunk by chunk on a thread; nothing changes."""
    enc = tiny_encoder()
    texts = random_texts(23, seed=3) + [("w5 w6", "w7 w8 w9")]
    whole = enc.encode(texts, batch_size=4)
    monkeypatch.setattr(lm2vec.encoder, "TOKENIZE_CHUNK", 5)
    np.testing.assert_array_equal(enc.encode(texts, batch_size=4), whole)
    assert enc.encode([], batch_size=4).shape == (0, enc.dim)


def test_truncate_dim_and_precision_follow_sentence_transformers():
    from sentence_transformers.util.quantization import quantize_embeddings

    enc = tiny_encoder()
    full = enc.encode(TEXTS)
    short = enc.encode(TEXTS, truncate_dim=16, normalize_embeddings=True)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, rtol=1e-5, atol=1e-6)
    for precision in ("int8", "uint8", "binary", "ubinary"):
        got = enc.encode(TEXTS, precision=precision)
        np.testing.assert_array_equal(got, quantize_embeddings(full, precision))
    assert enc.encode(TEXTS, precision="ubinary").shape == (len(TEXTS), 8)  # 64 dims packed into 8 bytes
    with pytest.raises(ValueError, match="truncate_dim must be an integer from 1 to the model's dimension 64"):
        enc.encode(TEXTS, truncate_dim=65)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        enc.encode(TEXTS, precision="int4")
    with pytest.raises(ValueError, match="int8 needs ranges"):
        enc.encode(TEXTS[0], precision="int8")
