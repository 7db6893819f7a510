"""ONNX export with pooling, run in ONNX Runtime: the same embeddings as PyTorch, any batch and padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lm2vec.cli import main
from lm2vec.dense import Dense
from lm2vec.onnx_backend import export_onnx, onnx_encoder
from lm2vec.quantization import lower_precision
from tests.support import random_texts, tiny_encoder

TEXTS = random_texts(30, seed=7, max_words=40)


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last_token"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_onnx_runtime_matches_pytorch(tmp_path: Path, pooling: str, padding_side: str):
    encoder = tiny_encoder(pooling=pooling, padding_side=padding_side, prompts={"query": "w5 w6 "})
    path = export_onnx(encoder, tmp_path / "model.onnx")
    assert path.is_file() and not list(tmp_path.glob("*.partial"))
    runtime = onnx_encoder(encoder, path)
    for kwargs in ({}, {"prompt_name": "query"}, {"batch_size": 3}):
        np.testing.assert_allclose(runtime.encode(TEXTS, **kwargs), encoder.encode(TEXTS, **kwargs), atol=1e-3)
    assert runtime.encode(TEXTS[0]).shape == (64,)


@pytest.mark.parametrize("model_type", ["gemma2", "gpt2", "mistral", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_other_architectures_export(tmp_path: Path, model_type: str):
    """Eager attention, Conv1D layers, sliding windows, and mixture-of-experts models, whose experts export as
    transformers' batched_mm (torch.onnx converts neither the default grouped product nor the loop over the experts
    tokens chose). All 22 architectures exported when this test was written (5 s each: a sample runs here)."""
    encoder = tiny_encoder(model_type)
    experts = getattr(encoder.model.config, "_experts_implementation", None)
    runtime = onnx_encoder(encoder, export_onnx(encoder, tmp_path / "model.onnx"))
    assert getattr(encoder.model.config, "_experts_implementation", None) == experts  # put back after export
    np.testing.assert_allclose(runtime.encode(TEXTS, batch_size=8), encoder.encode(TEXTS), atol=1e-4)


def test_dense_modules_and_gemma3s_own_bidirectional_switch_export(tmp_path: Path):
    """The Dense modules are in the graph (their weights with it), and Gemma 3 bidirectional by its own switch (its
    sliding window, 4 tokens here, kept both ways) exports with the states PyTorch gives, texts longer than it too."""
    torch.manual_seed(0)
    base = tiny_encoder("gemma3_text")
    dense = (Dense(64, 96, bias=False, activation=torch.nn.Identity()), Dense(96, 32, activation=torch.nn.GELU()))
    encoder = base.with_model(base.model, dense=dense)
    runtime = onnx_encoder(encoder, export_onnx(encoder, tmp_path / "model.onnx"))
    np.testing.assert_allclose(runtime.encode(TEXTS, batch_size=8), encoder.encode(TEXTS), atol=1e-4)
    assert runtime.encode(TEXTS[0]).shape == (32,)


def test_only_float32_exports(tmp_path: Path):
    encoder = tiny_encoder()
    lower_precision(encoder.model, "int8")
    with pytest.raises(ValueError, match="export a float32 encoder"):
        export_onnx(encoder, tmp_path / "q.onnx")


def test_cli_encode_with_onnx_backend(tiny_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "in.txt").write_text("\n".join(TEXTS[:5]) + "\n")
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.npy"
        args = ["encode", str(tiny_dir), str(tmp_path / "in.txt"), "-o", str(out), "--backend", backend]
        assert main([*args, "--dtype", "float32"]) == 0  # the same precision: the default may lower the torch one
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "torch.npy"), atol=1e-3)
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1
