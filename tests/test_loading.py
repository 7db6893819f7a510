"""Loading: sources, clear errors for missing or corrupt models, no pickle, no remote code unless asked."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import lm2vec
from lm2vec.dense import Dense
from lm2vec.loading import ModelLoadError
from lm2vec.loading.source import fix_special_tokens, resolve_source
from lm2vec.packing import PACKED
from lm2vec.training import MNTPConfig, train_mntp
from tests.support import (
    ARCHITECTURES,
    MULTIMODAL,
    default_attention,
    random_texts,
    save_multimodal,
    tiny_config,
    tiny_encoder,
    tiny_gguf,
    tiny_model,
    tiny_tokenizer,
)

TEXTS = random_texts(12, seed=2)


def test_load_saved_directory_verifies(tiny_dir: Path):
    enc = lm2vec.load(tiny_dir)
    assert enc.info()["attention"] == "bidirectional"
    assert lm2vec.load(tiny_dir, bidirectional=False).info()["attention"] == "causal"


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_reloads_with_its_attention_and_weights(model_type: str, tmp_path: Path):
    """``load`` takes SDPA where the model has it and eager where not (Gemma 2: transformers has no SDPA for it;
    StableLM: SDPA would stay causal), and gives the saved model's embeddings back."""
    attention = default_attention(model_type)
    saved = tiny_encoder(model_type)
    loaded = lm2vec.load(saved.save(tmp_path / model_type), dtype="float32")
    assert loaded.model.config._attn_implementation in {attention, PACKED}
    ids, prefix = saved.tokenization.tokenize([""] * len(TEXTS), TEXTS)  # transformers gives a saved qwen2 its own
    assert torch.equal(loaded.embed_tokens(ids, prefix), saved.embed_tokens(ids, prefix))  # tokenizer class


@pytest.mark.filterwarnings("error:rebuilding the unreadable cache")  # lowered weights read back as the text decoder
@pytest.mark.parametrize("model_type", sorted(MULTIMODAL))
def test_a_multimodal_model_encodes_with_its_text_decoder_alone(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Gemma 3 4B+, Llava, Qwen2-VL: the text decoder with the checkpoint's weights, bidirectional (Gemma 3's own
    wrapper builds causal masks), without the vision tower, saved and reloaded as a model of the text type."""
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    path = save_multimodal(tmp_path / model_type, model_type)
    text_type = MULTIMODAL[model_type][0]
    encoder = lm2vec.load(path, dtype="float32")  # verifies bidirectional attention
    assert encoder.model.config.model_type == text_type and encoder.bidirectional
    assert encoder.model.config.name_or_path == str(path)  # named in the model card as the checkpoint it came from
    wrapper = AutoModel.from_pretrained(path)  # transformers' own multimodal model
    decoder = next(m for m in wrapper.modules() if type(m) is type(encoder.model))
    torch.testing.assert_close(encoder.model.state_dict(), decoder.state_dict(), rtol=0, atol=0)
    assert not any("vision" in name for name, _ in encoder.model.named_parameters())

    causal = lm2vec.load(path, dtype="float32", bidirectional=False)  # what the wrapper computes from text alone
    batch = causal.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = wrapper(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    np.testing.assert_allclose(causal.encode(TEXTS), ((states * mask).sum(1) / mask.sum(1)).numpy(), atol=1e-5)

    vectors = encoder.encode(TEXTS)
    saved = encoder.save(tmp_path / "encoder")
    assert json.loads((saved / "config.json").read_text())["model_type"] == text_type
    np.testing.assert_array_equal(lm2vec.load(saved, dtype="float32").encode(TEXTS), vectors)
    lowered = lm2vec.load(path, dtype="int8")  # the text decoder's lowered weights, cached and read back alike
    np.testing.assert_array_equal(lm2vec.load(path, dtype="int8").encode(TEXTS), lowered.encode(TEXTS))
    assert list((tmp_path / "cache" / "lower").glob("int8-*.safetensors"))


def test_a_part_built_by_a_package_not_installed_is_a_load_error_naming_it(tmp_path: Path):
    """Gemma 3n's vision tower is a timm model: transformers builds it with the text decoder."""
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed: Gemma 3n builds")
    text = tiny_config("gemma3n_text", pad_token_id=3).to_dict()
    AutoConfig.for_model("gemma3n", text_config=text).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    save_file({"unread": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=f"(?s)cannot load the weights of {tmp_path}: .*pip install timm"):
        lm2vec.load(tmp_path)


@pytest.mark.parametrize("missing", ["./no/such/model", "/no/such/dir", "missing.gguf"])
def test_missing_sources(missing: str):
    with pytest.raises(ModelLoadError, match="not found"):
        lm2vec.load(missing)


@pytest.mark.parametrize("output_head", [True, False])
def test_a_gguf_file_keeps_its_own_output_head_and_a_tied_one_ties(
    output_head: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """An untied model's GGUF file has ``output.weight`` (MNTP trains against that head); a tied one's has none,
    which transformers reported as a MISSING weight "newly initialized" on every conversion (the built-in model's
    first load). A file lacking another weight is refused instead of converted with that weight at random."""
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))  # converted here, not found from an earlier run
    weights = tiny_gguf(tmp_path / "tiny.gguf", output_head)
    transformers_logger = logging.getLogger("transformers")  # its own handler; it does not propagate
    transformers_logger.addHandler(caplog.handler)
    try:
        folder = Path(resolve_source(tmp_path / "tiny.gguf").path)
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert "LOAD REPORT" not in caplog.text
    lm = AutoModelForCausalLM.from_pretrained(folder)
    assert lm.config.tie_word_embeddings is not output_head
    head = lm.get_output_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(lm.get_input_embeddings().weight.detach().numpy(), weights["token_embd"])
    np.testing.assert_array_equal(head, weights["output" if output_head else "token_embd"])
    lm2vec.load(tmp_path / "tiny.gguf", dtype="float32")  # and it loads as an encoder, its attention verified
    tiny_gguf(tmp_path / "broken.gguf", output_head, drop=("output_norm",))
    with pytest.raises(ModelLoadError, match=r"broken.gguf lacks 1 weight\(s\) of its llama model: \['model.norm"):
        resolve_source(tmp_path / "broken.gguf")


def test_hub_ids_are_left_to_from_pretrained():
    source = resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.path == "HuggingFaceTB/SmolLM2-135M-Instruct" and not source.local


# Two loads of a hub id in a fresh process (the Hugging Face cache and offline mode are read at import), then the
# same model from a folder of its own.
HUB_LOADS = """
import json, sys
import lm2vec
from lm2vec.loading.model import lower_cache_path
from lm2vec.loading.source import resolve_source
repo, folder, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
first = lm2vec.load(repo, dtype="int8")
variant = (True, first.pooling.value, "cpu")
cached = lower_cache_path(resolve_source(repo), variant, "int8")
again = lm2vec.load(repo, dtype="int8")
print(json.dumps({
    "pooling": first.pooling.value, "prompts": first.prompts, "dtype": again.dtype,
    "cached": str(cached) if cached and cached.is_file() else None,
    "same cache for the folder": lower_cache_path(resolve_source(folder), variant, "int8") == cached,
    "first": first.encode(texts).tolist(), "again": again.encode(texts).tolist(),
    "folder": lm2vec.load(folder, dtype="int8").encode(texts).tolist(),
}))
"""


def as_downloaded(folder: Path, repo: str, hub_cache: Path) -> None:
    """Lay ``folder`` out as the Hugging Face cache holds a downloaded hub model: ``refs/main`` naming a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    stored = hub_cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, stored / "snapshots" / commit)
    (stored / "refs").mkdir()
    (stored / "refs" / "main").write_text(commit)


def test_a_hub_model_keeps_its_saved_settings_and_caches_its_lowered_weights(tmp_path: Path):
    """A hub id is read from its snapshot in the Hugging Face cache (offline here; online, its JSON files are fetched
    first): the pooling and prompts an encoder was saved with apply as they do to its folder, and its int8 weights
    are cached like a folder's (the second load reads them back; the same files in a folder find the same cache)."""
    folder = tiny_encoder(pooling="weighted_mean", prompts={"query": "w5 w6 "}).save(tmp_path / "tiny")
    as_downloaded(folder, "lm2vec-tests/tiny", tmp_path / "hub")
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env["LM2VEC_CACHE"] = str(tmp_path / "cache")
    arguments = ["lm2vec-tests/tiny", str(folder), json.dumps(TEXTS)]
    run = subprocess.run([sys.executable, "-c", HUB_LOADS, *arguments], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["pooling"] == "weighted_mean" and result["prompts"] == {"query": "w5 w6 "}
    assert (
        result["dtype"] == "int8" and result["cached"] and Path(result["cached"]).parent == tmp_path / "cache" / "lower"
    )
    assert result["same cache for the folder"]
    np.testing.assert_array_equal(result["again"], result["first"])
    np.testing.assert_array_equal(result["folder"], result["first"])


def test_a_hub_models_snapshot_fetches_what_lm2vec_reads_itself_dense_weights_too():
    """Online, only the JSON files of a hub model were fetched: EmbeddingGemma's Dense weights were missing. Matched
    by huggingface_hub's own filter (what snapshot_download applies), over the files sentence-transformers writes."""
    from huggingface_hub.utils import filter_repo_objects

    from lm2vec.loading.source import HUB_FILES

    files = ["config.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"]
    files += ["3_Dense_1024/model.safetensors", "modules.json", "model.safetensors", "model-00001-of-00002.safetensors"]
    fetched = set(filter_repo_objects(files, allow_patterns=HUB_FILES))
    assert fetched == set(files) - {"model.safetensors", "model-00001-of-00002.safetensors"}  # from_pretrained's


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("not gguf", "does not start with the GGUF magic bytes.*truncated or damaged download"),
        ("truncated", "truncated or damaged download"),  # transformers: "cannot reshape array of size ..."
        (
            "gemma-embedding",
            "architecture gemma-embedding is not supported.*transformers converts GGUF files of .*llama",
        ),
    ],
)
def test_a_gguf_file_transformers_cannot_read_is_a_load_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str, named: str
):
    """transformers' raw ValueErrors ("cannot reshape array of size ...") named neither the file nor a way out."""
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    tiny_gguf(path, output_head=False, architecture="gemma-embedding" if damage == "gemma-embedding" else "llama")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
    elif damage == "not gguf":
        path.write_bytes(b"not a GGUF file" * 100)
    with pytest.raises(ModelLoadError, match=f"(?s)cannot read the GGUF file {re.escape(str(path))}: .*{named}"):
        lm2vec.load(path)
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-converted left to trust


def test_a_plain_file_is_not_a_model(tmp_path: Path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        lm2vec.load(tmp_path / "weights.txt")


def test_missing_config(tiny_dir: Path):
    (tiny_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        lm2vec.load(tiny_dir)


def test_pickle_weights_are_refused(tiny_dir: Path):
    weights = tiny_dir / "model.safetensors"
    weights.rename(tiny_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        lm2vec.load(tiny_dir)


def test_corrupt_weights(tiny_dir: Path):
    (tiny_dir / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        lm2vec.load(tiny_dir)


def test_truncated_weights(tiny_dir: Path):
    weights = tiny_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        lm2vec.load(tiny_dir)


@pytest.mark.parametrize("dtype", ["float32", "auto"])  # verification runs the model first; calibration does
def test_a_model_that_fails_when_run_is_named_with_its_attention_mode(dtype: str, tmp_path: Path):
    config = tiny_config("codegen", n_embd=64, n_head=4, n_layer=2, rotary_dim=64)  # rotary wider than a 16-wide head
    tiny_model(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match=r"codegen \(sdpa attention, bidirectional\) failed when first run: "
    ) as err:
        lm2vec.load(tmp_path, dtype=dtype)
    assert "RuntimeError: The size of tensor a" in str(err.value) and "bidirectional=False" in str(err.value)
    assert ("if it runs with dtype='float32', lm2vec's lower-precision layers (auto)" in str(err.value)) == (
        dtype == "auto"
    )
    with pytest.raises(ModelLoadError, match=r"codegen \(sdpa attention, causal\) failed when first run: Runtime"):
        lm2vec.load(tmp_path, dtype=dtype, bidirectional=False)


def test_a_device_or_prompts_that_cannot_be_used_are_refused_before_loading(tiny_dir: Path):
    bad = ["tpu9"] + ([] if torch.cuda.is_available() else ["cuda"])  # torch asserts on a build without CUDA
    for device in bad:
        with pytest.raises(ValueError, match=f"device '{device}' cannot be used here: "):
            lm2vec.load("no-such-model-folder", device=device)  # the device, not the missing folder
    for prompts in (["query: "], {"query": 3}):
        with pytest.raises(TypeError, match="prompts must map names to instructions"):
            lm2vec.load(tiny_dir, prompts=prompts)  # type: ignore[arg-type]


def test_an_own_output_head_is_not_reported_and_weights_the_checkpoint_lacks_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A causal LM with an untied output head (most 7B models): transformers reported its weights as UNEXPECTED on
    each first load. A checkpoint lacking a weight of the decoder loaded with that weight at random (transformers'
    report, then embeddings of noise); one of another shape raised a bare RuntimeError."""
    for model_type, base in (("llama", "model"), ("gpt_neox", "gpt_neox")):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(tiny_config(model_type, pad_token_id=3, tie_word_embeddings=False))
        lm.save_pretrained(tmp_path / model_type)
        tiny_tokenizer().save_pretrained(tmp_path / model_type)
        ignored = type(lm.base_model)._keys_to_ignore_on_load_unexpected
        transformers_logger = logging.getLogger("transformers")  # its own handler; it does not propagate unless
        transformers_logger.addHandler(caplog.handler)  # another library (Ray) turned propagation on: then the
        caplog.clear()  # reports of the last round's broken checkpoints were caught too
        try:
            lm2vec.load(tmp_path / model_type, dtype="float32")
        finally:
            transformers_logger.removeHandler(caplog.handler)
        assert "LOAD REPORT" not in caplog.text
        assert type(lm.base_model)._keys_to_ignore_on_load_unexpected == ignored  # the class is left as it was
        weights = load_file(tmp_path / model_type / "model.safetensors")
        norm = next(key for key in weights if key.startswith(base) and "norm" in key and key.count(".") == 2)
        broken = tmp_path / f"{model_type}-broken"
        shutil.copytree(tmp_path / model_type, broken)
        save_file({k: v for k, v in weights.items() if k != norm}, broken / "model.safetensors")
        lacking = f"lacks 1 weight\\(s\\) of the {model_type} model \\({norm.removeprefix(base + '.')}\\)"
        with pytest.raises(ModelLoadError, match=lacking):
            lm2vec.load(broken, dtype="float32")
        save_file(weights | {norm: torch.ones(7)}, broken / "model.safetensors")
        with pytest.raises(ModelLoadError, match="cannot load the weights of .*ignore_mismatched_sizes"):
            lm2vec.load(broken, dtype="float32")


@pytest.mark.parametrize("pooling", ["lasttoken", "mean"])
def test_a_decoder_embedding_model_saved_by_sentence_transformers_gives_its_vectors(tmp_path: Path, pooling: str):
    """The layout of Qwen3-Embedding, gte-Qwen2-instruct, e5-mistral: Transformer + Pooling + Normalize, a causal
    model (no is_causal in config.json), prompts pooled with the text (sentence-transformers' default). The Normalize
    module was refused by name, and a directory without is_causal ran bidirectional: other vectors than its own."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", pad_token_id=3)).save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    modules = [models.Transformer(str(tmp_path / "lm")), models.Pooling(64, pooling_mode=pooling), models.Normalize()]
    model = SentenceTransformer(modules=modules, prompts={"query": "w9 w10 w11 "}, device="cpu")
    model.save(str(tmp_path / "st"))
    texts = random_texts(6, seed=3)
    expected = {name: model.encode(texts, prompt_name=name) for name in (None, "query")}
    encoder = lm2vec.load(tmp_path / "st", dtype="float32")
    assert not encoder.bidirectional and encoder.normalize and encoder.include_prompt
    for name, vectors in expected.items():
        np.testing.assert_allclose(encoder.encode(texts, prompt_name=name), vectors, atol=1e-5)
    saved = encoder.save(tmp_path / "again")  # the same modules again: sentence-transformers reads the same vectors
    again = SentenceTransformer(str(saved), device="cpu").encode(texts, prompt_name="query")
    np.testing.assert_allclose(again, expected["query"], atol=1e-5)
    assert lm2vec.load(saved, dtype="float32").info()["normalize"]


def _st_with_dense(folder: Path, model_type: str, residual: bool) -> tuple[Any, Path]:
    """A sentence-transformers model with Dense modules: EmbeddingGemma's layout (a bidirectional Gemma 3 by its own
    switch, mean pooling, 64 -> 96 -> 32 without bias, Normalize) or a causal llama with a residual projection."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    config = tiny_config(model_type, pad_token_id=3)
    if model_type == "gemma3_text":
        config.use_bidirectional_attention = True  # and no is_causal: EmbeddingGemma's config.json
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "lm")
    tiny_tokenizer().save_pretrained(folder / "lm")
    modules = [
        models.Transformer(str(folder / "lm")),
        models.Pooling(64, pooling_mode="mean"),
        models.Dense(64, 96, bias=False, activation_function=torch.nn.Identity()),
        models.Dense(96, 32, activation_function=torch.nn.GELU()),
    ]
    if residual:
        modules.append(models.Dense(32, 32, activation_function=torch.nn.Tanh(), use_residual=True))
    model = SentenceTransformer(modules=[*modules, models.Normalize()], prompts={"query": "w9 w10 "}, device="cpu")
    model.save(str(folder / "st"))
    return model, folder / "st"


@pytest.mark.parametrize(("model_type", "residual"), [("gemma3_text", False), ("llama", True)])
def test_dense_modules_and_an_architectures_own_bidirectional_switch_give_sentence_transformers_vectors(
    tmp_path: Path, model_type: str, residual: bool
):
    """EmbeddingGemma, stella: Dense modules after the pooling were refused by name; EmbeddingGemma's config says
    ``use_bidirectional_attention: true`` (no is_causal), which lm2vec read as causal and ran causal."""
    from sentence_transformers import SentenceTransformer

    model, folder = _st_with_dense(tmp_path, model_type, residual)
    texts = random_texts(6, seed=4)
    encoder = lm2vec.load(folder, dtype="float32")
    assert encoder.bidirectional is (model_type == "gemma3_text") and encoder.dim == 32 and encoder.normalize
    assert encoder.info()["dense"] == "64 -> 96 -> 32" + (" -> 32" if residual else "")
    for name in (None, "query"):
        np.testing.assert_allclose(
            encoder.encode(texts, prompt_name=name), model.encode(texts, prompt_name=name), atol=1e-5
        )
    single = np.stack([encoder.encode(text) for text in texts])  # a text's bits do not depend on its batch
    np.testing.assert_array_equal(single, encoder.encode(texts))
    (chunks,) = encoder.late_chunks([texts[0]], spans=[[(0, len(texts[0]))]])  # one chunk: the text's embedding
    np.testing.assert_allclose(chunks.embeddings[0], encoder.encode(texts[0], normalize_embeddings=False), atol=1e-5)
    saved = encoder.save(tmp_path / "again")  # the same modules again: sentence-transformers reads the same vectors
    again = SentenceTransformer(str(saved), device="cpu").encode(texts, prompt_name="query")
    np.testing.assert_allclose(again, model.encode(texts, prompt_name="query"), atol=1e-5)
    reloaded = lm2vec.load(saved, dtype="float32")
    assert reloaded.bidirectional is encoder.bidirectional and reloaded.fingerprint() == encoder.fingerprint()


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (lambda c: c | {"activation_function": "builtins.print"}, "activation 'builtins.print' is not a torch.nn"),
        (lambda c: c | {"activation_function": "torch.nn.modules.linear.Linear"}, "is not a torch.nn activation"),
        (lambda c: c | {"activation_function": "torch.nn.nosuch.Tanh"}, "is not a torch.nn activation"),
        (lambda c: c | {"module_input_name": "token_embeddings"}, "a Dense module on module_input_name"),
        (lambda c: c | {"out_features": 48}, "(?s)cannot load the Dense weights .*size mismatch"),
        (lambda c: {"bias": False}, "not a Dense module's configuration"),
    ],
)
def test_dense_modules_lm2vec_cannot_read_safely_or_exactly_are_refused(tmp_path: Path, change, refused: str):
    _, folder = _st_with_dense(tmp_path, "llama", residual=False)
    _edit_json(folder / "3_Dense" / "config.json", change)
    with pytest.raises(ModelLoadError, match=refused):
        lm2vec.load(folder, dtype="float32")


def test_dense_weights_only_as_a_pickle_and_modules_in_another_order_are_refused(tmp_path: Path):
    _, folder = _st_with_dense(tmp_path, "llama", residual=False)
    torch.save(load_file(folder / "2_Dense" / "model.safetensors"), folder / "2_Dense" / "pytorch_model.bin")
    (folder / "2_Dense" / "model.safetensors").rename(folder / "2_Dense" / "elsewhere")
    with pytest.raises(ModelLoadError, match="2_Dense has no model.safetensors: lm2vec reads safetensors only"):
        lm2vec.load(folder, dtype="float32")
    _edit_json(folder / "modules.json", lambda modules: [modules[0], modules[1], modules[4], modules[2], modules[3]])
    with pytest.raises(ModelLoadError, match="in the order Transformer \\+ Pooling \\+ Normalize \\+ Dense"):
        lm2vec.load(folder, dtype="float32")
    tiny = tiny_encoder()
    with pytest.raises(
        ValueError, match="the Dense modules take 48 -> 8 features; they must chain from the model's 64"
    ):
        lm2vec.Encoder(tiny.model, tiny.tokenizer, dense=(Dense(48, 8),))


def test_what_sentence_transformers_does_to_texts_beyond_lm2vec_is_refused_and_its_length_read(tmp_path: Path):
    """sentence-transformers >= 6 renders texts through the tokenizer's chat template where it has one (every
    instruct model) and keeps the length in the tokenizer, not in its own config: such a model gave other vectors
    than sentence-transformers' and the 512 default."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", pad_token_id=3)).save_pretrained(tmp_path / "lm")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}w9 {{ m['content'] }} w10{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "lm")
    pooling = models.Pooling(64, pooling_mode="mean")
    SentenceTransformer(modules=[models.Transformer(str(tmp_path / "lm")), pooling], device="cpu").save(
        str(tmp_path / "chat")
    )
    with pytest.raises(ModelLoadError, match="renders each text through the tokenizer's chat template"):
        lm2vec.load(tmp_path / "chat")
    text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    transformer = models.Transformer(
        str(tmp_path / "lm"), max_seq_length=24, modality_config=text_only, module_output_name="token_embeddings"
    )
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    model.save(str(tmp_path / "text"))
    encoder = lm2vec.load(tmp_path / "text", dtype="float32")
    assert encoder.max_length == 24
    texts = random_texts(4, seed=6, max_words=40)  # some past 24 tokens: cut where sentence-transformers cuts
    np.testing.assert_allclose(encoder.encode(texts), model.encode(texts), atol=1e-5)
    _edit_json(tmp_path / "text" / "sentence_bert_config.json", lambda config: config | {"do_lower_case": True})
    with pytest.raises(ModelLoadError, match="lower-cases texts"):
        lm2vec.load(tmp_path / "text")


def test_missing_tokenizer(tiny_dir: Path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_dir / name).unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        lm2vec.load(tiny_dir)


def test_remote_code_never_runs_unless_asked(tiny_dir: Path, tmp_path: Path):
    marker = tmp_path / "ran"
    (tiny_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((tiny_dir / "config.json").read_text())
    config["model_type"] = "evil-custom"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot read the config"):
        lm2vec.load(tiny_dir)
    for said_no in ("no", "false", 0):  # truthy strings asked transformers to run the code
        with pytest.raises(TypeError, match=f"trust_remote_code must be True or False, got {said_no!r}"):
            lm2vec.load(tiny_dir, trust_remote_code=said_no)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="trust_remote_code must be True or False"):
            train_mntp(str(tiny_dir), MNTPConfig(), tmp_path / "mntp", trust_remote_code=said_no)  # type: ignore[arg-type]
    assert not marker.exists()


def test_a_switch_given_as_a_string_is_refused(tiny_dir: Path):
    """``bidirectional="no"`` was taken as True, then failed verification with an indirect message."""
    for name in ("bidirectional", "verify"):
        with pytest.raises(TypeError, match=f"{name} must be True or False, got 'no'"):
            lm2vec.load(tiny_dir, **{name: "no"})
    encoder = lm2vec.load(tiny_dir)
    with pytest.raises(TypeError, match="bidirectional must be True or False, got 'False'"):
        lm2vec.Encoder(encoder.model, encoder.tokenizer, bidirectional="False")  # type: ignore[arg-type]


def test_chatml_special_tokens_are_fixed():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_start|>"
    tokenizer.pad_token = None
    fixed = fix_special_tokens(tokenizer)
    assert fixed.eos_token == "<|im_end|>" and fixed.pad_token == "<|im_end|>"


def test_max_length_follows_a_short_model(tiny_dir: Path):
    enc = lm2vec.load(tiny_dir, max_length=None)
    assert enc.max_length == 64  # the saved setting
    long_text = " ".join(["w5"] * 500)
    assert np.isfinite(enc.encode(long_text)).all()


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, "max"),
        ({"pooling_mode_mean_tokens": False, "pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len_tokens"),
        ({"pooling_mode_cls_token": True}, "cls \\+ mean"),  # two modes: sentence-transformers concatenates them
        ({"pooling_mode": "max"}, "max"),
    ],
)
def test_pooling_lm2vec_cannot_reproduce_is_refused_by_name(tiny_dir: Path, keys: dict, named: str):
    assert lm2vec.load(tiny_dir).pooling.value == "mean"  # the saved directory loads as it is
    _edit_json(tiny_dir / "1_Pooling" / "config.json", lambda config: config | keys)
    with pytest.raises(ModelLoadError, match=f"pooling mode {named} cannot be reproduced"):
        lm2vec.load(tiny_dir)


def test_modules_lm2vec_cannot_reproduce_are_refused_by_name(tiny_dir: Path):
    layer_norm = {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    normalize = {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}
    _edit_json(tiny_dir / "modules.json", lambda modules: [*modules, layer_norm, normalize])
    with pytest.raises(ModelLoadError, match="cannot reproduce: sentence_transformers.models.LayerNorm \\(lm2vec"):
        lm2vec.load(tiny_dir)  # Normalize it runs


@pytest.mark.parametrize(
    ("file", "content", "named"),
    [
        ("config_sentence_transformers.json", {"prompts": ["query: "]}, "prompts must map names to instructions"),
        ("config_sentence_transformers.json", {"prompts": {"q": 3}}, "prompts must map names to instructions"),
        ("config_sentence_transformers.json", {"default_prompt_name": "q"}, "default_prompt_name 'q' is not one of"),
        ("sentence_bert_config.json", {"max_seq_length": "long"}, "max_seq_length must be a positive whole number"),
        ("1_Pooling/config.json", ["mean"], "expected a JSON object, got list"),
        ("1_Pooling/config.json", {"pooling_mode": 3}, "pooling_mode must be a mode's name or a list of them"),
        ("lm2vec_config.json", {"matryoshka_dims": "64"}, "matryoshka_dims must be a list of positive whole"),
        ("lm2vec_config.json", {"reference_style": "yes"}, "reference_style is not lm2vec's"),
    ],
)
def test_settings_files_of_the_wrong_shape_are_load_errors_naming_the_file(
    tiny_dir: Path, file: str, content: object, named: str
):
    """Each was a bare ValueError, TypeError or AttributeError from deep inside ("dictionary update sequence element
    #0 has length 1; 2 is required"), naming no file; matryoshka_dims "64" loaded as the dimensions 6 and 4."""
    (tiny_dir / file).write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(tiny_dir / file))}: {named}"):
        lm2vec.load(tiny_dir)


def test_matryoshka_dims_past_the_embeddings_width_are_refused():
    with pytest.raises(ValueError, match=r"matryoshka_dims \[32, 999\] must lie in 1..64 \(the embedding.s"):
        tiny_encoder(matryoshka_dims=(32, 999))


def test_sentence_transformers_pooling_names_are_read(tiny_dir: Path):
    """The newer single ``pooling_mode`` key selects the same modes as the legacy boolean keys."""
    legacy = {key: False for key in json.loads((tiny_dir / "1_Pooling" / "config.json").read_text()) if "mode" in key}
    _edit_json(tiny_dir / "1_Pooling" / "config.json", lambda config: config | legacy | {"pooling_mode": "lasttoken"})
    assert lm2vec.load(tiny_dir).pooling.value == "last_token"
