"""The sentence-transformers directory layout: what ``SentenceTransformer(path)``, TEI, vLLM and MTEB read.

lm2vec writes a Transformer module and a Pooling module (then the Dense and Normalize modules of an encoder that has
them), in the long-standing (legacy) key names that every reader of the format understands;
:mod:`lm2vec.loading.saved` reads such directories back, lm2vec's and other decoder embedding models'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .choices import PoolingMode
from .inputs import ReferenceStyle

if TYPE_CHECKING:
    from .dense import Dense

POOLING_DIR = "1_Pooling"
LM2VEC_CONFIG = "lm2vec_config.json"  # what only lm2vec reproduces: the reference llm2vec's instruction convention
# The module types lm2vec reproduces (matched on the class name, the last part of modules.json's "type").
MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
# sentence-transformers' pooling modes: its legacy config keys -> its mode names, and lm2vec's modes -> those names.
ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
ST_POOLING_NAMES: dict[PoolingMode, str] = {
    PoolingMode.MEAN: "mean",
    PoolingMode.WEIGHTED_MEAN: "weightedmean",
    PoolingMode.LAST_TOKEN: "lasttoken",
    PoolingMode.FIRST_TOKEN: "cls",
}


@dataclass
class STSettings:
    """The encoder settings that live in the sentence-transformers files (not in the HF model)."""

    pooling: PoolingMode
    max_length: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    bidirectional: bool = True
    reference_style: ReferenceStyle | None = None  # kept in LM2VEC_CONFIG; sentence-transformers does not read it
    matryoshka_dims: tuple[int, ...] | None = None  # the truncations it was trained for (LM2VEC_CONFIG)
    normalize: bool = False  # a Normalize module after the pooling
    include_prompt: bool = False  # the Pooling module pools the prompt's tokens too (sentence-transformers' default)
    dense: tuple[Dense, ...] = ()  # Dense modules after the pooling, in order
    similarity_fn_name: str = "cosine"  # how sentence-transformers compares the vectors (model.similarity)


def write(path: Path, hidden_size: int, settings: STSettings) -> None:
    """Write the sentence-transformers files next to an already saved HF model and tokenizer (``hidden_size``: the
    width the Pooling module pools)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    for dense in settings.dense:
        modules.append(_module(len(modules), "Dense"))
        dense.save(path / str(modules[-1]["path"]))
    if settings.normalize:
        modules.append(_module(len(modules), "Normalize"))
        (path / str(modules[-1]["path"])).mkdir(exist_ok=True)
    chosen = ST_POOLING_NAMES[settings.pooling]
    pooling: dict[str, object] = {key: name == chosen for key, name in ST_POOLING_KEYS.items()}
    pooling |= {"word_embedding_dimension": hidden_size, "include_prompt": settings.include_prompt}
    st_config = {
        "prompts": settings.prompts,
        "default_prompt_name": settings.default_prompt_name,
        "similarity_fn_name": settings.similarity_fn_name,
        "model_type": "SentenceTransformer",
    }
    (path / POOLING_DIR).mkdir(parents=True, exist_ok=True)
    _dump(path / "modules.json", modules)
    _dump(path / POOLING_DIR / "config.json", pooling)
    _dump(path / "sentence_bert_config.json", {"max_seq_length": settings.max_length, "do_lower_case": False})
    _dump(path / "config_sentence_transformers.json", st_config)
    own = {
        "reference_style": settings.reference_style.to_json() if settings.reference_style else None,
        "matryoshka_dims": list(settings.matryoshka_dims) if settings.matryoshka_dims else None,
    }
    if any(own.values()):
        _dump(path / LM2VEC_CONFIG, {key: value for key, value in own.items() if value})


def _module(idx: int, kind: str) -> dict[str, object]:
    """A modules.json entry, in sentence-transformers' folder naming."""
    return {"idx": idx, "name": str(idx), "path": f"{idx}_{kind}", "type": f"sentence_transformers.models.{kind}"}


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
