"""``load()``: from what the user names to a verified encoder.

The steps, each in its own module: :mod:`.source` turns the name into a local directory or hub id (converting
GGUF files once), :mod:`.dtype` decides the precision (``"auto"``: the device's fastest that stays float32-grade),
:mod:`.model` builds the tokenizer and the model (attention mode set before it is built; of a multimodal model its
text decoder alone; int8 weights cached), :mod:`.saved` reads the settings a saved encoder directory carries,
:mod:`.reference` reads the reference llm2vec's checkpoints (an MNTP adapter directory, a second adapter), and
:mod:`lm2vec.calibration` measures which precision each block of a bfloat16 or int8 model runs in.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..attention import AttentionError
from ..choices import DEFAULT_DTYPE, PoolingMode, parse_pooling
from ..encoder import Encoder, check_length, fitted_length
from ..inputs import check_flag, check_positive
from ..quantization import FLOAT32, LOWER, float32_in_turn, lower_kind, lower_precision
from ..st_format import STSettings
from .dtype import MIN_SPEEDUP, Dtype, auto_candidates, resolve_dtype, torch_dtype
from .model import cache_lower_model, cached_lower_model, load_model, load_tokenizer, read_config
from .reference import find_reference_checkpoint
from .saved import read_saved_settings
from .source import BUILTIN_MODEL, ModelLoadError, Source, resolve_source

__all__ = ["BUILTIN_MODEL", "ModelLoadError", "Source", "load", "resolve_source"]


def load(
    source: str | os.PathLike | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    pooling: str | PoolingMode | None = None,
    bidirectional: bool | None = None,
    dtype: Dtype = DEFAULT_DTYPE,
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
    come from a saved lm2vec/sentence-transformers directory, else: mean pooling, bidirectional, 512 tokens.
    ``dtype``: "auto" (default: the device's fastest path that stays float32-grade, see
    :mod:`lm2vec.loading.dtype`), "float32" (bit-identical embeddings in any batch on CPU), "bfloat16" or
    "int8" (linear layers in that precision in the blocks that tolerate it, measured once per model), "float16".
    For "auto", "bfloat16" and "int8" a checkpoint stored in bf16 or float16 (most hub models) is held in it, not in
    float32, while its first load measures and converts it: half the memory, the same result.
    ``adapter``: a PEFT adapter (directory or hub id) merged into the model; with the reference llm2vec's MNTP
    directory as ``source`` and its SimCSE or supervised adapter here, the reference's vectors
    (:mod:`.reference`).
    """
    if max_length is not None:
        check_positive("max_length", max_length)  # before the minutes a large model takes to load
    for name, flag in (("bidirectional", bidirectional), ("trust_remote_code", trust_remote_code), ("verify", verify)):
        if flag is not None:
            check_flag(name, flag)
    if device is not None:
        _check_device(device)
    chosen = resolve_dtype(dtype, device)
    resolved = resolve_source(source)
    checkpoint = find_reference_checkpoint(resolved, adapter)
    if checkpoint is not None:
        saved: STSettings | None = checkpoint.settings
    else:
        saved = read_saved_settings(resolved.folder) if resolved.folder else None
    if max_length is not None:  # against the model's positions, before its weights load
        check_length(read_config(checkpoint.base if checkpoint else resolved, trust_remote_code), max_length)
    if bidirectional is None:
        bidirectional = saved.bidirectional if saved else True
    pooling = parse_pooling(pooling or (saved.pooling if saved else PoolingMode.MEAN))
    variant: tuple = (bidirectional, pooling.value, torch.device(device or "cpu").type)  # a plan is per device type
    identity = checkpoint.contents() if checkpoint else None  # its lowered weights: cached by its base and adapters
    variant += (identity,) if checkpoint else ()
    cacheable = checkpoint is None or identity is not None
    tokenizer = load_tokenizer(resolved, trust_remote_code)

    def build(model: PreTrainedModel) -> Encoder:
        if device is not None:
            model.to(device)  # type: ignore[arg-type]  # transformers wraps .to with functools.wraps; mypy misreads it
        model.eval()
        return Encoder(
            model,
            tokenizer,
            pooling=pooling,
            max_length=max_length or fitted_length(model.config, saved.max_length if saved else None),
            prompts=prompts if prompts is not None else (saved.prompts if saved else None),
            default_prompt_name=default_prompt_name or (saved.default_prompt_name if saved else None),
            bidirectional=bidirectional,
            reference_style=saved.reference_style if saved else None,
            matryoshka_dims=saved.matryoshka_dims if saved else None,
            normalize=saved.normalize if saved else False,
            include_prompt=saved.include_prompt if saved else False,
            dense=saved.dense if saved else (),
            similarity_fn_name=saved.similarity_fn_name if saved else "cosine",
        )

    def cached() -> PreTrainedModel | None:
        return cached_lower_model(resolved, variant, chosen, bidirectional, attn_implementation, trust_remote_code)

    lower = chosen in (*LOWER, "auto")

    def loaded() -> PreTrainedModel:
        if lower and cacheable and (model := cached()) is not None:
            return model
        # a model to lower loads in the 16-bit float it is stored in (a checkpoint's adapters merged on access)
        weights = torch_dtype(chosen, (checkpoint.base if checkpoint else resolved).half_dtype() if lower else None)
        if checkpoint is not None:
            return checkpoint.load_model(bidirectional, weights, attn_implementation, trust_remote_code)
        return load_model(resolved, bidirectional, weights, attn_implementation, trust_remote_code)

    model = loaded()
    encoder = build(model)
    with _named_failures(model.config, bidirectional, chosen):  # the config: the first model's weights must be freeable
        if lower and lower_kind(model) is None:
            if _lower(encoder, resolved, variant, chosen, cache=cacheable):
                # Until the first model is gone its weights stay mapped from their file, resident: read the
                # lowered weights back as every later load does (the built-in model: 1166 -> 684 MB held after loading).
                del encoder, model
                model = loaded()
                encoder = build(model)
                if lower_kind(model) is None:  # the cache just written was unreadable (warned): converted again
                    _lower(encoder, resolved, variant, chosen, cache=False)
        if verify:
            encoder.verify()
    return encoder


def _check_device(device: str | torch.device) -> None:
    """Refuse a device this machine cannot use (no such device, a torch built without it) before loading."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # torch asserts where it was built without CUDA
        raise ValueError(f"device {str(device)!r} cannot be used here: {err}") from None


@contextlib.contextmanager
def _named_failures(config: PretrainedConfig, bidirectional: bool, chosen: str) -> Iterator[None]:
    """The first forward passes (calibration, verification) run the model as transformers built it: an error from
    inside says only what broke there, so it is raised again naming the architecture, the attention mode and, where
    lm2vec put layers in lower precision, the way to load without them."""
    try:
        yield
    except (AttentionError, ModelLoadError):
        raise
    except Exception as err:
        mode = "bidirectional" if bidirectional else "causal"
        message = f"{config.model_type} ({config._attn_implementation} attention, {mode}) failed when first run: "
        message += f"{type(err).__name__}: {err}"
        if bidirectional:
            message += "; if it runs with bidirectional=False, transformers cannot run this architecture bidirectional"
        if chosen in (*LOWER, "auto"):
            message += (
                f"; if it runs with dtype='float32', lm2vec's lower-precision layers ({chosen}) fail: please report it"
            )
        raise ModelLoadError(message) from err


def _lower(encoder: Encoder, source: Source, variant: object, chosen: str, cache: bool = True) -> bool:
    """Run each block in the precision calibration measured for this model (cached), ``chosen`` being "int8",
    "bfloat16" or "auto" (the fastest plan of this CPU's fast precisions; float32 if none is fast enough). True
    where the lowered weights were cached for later loads."""
    from ..calibration import best_plan, calibrate, plan_speed, smoothing

    with float32_in_turn(encoder.model):  # weights loaded in their stored bf16 / float16: float32 a block at a time
        plan = best_plan(encoder, auto_candidates()) if chosen == "auto" else calibrate(encoder, chosen)
        if chosen == "auto" and plan_speed(plan) < MIN_SPEEDUP or set(plan) == {"float32"}:
            return False
        if chosen != "auto" and set(plan) <= set(FLOAT32):
            warnings.warn(f"no block of this model stays float32-grade in {chosen}: running float32", stacklevel=3)
        lower_precision(encoder.model, plan, smoothing=smoothing(encoder) if "int8" in plan else None)
    return cache and cache_lower_model(source, variant, chosen, encoder.model, plan)
