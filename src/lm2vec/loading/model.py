"""Build the tokenizer and the model from a :class:`~.source.Source`: attention mode set before the model exists,
safetensors weights only, of a multimodal model its text decoder alone (:func:`text_decoder`); models in lower
precision cached as safetensors.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMultimodalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..attention import set_bidirectional, unsupported_reason
from ..cache import atomic_write, cache_dir, cache_key, mark_used
from ..calibration import VERSION as CALIBRATION_VERSION
from ..quantization import SCHEME, Plan, linear_speeds, lower_precision
from .source import ModelLoadError, Source

# A causal LM checkpoint's output head (``embed_out``: GPT-NeoX), which the encoder does not load.
HEAD_KEYS = (r"^lm_head\.", r"^embed_out\.")
_HEAD = re.compile("|".join(HEAD_KEYS))
_UNSET = object()


def load_tokenizer(source: Source, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {source.path}: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {source.name} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "right"  # truncation must keep the instruction at the start
    return tokenizer


def default_attn_implementation(model_type: str) -> str | None:
    """Eager where the architecture ignores the bidirectional switch under SDPA, else transformers' own choice (None):
    SDPA where the model has it, eager where not (Gemma 2)."""
    return "eager" if unsupported_reason(model_type, "sdpa") else None


def read_config(source: Source, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config as saved: read in milliseconds, to check settings before the weights load."""
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the config of {source.path}: {err}") from err


def model_config(
    source: Source, bidirectional: bool = True, attn_implementation: str | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """The model's config with its attention implementation and mode set, ready to build the model from."""
    config = read_config(source, trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{config.model_type} is an encoder-decoder model; lm2vec needs a decoder-only LLM")
    config._attn_implementation = attn_implementation or default_attn_implementation(config.model_type)
    return set_bidirectional(config, bidirectional)


def load_model(
    source: Source,
    bidirectional: bool = True,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    model_class: type[_BaseAutoModelClass] = AutoModel,
) -> PreTrainedModel:
    """Load the model with the attention mode set *before* it is built; of a multimodal model, its text decoder
    (:func:`text_decoder`). Weights: safetensors only."""
    config = model_config(source, bidirectional, attn_implementation, trust_remote_code)
    if model_class is not AutoModel and text_decoder_class(config) and not auto_class(model_class, config):
        model_class = AutoModelForMultimodalLM  # a multimodal model's LM head: its text decoder's is taken from it
    try:
        with _head_keys_expected(model_class, config):
            model, info = model_class.from_pretrained(
                source.path,
                config=config,
                dtype=dtype,
                attn_implementation=config._attn_implementation,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError, SafetensorError, ImportError) as err:
        # RuntimeError: a weight of another shape; ImportError: a part built by a package not installed (Gemma 3n's
        # vision tower is a timm model, built before lm2vec takes the text decoder)
        raise ModelLoadError(f"cannot load the weights of {source.path}: {err}") from err
    if missing := sorted(info["missing_keys"]):  # transformers fills them at random and goes on: embeddings of noise
        named = f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
        if all(_HEAD.match(key) for key in missing):
            raise ModelLoadError(
                f"the checkpoint {source.path} has no output head ({named}), which MNTP predicts masked tokens with: "
                "start from the causal LM, not from an embedding model saved without its head"
            )
        raise ModelLoadError(
            f"the checkpoint {source.path} lacks {len(missing)} weight(s) of the {config.model_type} model "
            f"({named}): an incomplete download, or weights of another architecture?"
        )
    return text_decoder(model, head=model_class is not AutoModel)


def auto_class(auto: type[_BaseAutoModelClass], config: PretrainedConfig) -> type[PreTrainedModel] | None:
    """The class ``auto`` (``AutoModel``, ``AutoModelForCausalLM``, ...) builds from ``config``, or None: one it does
    not map (remote code, another kind of model)."""
    mapping = auto._model_mapping
    if mapping is None or type(config) not in mapping:
        return None
    return cast("type[PreTrainedModel]", mapping[type(config)])


def text_decoder_class(config: PretrainedConfig) -> type[PreTrainedModel] | None:
    """The class of a multimodal model's text decoder (Gemma 3 4B+, Llava, Qwen2-VL: their ``text_config``'s model),
    or None for a text-only model."""
    text = config.get_text_config()
    return None if text is config else auto_class(AutoModel, text)


def text_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The causal LM of a multimodal model's text type, which MNTP trains its decoder and LM head in; refused where
    transformers has none (asked of the config alone, before any weights load)."""
    text = config.get_text_config()
    lm_class = auto_class(AutoModelForCausalLM, text)
    if lm_class is None:
        raise ModelLoadError(
            f"transformers has no causal LM of {text.model_type}, the text model of {config.model_type}, "
            "to train MNTP with; the contrastive stages train its text decoder without one (--recipe cpu-no-mntp)"
        )
    return lm_class


def text_decoder(model: PreTrainedModel, head: bool = False) -> PreTrainedModel:
    """A multimodal model's text decoder alone, with the model's LM head where ``head`` (a causal LM of the text
    model's type); a text-only model as it is.

    An encoder of texts runs the text decoder only, and must: the multimodal wrappers build their own masks, causal
    whatever the text config says (Gemma 3), and their vision and audio towers would take memory, LoRA adapters and
    a place in every saved encoder. Saved, the encoder is a model of the text type (``gemma3_text``).
    """
    decoder_class = text_decoder_class(model.config)
    decoders = [m for m in model.modules() if decoder_class is not None and type(m) is decoder_class]
    if len(decoders) != 1:
        return model
    (decoder,) = decoders
    decoder.config.name_or_path = decoder.name_or_path = model.name_or_path  # the checkpoint it came from (model card)
    if not head:
        return decoder
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        lm = text_lm_class(model.config)(decoder.config)
    setattr(lm, lm.base_model_prefix, decoder)
    lm.set_output_embeddings(model.get_output_embeddings())
    if empty := [name for name, p in lm.named_parameters() if p.is_meta]:  # a part of the causal LM the model lacks
        raise ModelLoadError(f"{model.config.model_type}'s text decoder as a causal LM lacks {empty[:3]}")
    return lm


@contextlib.contextmanager
def _head_keys_expected(model_class: type[_BaseAutoModelClass], config: PretrainedConfig) -> Iterator[None]:
    """The encoder is the causal LM without its output head: the head's weights in the checkpoint are expected, not
    reported as UNEXPECTED on every load of a model with an untied head (sentence-transformers sets the same class
    attribute the same way). Keys the decoder lacks or cannot use are still reported."""
    cls = auto_class(model_class, config)
    if cls is None:  # remote code: left to transformers' report
        yield
        return
    own = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", _UNSET)
    cls._keys_to_ignore_on_load_unexpected = [*(cls._keys_to_ignore_on_load_unexpected or []), *HEAD_KEYS]
    try:
        yield
    finally:
        if own is _UNSET:
            del cls._keys_to_ignore_on_load_unexpected
        else:
            cls._keys_to_ignore_on_load_unexpected = own


def cached_lower_model(
    source: Source,
    variant: object,
    dtype: str,
    bidirectional: bool = True,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel | None:
    """The model in lower precision from the cache written by :func:`cache_lower_model`, or None if there is none.

    The model is built empty and takes the cached weights, so the float model is never in memory (peak memory
    below the float model's, and a faster load). An unreadable cache warns and is rebuilt by the caller.
    """
    path = lower_cache_path(source, variant, dtype)
    if path is None or not path.is_file():
        return None
    from accelerate import init_empty_weights

    try:
        with safe_open(str(path), "pt") as cached:
            plan = tuple(json.loads((cached.metadata() or {})["plan"]))
        config = model_config(source, bidirectional, attn_implementation, trust_remote_code)
        if text_decoder_class(config):  # the text decoder's weights were cached (text_decoder)
            config = config.get_text_config()
        with init_empty_weights(include_buffers=False):  # weights on the meta device; computed buffers are real
            model = AutoModel.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        lower_precision(model, plan)
        model.load_state_dict(load_file(path), strict=True, assign=True)  # strict: a missing weight raises
    except (SafetensorError, RuntimeError, OSError, KeyError, ValueError) as err:
        warnings.warn(f"rebuilding the unreadable cache {path}: {err}", stacklevel=2)
        return None
    mark_used(path)
    return model


def cache_lower_model(source: Source, variant: object, dtype: str, model: PreTrainedModel, plan: Plan) -> bool:
    """Cache a model's weights in the precisions of ``plan`` (stored with them) for later loads; True where
    they were written."""
    path = lower_cache_path(source, variant, dtype)
    if path is None:
        return False
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    try:
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"plan": json.dumps(list(plan))}))
    except (RuntimeError, ValueError, OSError) as err:  # shared tensors, a read-only or full disk: still loads
        warnings.warn(f"weights in lower precision not cached: {err}", stacklevel=2)
        return False
    return True


def lower_cache_path(source: Source, variant: object, dtype: str) -> Path | None:
    """Where a model's weights in ``dtype`` ("int8", "bfloat16", "auto") are cached, keyed by the contents of its
    folder (a hub model's: its snapshot, :attr:`Source.folder`); None where it has no folder yet.

    ``variant``: what else the calibrated plan depends on (attention mode, pooling); the machine's measured
    speeds decide the plan too.
    """
    contents = source.contents()  # a copied or moved model finds its cache
    if contents is None:
        return None
    key = cache_key(SCHEME, CALIBRATION_VERSION, dtype, linear_speeds(), variant, contents)
    return cache_dir() / "lower" / f"{dtype}-{key[:20]}.safetensors"  # named by content alone, not by its folder
