"""Test support: tiny random decoders built from transformers config classes (hidden 64, 2 layers), tokenizers
over their vocabulary, small encoders and data helpers. Imported as ``tests.support``; fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMultimodalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING

import lm2vec
from lm2vec.loading.model import default_attn_implementation

VOCAB = 128

# model_type -> extra config kwargs beyond the common tiny sizes.
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4},
    "qwen2": {},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 4},
    "gemma3_text": {"head_dim": 16, "sliding_window": 6},  # built bidirectional: 4, as the others' (halved + 1)
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "starcoder2": {"sliding_window": 4},
    "stablelm": {},
    "gpt_neox": {},
    "cohere": {},
    "phi": {},
    "olmo": {},
    "glm": {"head_dim": 16},
    "smollm3": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "gptj": {"rotary_dim": 8},  # its MLP opens with fc_in
    "falcon": {},  # its FalconLinear layers: an nn.Linear subclass, written as states @ weight.T
    "modernbert-decoder": {"cls_token_id": 1, "sep_token_id": 2},  # Ettin's decoders; SDPA only
    "nemotron": {},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 4},
}


MAMBA2 = {"mamba_d_state": 16, "mamba_chunk_size": 16}  # tiny state-space sizes
# Hybrid decoders, as transformers builds them: blocks that mix tokens without attention (a short convolution, linear
# attention, a state-space layer), and blocks that mix none (MLP-only). Per type: the settings that give its block
# layout, and the blocks that stay causal.
HYBRIDS = {
    "lfm2": ({"layer_types": ["conv", "full_attention", "conv", "full_attention"]}, [0, 2]),
    "minimax": ({"layer_types": ["linear_attention", "full_attention"] * 2}, [0, 2]),  # lightning attention
    "qwen3_5_text": ({"layer_types": ["linear_attention", "full_attention"] * 2}, [0, 2]),
    "nemotron_h": (
        {
            "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
            "mamba_num_heads": 8,
            "mamba_head_dim": 8,
            "ssm_state_size": 16,
            "chunk_size": 16,
            "moe_intermediate_size": 32,
            "moe_shared_expert_intermediate_size": 32,
        },
        [0],
    ),
    "jamba": (
        dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, num_experts=4, mamba_d_state=8),
        [0, 2],
    ),
    "bamba": (dict(attn_layer_indices=[1, 3], mamba_n_heads=16, mamba_d_head=8, **MAMBA2), [0, 2]),
    "granitemoehybrid": (
        dict(layer_types=["mamba", "attention"] * 2, mamba_n_heads=16, mamba_d_head=8, **MAMBA2),
        [0, 2],
    ),
    "zamba2": (
        dict(layers_block_type=["mamba", "hybrid"] * 2, mamba_headdim=16, n_mamba_heads=8, chunk_size=16),
        [0, 2],
    ),
    "qwen3_next": (
        dict(layer_types=["linear_attention", "full_attention"] * 2, num_experts=4, num_experts_per_tok=2),
        [0, 2],
    ),
    "lfm2_moe": (dict(layer_types=["conv", "full_attention"] * 2, num_experts=4, moe_intermediate_size=32), [0, 2]),
}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(ARCHITECTURES.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


# Multimodal models as the hub ships Gemma 3 4B+, Llava and Qwen2-VL: a tiny vision tower (2x2 patches of a 28-pixel
# image) around a tiny text decoder. Per type: its text type and settings, vision config, and the model's settings.
MULTIMODAL: dict[str, tuple[str, dict, dict, dict]] = {
    "gemma3": (
        "gemma3_text",
        {},
        dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64),
        dict(mm_tokens_per_image=4),
    ),
    "llava": ("llama", {}, dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64), {}),
    "qwen2_vl": (
        "qwen2_vl_text",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),  # half a head
        dict(embed_dim=32, hidden_size=64, num_heads=2),
        {},
    ),
}


def save_multimodal(path: Path, model_type: str) -> Path:
    """A tiny random multimodal model (its LM head included) with its tokenizer, saved as a user's model directory."""
    text_type, text_settings, vision, settings = MULTIMODAL[model_type]
    text = tiny_config(text_type, pad_token_id=3, tie_word_embeddings=True, **text_settings)
    vision = dict(vision, num_hidden_layers=2, num_attention_heads=2, depth=2, image_size=28, patch_size=14)
    config = AutoConfig.for_model(model_type, text_config=text.to_dict(), vision_config=vision, **settings)
    torch.manual_seed(0)
    AutoModelForMultimodalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModel.from_config(config).eval()


WORDS = [f"w{i}" for i in range(4, VOCAB)]


def tiny_tokenizer(padding_side: str = "right", bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: 'w4 w17 w9' -> [4, 17, 9] (BOS 1 first if asked)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {w: i for i, w in enumerate(WORDS, start=4)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],  # as Llama's: no token_type_ids
    )


def has_sdpa(model_type: str) -> bool:
    """Whether transformers offers SDPA attention for this architecture (not for Gemma 2 or GPT-OSS)."""
    return bool(MODEL_MAPPING[CONFIG_MAPPING[model_type]]._supports_sdpa)


def default_attention(model_type: str) -> str:
    """What ``lm2vec.load`` picks (eager where SDPA stays causal), named: else SDPA where transformers has it."""
    return default_attn_implementation(model_type) or ("sdpa" if has_sdpa(model_type) else "eager")


def tiny_encoder(
    model_type: str = "llama", pooling: str = "mean", padding_side: str = "right", bos: bool = False, **kw
) -> lm2vec.Encoder:
    attention = kw.pop("attn_implementation", default_attention(model_type))
    config = tiny_config(model_type, pad_token_id=3, attn_implementation=attention)
    lm2vec.set_bidirectional(config, kw.get("bidirectional", True))
    tokenizer = tiny_tokenizer(padding_side, bos)
    return lm2vec.Encoder(tiny_model(config), tokenizer, pooling=pooling, **{"max_length": 64} | kw)


def word_encoder(sentences: list[str]) -> lm2vec.Encoder:
    """A tiny random bidirectional model with a real (lower-cased word-level) tokenizer over ``sentences``."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w.lower() for s in sentences for w, _ in pre.pre_tokenize_str(s)})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {w: i for i, w in enumerate(words, start=4)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = normalizers.Lowercase(), pre
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = lm2vec.set_bidirectional(tiny_config("llama", vocab_size=len(vocab), pad_token_id=3))
    return lm2vec.Encoder(tiny_model(config), tokenizer, max_length=64)


def needs_data(*paths: str) -> pytest.MarkDecorator:
    """Skip unless these files exist under the shared data folder (``LM2VEC_DATA``), naming the first missing."""
    from lm2vec.datafiles import data_dir

    missing = [data_dir() / p for p in paths if not (data_dir() / p).is_file()]
    reason = f"{missing[0]} not found: set LM2VEC_DATA to the shared data folder" if missing else ""
    return pytest.mark.skipif(bool(missing), reason=reason)


def tiny_gguf(
    path: Path, output_head: bool, drop: tuple[str, ...] = (), architecture: str = "llama"
) -> dict[str, np.ndarray]:
    """A tiny llama GGUF file (hidden 64, 2 layers, float32) with or without its own ``output.weight`` (an untied or
    a tied model), without the tensors named in ``drop``; returns its embedding and output weights. Its tokenizer:
    the built-in model's first 512 tokens and the merges among them (a real byte-level BPE, read fast)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from lm2vec.loading.source import builtin_gguf_path

    hidden, ffn, heads, kv_heads, layers = 64, 128, 4, 2, 2
    builtin = GGUFReader(builtin_gguf_path())
    vocab = 512
    tokens = builtin.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    merges = [
        m for m in builtin.fields["tokenizer.ggml.merges"].contents() if {*m.split(" "), m.replace(" ", "")} <= kept
    ]
    small = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges}
    small["tokenizer.ggml.token_type"] = builtin.fields["tokenizer.ggml.token_type"].contents()[:vocab]
    writer = GGUFWriter(str(path), architecture)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(hidden // heads)
    add = {GGUFValueType.ARRAY: writer.add_array, GGUFValueType.STRING: writer.add_string}
    add |= {GGUFValueType.BOOL: writer.add_bool, GGUFValueType.UINT32: writer.add_uint32}
    for key, field in builtin.fields.items():
        if key.startswith("tokenizer."):
            add[field.types[0]](key, small.get(key, field.contents()))
    rng = np.random.default_rng(0)
    weights = {"token_embd": rng.normal(0, 0.02, (vocab, hidden))}
    if output_head:
        weights["output"] = rng.normal(0, 0.02, (vocab, hidden))
    weights["output_norm"] = np.ones(hidden)
    kv = hidden // heads * kv_heads
    shapes = {
        "attn_q": (hidden, hidden),
        "attn_k": (kv, hidden),
        "attn_v": (kv, hidden),
        "attn_output": (hidden, hidden),
    }
    shapes |= {"ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    for i in range(layers):
        weights |= {f"blk.{i}.{name}": rng.normal(0, 0.02, shape) for name, shape in shapes.items()}
        weights |= {f"blk.{i}.attn_norm": np.ones(hidden), f"blk.{i}.ffn_norm": np.ones(hidden)}
    for name, weight in weights.items():
        if name not in drop:
            writer.add_tensor(f"{name}.weight", weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: weights[name].astype(np.float32) for name in ("token_embd", "output") if name in weights}


def random_texts(n: int, seed: int = 0, max_words: int = 20) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record_encode_calls(monkeypatch: pytest.MonkeyPatch, encoder: lm2vec.Encoder) -> list[tuple[list[str], np.ndarray]]:
    """Record (texts, embeddings) of each ``encoder.encode`` call, which still runs for real."""
    encode, calls = encoder.encode, []

    def recording_encode(sentences, **kwargs):
        calls.append((list(sentences), embeddings := encode(sentences, **kwargs)))
        return embeddings

    monkeypatch.setattr(encoder, "encode", recording_encode)
    return calls


class TableEncoder:
    """Looks texts up in a table of vectors and records each call."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table, self.calls = table, []

    def encode(self, sentences, *, instruction=None, batch_size=32, show_progress_bar=None) -> np.ndarray:
        self.calls.append((list(sentences), instruction))
        return np.array([self.table[s] for s in sentences], dtype=np.float32)


class BagOfWords:
    """A stand-in encoder: counts of the tiny vocabulary's words, so equal texts embed equally; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.column = {word: i for i, word in enumerate(WORDS)}

    def encode(self, sentences, *, instruction=None, batch_size=32, show_progress_bar=None) -> np.ndarray:
        self.calls.append((list(sentences), instruction))
        vectors = np.zeros((len(sentences), len(WORDS)), dtype=np.float32)
        for row, sentence in enumerate(sentences):
            for word in sentence.split():
                vectors[row, self.column[word]] += 1
        return vectors


CLI = Path(sys.executable).with_name("lm2vec")


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """The installed ``lm2vec`` console script, run as a user would."""
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


# The server, for real: uvicorn on a free loopback port.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(encoder: lm2vec.Encoder, **settings) -> Iterator[str]:
    """A real uvicorn server in a thread; yields its base URL and stops it afterwards."""
    import uvicorn

    from lm2vec.server import ServerSettings, create_app

    port = free_port()
    config = uvicorn.Config(
        create_app(encoder, ServerSettings(model_name="tiny", **settings)), port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def call(url: str, body: bytes | dict | None = None, headers: dict | None = None, timeout: float = 30):
    """GET (no body) or POST (JSON): the status, the headers (case-insensitive) and the body (parsed if JSON)."""
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        response = err
    with response:
        content = response.read()
        kind = response.headers.get("content-type", "")
        return response.status, response.headers, json.loads(content) if "json" in kind else content.decode()


def post(url: str, body: bytes | dict, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    status, _, reply = call(url, body, headers, timeout)
    return status, reply


def get(url: str, timeout: float = 30) -> tuple[int, dict]:
    status, _, reply = call(url, timeout=timeout)
    return status, reply
