"""``load()``: from what the user names to a verified encoder.

The steps, each in its own module: :mod:`.source` turns the name into a local directory or hub id (converting
GGUF files once), :mod:`.dtype` decides the weight dtype (``"auto"``: the device's fastest), :mod:`.model`
builds the tokenizer and the model (attention mode set before it is built; int8 weights cached), and
:mod:`.saved` reads the settings a saved encoder directory carries.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..encoder import Encoder
from ..pooling import PoolingMode
from .dtype import Dtype, resolve_dtype, torch_dtype
from .model import default_max_length, load_int8_model, load_model, load_tokenizer
from .saved import read_saved_settings
from .source import BUILTIN_MODEL, ModelLoadError, Source, resolve_source

__all__ = ["BUILTIN_MODEL", "ModelLoadError", "Source", "load", "resolve_source"]


def load(
    source: str | os.PathLike | None = None,
    *,
    pooling: str | PoolingMode | None = None,
    bidirectional: bool | None = None,
    dtype: Dtype = None,
    max_length: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    verify: bool = True,
) -> Encoder:
    """Load a decoder-only LLM as an encoder and prove its attention mode.

    ``source``: a local Hugging Face or sentence-transformers directory, a hub id, a ``.gguf`` file,
    or None / ``"smollm2-135m-instruct"`` for the built-in SmolLM2-135M-Instruct. Settings not given
    come from a saved lm2vec/sentence-transformers directory, else: mean pooling, bidirectional,
    float32, 512 tokens. ``dtype``: "float32", "bfloat16", "float16", "int8" (CPU; int8 linear layers)
    or "auto" (the device's fastest dtype).
    """
    dtype = resolve_dtype(dtype, device)
    resolved = resolve_source(source)
    saved = read_saved_settings(Path(resolved.path)) if resolved.local else None
    if bidirectional is None:
        bidirectional = saved.bidirectional if saved else True
    if dtype == "int8":
        model = load_int8_model(resolved, bidirectional, attn_implementation, trust_remote_code)
    else:
        model = load_model(resolved, bidirectional, torch_dtype(dtype), attn_implementation, trust_remote_code)
    if device is not None:
        model.to(device)  # type: ignore[arg-type]  # transformers wraps .to with functools.wraps, which mypy misreads
    model.eval()
    encoder = Encoder(
        model,
        load_tokenizer(resolved, trust_remote_code),
        pooling=pooling or (saved.pooling if saved else PoolingMode.MEAN),
        max_length=max_length or (saved.max_length if saved else default_max_length(model)),
        prompts=prompts if prompts is not None else (saved.prompts if saved else None),
        default_prompt_name=default_prompt_name or (saved.default_prompt_name if saved else None),
        bidirectional=bidirectional,
    )
    if verify:
        encoder.verify()
    return encoder
