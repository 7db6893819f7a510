"""The sentence-transformers directory layout: what ``SentenceTransformer(path)``, TEI, vLLM and MTEB read.

Written in the long-standing (legacy) key names, which every reader of the format understands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .pooling import ST_POOLING_KEYS, PoolingMode

POOLING_DIR = "1_Pooling"


@dataclass
class STSettings:
    """The encoder settings that live in the sentence-transformers files (not in the HF model)."""

    pooling: PoolingMode
    max_length: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    bidirectional: bool = True


def write(path: Path, dim: int, settings: STSettings) -> None:
    """Write the sentence-transformers files next to an already saved HF model and tokenizer."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = {key: False for key in ST_POOLING_KEYS.values()}
    pooling.update(
        {
            "word_embedding_dimension": dim,
            ST_POOLING_KEYS[settings.pooling]: True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "include_prompt": False,
        }
    )
    st_config = {
        "prompts": settings.prompts,
        "default_prompt_name": settings.default_prompt_name,
        "similarity_fn_name": "cosine",
        "model_type": "SentenceTransformer",
    }
    (path / POOLING_DIR).mkdir(parents=True, exist_ok=True)
    _dump(path / "modules.json", modules)
    _dump(path / POOLING_DIR / "config.json", pooling)
    _dump(path / "sentence_bert_config.json", {"max_seq_length": settings.max_length, "do_lower_case": False})
    _dump(path / "config_sentence_transformers.json", st_config)


def read(path: Path) -> STSettings | None:
    """Settings of a saved sentence-transformers directory, or None for a plain HF directory."""
    if not (path / "modules.json").is_file():
        return None
    pooling_file = path / POOLING_DIR / "config.json"
    pooling_config = _load(pooling_file) if pooling_file.is_file() else {}
    mode = next((m for m, key in ST_POOLING_KEYS.items() if pooling_config.get(key)), None)
    if mode is None and isinstance(pooling_config.get("pooling_mode"), str):
        st_names = {"mean": "mean", "weightedmean": "weighted_mean", "lasttoken": "last_token", "cls": "first_token"}
        mode = PoolingMode(st_names.get(pooling_config["pooling_mode"], "mean"))
    bert_file = path / "sentence_bert_config.json"
    max_length = (_load(bert_file) if bert_file.is_file() else {}).get("max_seq_length") or 512
    st_file = path / "config_sentence_transformers.json"
    st_config = _load(st_file) if st_file.is_file() else {}
    hf_config = _load(path / "config.json") if (path / "config.json").is_file() else {}
    return STSettings(
        bidirectional=hf_config.get("is_causal") is not True,
        pooling=mode or PoolingMode.MEAN,
        max_length=int(max_length),
        prompts=dict(st_config.get("prompts") or {}),
        default_prompt_name=st_config.get("default_prompt_name"),
    )


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
