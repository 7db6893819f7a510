"""Read back the settings a saved sentence-transformers directory carries (pooling, max length, prompts, attention).

A directory whose modules or pooling lm2vec cannot reproduce (other module types or orders, max or mean-sqrt-len
pooling, several pooling modes concatenated) is refused by name: loading it anyway would give other vectors than
sentence-transformers gives. Dense modules load from safetensors only, their activation a ``torch.nn`` class (never
imported from elsewhere). Attention follows its ``config.json``: ``is_causal`` (lm2vec writes it) or an
architecture's own switch (EmbeddingGemma's ``use_bidirectional_attention``); a directory with neither (a decoder
embedding model saved by sentence-transformers) runs causal, as sentence-transformers runs it.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..attention import saved_bidirectional
from ..choices import PoolingMode
from ..dense import WEIGHTS, Dense
from ..inputs import ReferenceStyle, check_prompts
from ..similarity import check_similarity
from ..st_format import LM2VEC_CONFIG, MODULES, POOLING_DIR, ST_POOLING_KEYS, ST_POOLING_NAMES, STSettings
from .source import ModelLoadError


def read_saved_settings(path: Path) -> STSettings | None:
    """Settings of a saved sentence-transformers directory, or None for a plain Hugging Face directory."""
    if not (path / "modules.json").is_file():
        return None
    modules = _load(path / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{path / 'modules.json'}: expected a list of module objects")
    foreign = [str(m.get("type")) for m in modules if str(m.get("type")).rsplit(".", 1)[-1] not in MODULES]
    if foreign:
        raise ModelLoadError(
            f"{path} has sentence-transformers module(s) lm2vec cannot reproduce: {', '.join(foreign)} "
            f"(lm2vec runs {' + '.join(MODULES)} only)"
        )
    kinds = [str(m.get("type")).rsplit(".", 1)[-1] for m in modules]
    if not _ORDER.fullmatch(" ".join(kinds)):
        raise ModelLoadError(
            f"{path / 'modules.json'}: modules in the order {' + '.join(kinds)}; lm2vec runs Transformer, Pooling, "
            "Dense modules, Normalize, in that order"
        )
    pooling_dirs = [m.get("path") or POOLING_DIR for m in modules if str(m.get("type")).endswith("Pooling")]
    pooling_file = path / (pooling_dirs[0] if pooling_dirs else POOLING_DIR) / "config.json"
    pooling = _settings(pooling_file)
    bert_file = path / "sentence_bert_config.json"
    transformer = _settings(bert_file)
    _check_transformer(transformer, bert_file)
    # sentence-transformers >= 6 keeps the length in the tokenizer's model_max_length, no longer in its own config
    max_length = transformer.get("max_seq_length") or _tokenizer_max_length(path) or 512
    if not _whole(max_length) or max_length < 1:
        raise ModelLoadError(f"{bert_file}: max_seq_length must be a positive whole number, got {max_length!r}")
    st_file = path / "config_sentence_transformers.json"
    st_config = _settings(st_file)
    prompts, default_prompt = st_config.get("prompts") or {}, st_config.get("default_prompt_name")
    try:
        check_prompts(prompts, default_prompt)  # the encoder's own check, named after the file
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{st_file}: {err}") from None
    own_file = path / LM2VEC_CONFIG
    own = _settings(own_file)
    style, dims = own.get("reference_style"), own.get("matryoshka_dims")
    if dims is not None and not (isinstance(dims, list) and all(_whole(d) and d > 0 for d in dims)):
        raise ModelLoadError(f"{own_file}: matryoshka_dims must be a list of positive whole numbers, got {dims!r:.80}")
    try:
        reference_style = ReferenceStyle.from_json(style) if style else None
    except (TypeError, ValueError) as err:  # another shape than lm2vec writes
        raise ModelLoadError(f"{own_file}: reference_style is not lm2vec's ({err})") from None
    return STSettings(
        bidirectional=saved_bidirectional(_settings(path / "config.json")),
        pooling=_pooling_mode(pooling, pooling_file),
        max_length=max_length,
        prompts=prompts,
        default_prompt_name=default_prompt,
        reference_style=reference_style,
        matryoshka_dims=tuple(int(d) for d in dims) if dims else None,
        normalize=any(str(m.get("type")).endswith("Normalize") for m in modules),
        include_prompt=pooling.get("include_prompt", True) is not False,  # sentence-transformers' default: pooled
        similarity_fn_name=_similarity(st_config.get("similarity_fn_name"), st_file),
        dense=tuple(read_dense(path / (m.get("path") or "")) for m in modules if str(m.get("type")).endswith("Dense")),
    )


# The module orders lm2vec runs: the Transformer, its pooling, projections, unit length.
_ORDER = re.compile(r"Transformer( Pooling)?( Dense)*( Normalize)?")
# sentence-transformers' Dense reads its input from and writes its output to the sentence embedding by default.
_EMBEDDING = "sentence_embedding"


def _similarity(name: object, where: Path) -> str:
    """The comparison a saved model names (none: sentence-transformers' default, cosine)."""
    try:
        return check_similarity(name or "cosine")
    except ValueError as err:
        raise ModelLoadError(f"{where}: {err}") from None


def read_dense(folder: Path) -> Dense:
    """The Dense module sentence-transformers saved in ``folder``; its weights from safetensors only."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no Dense configuration (config.json)")
    config = _settings(folder / "config.json")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key) not in (None, _EMBEDDING):
            raise ModelLoadError(f"{folder}: a Dense module on {key} {config[key]!r} (lm2vec projects {_EMBEDDING!r})")
    try:
        dense = Dense(
            int(config["in_features"]),
            int(config["out_features"]),
            bool(config.get("bias", True)),
            _activation(config["activation_function"], folder) if "activation_function" in config else None,
            bool(config.get("use_residual", False)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(f"{folder / 'config.json'}: not a Dense module's configuration ({err!r})") from err
    if not (folder / WEIGHTS).is_file():
        raise ModelLoadError(
            f"{folder} has no {WEIGHTS}: lm2vec reads safetensors only (pytorch_model.bin is a pickle, which can run "
            "code when loaded); save the model again with sentence-transformers' safe_serialization=True"
        )
    try:
        dense.load_state_dict(load_file(folder / WEIGHTS), strict=True)
    except (SafetensorError, RuntimeError) as err:  # RuntimeError: weights other than the configuration's
        raise ModelLoadError(f"cannot load the Dense weights {folder / WEIGHTS}: {err}") from err
    return dense.requires_grad_(False)  # kept as loaded: lm2vec's stages train the model (its adapters), not these


def _activation(path: str, folder: Path) -> nn.Module:
    """The activation a Dense configuration names (e.g. ``torch.nn.modules.activation.Tanh``): a ``torch.nn`` module
    class that takes no arguments; anything else is refused, not imported."""
    module, _, name = str(path).rpartition(".")
    if module == "torch.nn" or module.startswith("torch.nn."):
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
        if isinstance(found, type) and issubclass(found, nn.Module):
            try:
                return found()
            except TypeError:  # a module class that needs arguments (a layer): not an activation
                pass
    raise ModelLoadError(
        f"{folder}: the Dense module's activation {path!r} is not a torch.nn activation class (all lm2vec reads "
        "from a configuration)"
    )


def _check_transformer(config: dict, where: Path) -> None:
    """Refuse by name what sentence-transformers' Transformer module does to texts that lm2vec does not."""
    problems, hint = [], ""
    if "message" in (config.get("modality_config") or {}):  # sentence-transformers >= 6, a tokenizer with a template
        problems.append("renders each text through the tokenizer's chat template (modality_config 'message')")
        hint = (
            "; for plain text, save it with modality_config={'text': {'method': 'forward', "
            "'method_output_name': 'last_hidden_state'}}"
        )
    if config.get("do_lower_case"):
        problems.append("lower-cases texts (do_lower_case)")
    if (task := config.get("transformer_task", "feature-extraction")) != "feature-extraction":
        problems.append(f"runs the {task!r} task")
    if problems:
        raise ModelLoadError(
            f"{where}: its Transformer module {' and '.join(problems)}, which lm2vec does not reproduce{hint}"
        )


def _tokenizer_max_length(path: Path) -> int | None:
    """The tokenizer's ``model_max_length``, where it is a length (unset, transformers writes a huge sentinel)."""
    config_file = path / "tokenizer_config.json"
    length = _settings(config_file).get("model_max_length")
    return length if isinstance(length, int) and 0 < length < 1 << 30 else None


def _pooling_mode(config: dict, where: Path) -> PoolingMode:
    """The one pooling mode a Pooling config selects: ``pooling_mode`` if present (it overrides the legacy boolean
    keys, as in sentence-transformers), else the legacy keys; none: mean."""
    declared = config.get("pooling_mode")
    if declared is not None:
        if not isinstance(declared, str | list):
            raise ModelLoadError(f"{where}: pooling_mode must be a mode's name or a list of them, got {declared!r}")
        names = [declared] if isinstance(declared, str) else declared
    else:
        names = [name for key, name in ST_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    ours = {name: mode for mode, name in ST_POOLING_NAMES.items()}
    if len(names) > 1 or names[0] not in ours:
        raise ModelLoadError(
            f"{where}: pooling mode {' + '.join(map(str, names))} cannot be reproduced by lm2vec "
            f"(it pools with one of: {', '.join(ours)})"
        )
    return ours[names[0]]


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _settings(path: Path) -> dict[str, Any]:
    """A settings file's JSON object; none where the file is absent."""
    settings = _load(path) if path.is_file() else {}
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    return settings


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err
