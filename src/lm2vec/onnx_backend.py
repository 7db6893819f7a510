"""ONNX export of an encoder (the bidirectional model and its pooling in one graph) and an ONNX Runtime backend.

The graph takes the batches ``Encoder.encode`` builds (``input_ids``, ``attention_mask``, ``pool_mask``; any
batch size and length) and returns ``sentence_embedding``, so other runtimes need only the tokenizer and
these three inputs. :class:`OnnxEncoder` is an :class:`~lm2vec.Encoder` whose forward pass runs the graph in
ONNX Runtime: same tokenization, batching, instructions and output options.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .encoder import Encoder
from .inputs import Batch
from .loading import cache_dir

INPUTS = ("input_ids", "attention_mask", "pool_mask")
OUTPUT = "sentence_embedding"


class _EncoderGraph(nn.Module):
    """What is exported: ``Encoder.forward`` (model, position ids from the mask, pooling) on three tensors."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.model, self.encoder = encoder.model, encoder  # the model registered, so its weights export

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return Encoder.forward(self.encoder, Batch(input_ids, attention_mask, pool_mask))


def export_onnx(encoder: Encoder, path: str | os.PathLike) -> Path:
    """Write the encoder's graph to ``path`` (written to a temporary file, then renamed: never half a file)."""
    if encoder.precision != "float32":
        raise ValueError(f"export a float32 encoder (this one is {encoder.precision}); ONNX Runtime can quantize it")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = encoder.tokenization([""] * 2, ["an example text to trace", "another"])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    shapes = {name: {0: batch, 1: length} for name in INPUTS}
    graph = _EncoderGraph(encoder).eval()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.partial")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
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
            program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class OnnxEncoder(Encoder):
    """An encoder whose forward pass runs in ONNX Runtime (CPU by default)."""

    def __init__(self, encoder: Encoder, path: str | os.PathLike, providers: list[str] | None = None):
        import onnxruntime

        super().__init__(
            encoder.model,
            encoder.tokenizer,
            encoder.pooling,
            encoder.max_length,
            encoder.prompts,
            encoder.default_prompt_name,
            encoder.bidirectional,
            batch_invariant=False,
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])

    def forward(self, batch: Batch) -> torch.Tensor:
        feeds = {name: getattr(batch, name).numpy() for name in INPUTS}
        return torch.from_numpy(self.session.run([OUTPUT], feeds)[0])

    def _invariance(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def onnx_encoder(encoder: Encoder, path: str | os.PathLike | None = None) -> OnnxEncoder:
    """``encoder`` on ONNX Runtime; exported once to ``path`` (default: the cache, keyed by the weights)."""
    if path is None:
        from .evaluation.cache import fingerprint

        path = cache_dir() / "onnx" / f"{fingerprint(encoder)}.onnx"
    path = Path(path)
    if not path.is_file():
        export_onnx(encoder, path)
    return OnnxEncoder(encoder, path)
