"""ONNX export of an encoder (the bidirectional model, its pooling and Dense modules in one graph) and an ONNX
Runtime backend.

The graph takes the batches ``Encoder.encode`` builds (``input_ids``, ``attention_mask``, ``pool_mask``; any
batch size and length) and returns ``sentence_embedding``, so other runtimes need only the tokenizer and
these three inputs. :class:`OnnxEncoder` is an :class:`~lm2vec.Encoder` whose forward pass runs the graph in
ONNX Runtime: same tokenization, batching, instructions and output options.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .cache import atomic_write, cache_dir
from .encoder import Encoder
from .experts import experts_implementation
from .inputs import Batch

INPUTS = ("input_ids", "attention_mask", "pool_mask")
OUTPUT = "sentence_embedding"


class _EncoderGraph(nn.Module):
    """What is exported: ``Encoder.forward`` (model, position ids from the mask, pooling, Dense modules) on three
    tensors."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.model, self.encoder = encoder.model, encoder  # the model registered, so its weights export
        self.dense = nn.ModuleList(encoder.dense)  # and the Dense modules' weights

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return Encoder.forward(self.encoder, Batch(input_ids, attention_mask, pool_mask))


def export_onnx(encoder: Encoder, path: str | os.PathLike) -> Path:
    """Write the encoder's graph to ``path`` (whole or not at all: see :func:`lm2vec.cache.atomic_write`)."""
    if encoder.dtype != "float32":
        raise ValueError(f"export a float32 encoder (this one is {encoder.dtype}); ONNX Runtime can quantize it")
    example = encoder.tokenization([""] * 2, ["an example text to trace", "another"])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    shapes = {name: {0: batch, 1: length} for name in INPUTS}
    graph = _EncoderGraph(encoder).eval()
    with torch.no_grad(), warnings.catch_warnings(), experts_implementation(encoder.model, "batched_mm"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example.input_ids, example.attention_mask, example.pool_mask),
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return atomic_write(Path(path), lambda tmp: program.save(str(tmp), external_data=False))


class OnnxEncoder(Encoder):
    """An encoder whose forward pass runs in ONNX Runtime (CPU by default); build one with :func:`onnx_encoder`."""

    def __init__(self, *args, session, **kwargs):
        super().__init__(*args, **kwargs)
        self.session = session

    def forward(self, batch: Batch) -> torch.Tensor:
        feeds = {name: getattr(batch, name).numpy() for name in INPUTS}
        return torch.from_numpy(self.session.run([OUTPUT], feeds)[0])

    def _invariance(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def packs(self) -> bool:
        return False  # the graph takes padded batches

    def info(self) -> dict:
        return super().info() | {"engine": "onnxruntime", "batch_invariant": False}


def onnx_graph(encoder: Encoder, path: str | os.PathLike | None = None) -> Path:
    """The encoder's ONNX graph at ``path`` (default: the cache, keyed by the weights), exported if not there."""
    path = Path(path) if path is not None else cache_dir() / "onnx" / f"{encoder.fingerprint()}.onnx"
    if not path.is_file():
        export_onnx(encoder, path)
    return path


def onnx_encoder(
    encoder: Encoder, path: str | os.PathLike | None = None, providers: list[str] | None = None
) -> OnnxEncoder:
    """``encoder`` on ONNX Runtime; exported once to ``path`` (default: the cache, keyed by the weights)."""
    import onnxruntime

    path = onnx_graph(encoder, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    settings = encoder.settings() | {"batch_invariant": False}  # ONNX Runtime picks its own kernels
    return OnnxEncoder(encoder.model, session=session, **settings)
