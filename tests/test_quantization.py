"""int8 inference: per-token int8 linear layers, exact integer products, and what loading with dtype="int8" does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lm2vec
from lm2vec.evaluation import cosine_rows
from lm2vec.loading.model import int8_cache_path
from lm2vec.loading.source import resolve_source
from lm2vec.quantization import LINEAR, Int8Linear, first_block, quantize_int8, quantize_rows
from tests.support import random_texts, tiny_encoder

TEXTS = random_texts(24, seed=3)


@pytest.mark.parametrize("shape", [(1, 64, 96), (5, 7, 3), (40, 576, 192)])
def test_int8_linear_is_close_to_the_float_layer(shape: tuple[int, int, int]):
    rows, inputs, outputs = shape
    torch.manual_seed(0)
    linear = torch.nn.Linear(inputs, outputs)
    x = torch.randn(rows, inputs)
    x[0, 0] = 50.0  # an outlier channel in one token: per-token scales keep the other rows precise
    exact, approx = linear(x), Int8Linear(linear)(x)
    relative = (approx - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 0.05, relative
    if rows > 1:
        assert relative[1:].max() < 0.02


def test_quantize_rows_round_trips_within_half_a_step():
    x = torch.randn(6, 33) * torch.arange(1, 7)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-6).all()


def test_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    layer = Int8Linear(torch.nn.Linear(64, 48))
    x = torch.randn(37, 64) * 10
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)


def test_quantized_encoder_batch_invariant_and_close_to_float():
    float_encoder = tiny_encoder()
    int8 = tiny_encoder()
    quantize_int8(int8.model)
    assert int8.dtype == "int8" and float_encoder.dtype == "float32"
    layers = int8.model.config.num_hidden_layers
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 7 * (layers - 1)
    kept = [name for name, m in int8.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(kept) == 7 and all(name.startswith("layers.0.") for name in kept)  # the first block stays float
    together = int8.encode(TEXTS, batch_size=8)
    np.testing.assert_array_equal(together, np.stack([int8.encode(t) for t in TEXTS]))
    cosine = cosine_rows(together, float_encoder.encode(TEXTS))
    assert cosine.min() > 0.99, cosine.min()


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2"])
def test_every_linear_layer_or_the_first_block_whatever_the_architecture(model_type: str):
    encoder = tiny_encoder(model_type)
    model, texts = encoder.model, random_texts(6, seed=4)
    before = encoder.encode(texts)
    everything = sum(isinstance(m, LINEAR) for m in model.modules())
    first = first_block(model)
    assert first in ("h.0.", "layers.0.")
    in_first = sum(isinstance(m, LINEAR) for n, m in model.named_modules() if f"{n}.".startswith(first))
    quantize_int8(model, skip=())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == everything and in_first > 0
    assert cosine_rows(encoder.encode(texts), before).min() > 0.98


def test_int8_encoder_refuses_to_save(tmp_path: Path):
    enc = tiny_encoder()
    quantize_int8(enc.model)
    with pytest.raises(ValueError, match="int8 encoders are quantized when loaded"):
        enc.save(tmp_path / "q")


def test_load_with_int8_and_auto(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    int8 = lm2vec.load(tiny_dir, dtype="int8")
    assert int8.dtype == "int8" and int8.info()["dtype"] == "int8"
    reference = lm2vec.load(tiny_dir)
    cosine = cosine_rows(int8.encode(TEXTS), reference.encode(TEXTS))
    assert cosine.min() > 0.99
    auto = lm2vec.load(tiny_dir, dtype="auto")
    cpu_flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    assert auto.dtype in ("float32", "bfloat16")
    if not {"amx_bf16", "avx512_bf16"} & set(cpu_flags):  # emulated bf16 is slower than fp32: never chosen
        assert auto.dtype == "float32"
    assert cosine_rows(auto.encode(TEXTS), reference.encode(TEXTS)).min() > 0.99
    with pytest.raises(ValueError, match="int8, auto"):
        lm2vec.load(tiny_dir, dtype="int4")


def test_nothing_to_quantize():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_int8(torch.nn.Sequential(torch.nn.ReLU()))


def test_int8_weights_are_cached_and_reload_bit_identical(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    first = lm2vec.load(tiny_dir, dtype="int8")
    cached = int8_cache_path(resolve_source(tiny_dir))
    assert cached.is_file() and not list(cached.parent.glob("*.partial"))
    again = lm2vec.load(tiny_dir, dtype="int8")  # built empty, weights from the cache
    assert again.dtype == "int8" and again.bidirectional
    np.testing.assert_array_equal(again.encode(TEXTS), first.encode(TEXTS))
    causal = lm2vec.load(tiny_dir, dtype="int8", bidirectional=False)  # the same cache; verify() proves causal
    assert not causal.bidirectional and cosine_rows(causal.encode(TEXTS), first.encode(TEXTS)).min() < 0.999

    cached.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="rebuilding the unreadable int8 cache"):
        rebuilt = lm2vec.load(tiny_dir, dtype="int8")
    np.testing.assert_array_equal(rebuilt.encode(TEXTS), first.encode(TEXTS))
    assert cached.stat().st_size > 1000  # written again

    weights = tiny_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # new mtime: the key changes, the stale cache is not used
    assert int8_cache_path(resolve_source(tiny_dir)) != cached


def test_int8_loads_where_the_cache_cannot_be_written(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("LM2VEC_CACHE", str(blocked / "cache"))
    with pytest.warns(UserWarning, match="int8 weights not cached"):
        encoder = lm2vec.load(tiny_dir, dtype="int8")
    assert encoder.dtype == "int8" and encoder.encode(TEXTS).shape == (len(TEXTS), encoder.dim)
