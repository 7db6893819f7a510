"""The reference llm2vec's checkpoints: what ``LLM2Vec.from_pretrained(base, peft_model_name_or_path=...)`` loads.

Its published models come as an MNTP directory (the base model's config and tokenizer plus the MNTP LoRA adapter,
whose ``base_model_name_or_path`` names the base weights) and, optionally, a second adapter trained on top
(SimCSE or supervised). lm2vec loads the base, merges the adapters in that order (in float32; on a base stored in
bf16 that is lowered, as each weight is read: :func:`merged_on_access`), and encodes with the
reference's settings (``llm2vec_config.json`` of the last directory, else its defaults: mean pooling, 512 tokens,
documents cut to 400) and instruction convention (:class:`~lm2vec.inputs.ReferenceStyle`), so ``[[instruction,
text], ...]`` inputs give the reference's vectors. Adapters are read from safetensors only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoConfig, PreTrainedModel

from ..choices import PoolingMode
from ..inputs import ReferenceStyle
from ..quantization import HALF
from ..st_format import STSettings
from .model import load_model
from .saved import read_saved_settings
from .source import ModelLoadError, Source, resolve_source

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REFERENCE_CONFIG = "llm2vec_config.json"
# The base models whose texts the reference wraps in their chat template (llm2vec 0.2.3,
# ``LLM2Vec.prepare_for_tokenization``), by the name it finds in the MNTP directory's config.json.
TEMPLATES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
    "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
    "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "Qwen/Qwen2-1.5B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
}
# What the reference appends for EOS pooling, by architecture (Meta-Llama-3-8B by name; not for templated models).
EOS_TEXT = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}
EOS_BY_NAME = {"meta-llama/Meta-Llama-3-8B": "<|end_of_text|>"}
POOLING = {
    "mean": PoolingMode.MEAN,
    "eos_token": PoolingMode.LAST_TOKEN,
    "last_token": PoolingMode.LAST_TOKEN,
    "bos_token": PoolingMode.FIRST_TOKEN,
}


@dataclass
class ReferenceCheckpoint:
    """A base model and the adapters to merge into it, in order (the tokenizer is the source's, as the reference's)."""

    base: Source
    adapters: list[Path]
    settings: STSettings  # pooling, length and instruction convention as the reference would encode

    def contents(self) -> list | None:
        """The base model's and the adapters' files by content (:meth:`Source.contents`), or None where the base's
        are not on disk yet (a hub model before its first load)."""
        base = self.base.contents()
        return None if base is None else [base, *(Source(str(a), local=True).contents() for a in self.adapters)]

    def load_model(
        self, bidirectional: bool, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool
    ) -> PreTrainedModel:
        """The base model with every adapter merged in (checked against the base first). ``dtype``: the base's
        weights' (bf16 or float16 where its files store it, for a lower precision: see :func:`merged_on_access`)."""
        from peft import PeftModel

        model = load_model(self.base, bidirectional, dtype, attn_implementation, trust_remote_code)
        for adapter in self.adapters:
            try:
                # strict: an adapter weight the model has no place for (or a layer of the model's adapter that gets
                # none) would be dropped with a warning, leaving the adapter's layers at their initial weights
                adapted = PeftModel.from_pretrained(model, str(adapter), strict_adapter_check="error")
            except (RuntimeError, ValueError, KeyError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ModelLoadError(
                    f"the adapter {adapter} does not fit the base model {self.base.path} "
                    f"(trained on another base?): {first:.400}"  # peft's lists every weight's name
                ) from err
            model = merged_on_access(adapted) if dtype in HALF else adapted.merge_and_unload()
        return model


def merged_on_access(adapted: PeftModel) -> PreTrainedModel:
    """The model without its adapter's layers, each adapted weight computed on access as the 16-bit base weight plus
    the adapter's update in float32 (:class:`_Update`: the bits peft's merge into float32 weights gives): the merged
    model in float32 is never held whole, and :func:`lm2vec.quantization.float32_in_turn` makes plain float32 weights
    of what lowering leaves. Adapters other than plain LoRA on linear layers (DoRA, LoRA biases, embeddings) are
    merged into the model made float32 whole, as a float32 base is."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in adapted.modules() if isinstance(m, BaseTunerLayer)]
    if not all(type(m) is LoraLinear and not m.lora_variant and not any(m.lora_bias.values()) for m in layers):
        return cast("PreTrainedModel", adapted.float().merge_and_unload())
    for layer in cast("list[LoraLinear]", layers):
        for name in layer.active_adapters:
            a, b = (cast(nn.Linear, factors[name]).weight for factors in (layer.lora_A, layer.lora_B))
            update = _Update(a, b, layer.scaling[name], layer.fan_in_fan_out)
            parametrize.register_parametrization(layer.get_base_layer(), "weight", update, unsafe=True)
    return cast("PreTrainedModel", adapted.unload())


class _Update(nn.Module):
    """A LoRA update, ``scaling * B @ A`` (transposed for a fan-in-fan-out layer), added to the weight it
    parametrizes in float32 (:func:`merged_on_access`), computed as peft's merge computes it (``get_delta_weight``;
    a 16-bit weight made float32 exactly). A and B are buffers in the model's state dict, so that the merged model's
    fingerprint (its calibration's cache key) is not the base's, under names of their own (a next adapter's strict
    check would count peft's names as its own, missing)."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool):
        super().__init__()
        self.register_buffer("a", a.detach())
        self.register_buffer("b", b.detach())
        self.scaling, self.transposed = scaling, transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.a, self.b
        if a.dtype in HALF:  # peft on a CPU: the product in float32, rounded back
            update = (b.float() @ a.float()).mul_(self.scaling).to(a.dtype).float()
        else:
            update = (b @ a).mul_(self.scaling)
        return (update.T if self.transposed else update).add_(weight)  # one new tensor: the first load's passes


def find_reference_checkpoint(source: Source, adapter: str | os.PathLike | None) -> ReferenceCheckpoint | None:
    """The reference layout at ``source`` (plus ``adapter``), or None where ``source`` is a plain model and no
    adapter is given (lm2vec's own directories, Hugging Face models). ``adapter`` is the reference's
    ``peft_model_name_or_path``: with it, a plain base model too is encoded in the reference's convention. An
    adapter directory that is also a sentence-transformers directory (an encoder saved with its adapter unmerged)
    keeps the settings it was saved with."""
    folder = _adapter_folder(source)
    if folder is None:
        if adapter is None:
            return None
        base, adapters = source, []  # a full base model plus one adapter
    else:
        base, adapters = _adapter_base(folder), [_checked_adapter(folder)]
    if adapter is not None:
        adapter_source = resolve_adapter(adapter)
        adapters.append(_checked_adapter(adapter_source))
    elif folder is not None and (own := read_saved_settings(folder)) is not None:
        return ReferenceCheckpoint(base, adapters, own)  # an encoder saved with its adapter unmerged: its settings
    config_file = adapters[-1] / REFERENCE_CONFIG
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    model_type = AutoConfig.from_pretrained(base.path).model_type
    settings = reference_settings(config, _template_name(source, base), model_type)
    return ReferenceCheckpoint(base, adapters, settings)


def reference_settings(config: dict, name: str, model_type: str) -> STSettings:
    """What the reference encodes with: ``config`` (its llm2vec_config.json) over its defaults; the template and
    the EOS text by ``name`` (see :data:`TEMPLATES`) and architecture."""
    mode = str(config.get("pooling_mode", "mean"))
    if mode not in POOLING:
        raise ModelLoadError(
            f"the reference's pooling mode {mode!r} is not reproduced by lm2vec (it reproduces: {', '.join(POOLING)})"
        )
    eos = EOS_BY_NAME.get(name, EOS_TEXT.get(model_type, "")) if mode == "eos_token" and name not in TEMPLATES else ""
    style = ReferenceStyle(
        template=TEMPLATES.get(name, ("", "")),
        eos=eos,
        doc_max_length=int(config.get("doc_max_length", 400)),
        skip_instruction=bool(config.get("skip_instruction", True)),
    )
    return STSettings(POOLING[mode], int(config.get("max_length", 512)), reference_style=style)


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """A local adapter directory, or a hub id downloaded (configs and safetensors only)."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(adapter).startswith((".", "/", "~")):
        raise ModelLoadError(f"adapter directory not found: {path}")
    return _download(str(adapter))


def _adapter_folder(source: Source) -> Path | None:
    """The source's directory if it holds a PEFT adapter (a hub repository is downloaded then), else None."""
    if source.local:
        folder = Path(source.path)
        return folder if (folder / ADAPTER_CONFIG).is_file() else None
    from transformers.utils import find_adapter_config_file

    try:
        found = find_adapter_config_file(source.path)
    except Exception:  # offline or unknown: not an adapter repository as far as can be told; loading says more
        found = None
    return _download(source.path) if found else None


def _download(repo: str) -> Path:
    """A hub repository's configs, safetensors and tokenizer files, on disk."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as err:  # offline, unknown repository, no access: say which
        raise ModelLoadError(f"cannot download {repo}: {err}") from err


def _checked_adapter(folder: Path) -> Path:
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(f"{folder} is not a PEFT adapter: it has no {ADAPTER_CONFIG}")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = [p.name for p in folder.glob("adapter_model.*")]
        hint = f" (found {', '.join(pickled)}: lm2vec never unpickles weights)" if pickled else ""
        raise ModelLoadError(f"{folder} has no {ADAPTER_WEIGHTS}{hint}")
    return folder


def _adapter_base(folder: Path) -> Source:
    """The base model an MNTP directory's adapter was trained on."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path")
    try:
        return resolve_source(base)
    except ModelLoadError as err:
        raise ModelLoadError(f"the base model of {folder} cannot be loaded: {err}") from err


def _template_name(source: Source, base: Source) -> str:
    """What the reference matches its templates against: ``_name_or_path`` in a local directory's config.json,
    else the name transformers 4.x gives the model: the adapter's base (or the hub id itself)."""
    config = Path(source.path) / "config.json"
    if source.local and config.is_file():
        return str(json.loads(config.read_text()).get("_name_or_path", ""))
    return base.path
