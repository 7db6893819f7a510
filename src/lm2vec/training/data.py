"""Training data: local files (or names under the shared data folder) and hub datasets, read once, checked.

Errors name the file and line (``lm2vec.datafiles``); a spec that is neither a file nor a plausible hub id
is refused before anything is trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..datafiles import data_dir, read_jsonl, read_lines


@dataclass(frozen=True)
class Triplet:
    dataset: str
    query: str
    positive: str
    negative: str


def resolve_data(spec: str, root: str | os.PathLike | None = None) -> Path | str:
    """A local file (as given, or under the data folder), else a hub dataset id ``org/name``."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    under = Path(root if root is not None else data_dir()) / spec
    if under.is_file():
        return under
    if path.suffix or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"training data not found: {spec} (nor {under})")
    return spec  # a hub dataset id, e.g. "wikitext" or "princeton-nlp/datasets-for-simcse"


def check_data(specs: list[str], root: str | os.PathLike | None = None) -> None:
    """Every spec names an existing file or a plausible hub dataset: checked before hours of training start."""
    for spec in specs:
        resolve_data(spec, root)


def _hub(spec: str):
    import datasets

    name, _, config = spec.partition(":")
    return datasets.load_dataset(name, config or None, split="train")


def texts(specs: list[str], root: str | os.PathLike | None = None) -> list[str]:
    """Every non-blank line of the files (a hub dataset's ``text`` column), in order."""
    if not specs:
        raise ValueError("no training data given")
    out: list[str] = []
    for spec in specs:
        source = resolve_data(spec, root)
        if isinstance(source, Path):
            out.extend(read_jsonl_texts(source) if source.suffix == ".jsonl" else read_lines(source))
        else:
            out.extend(t for t in _hub(source)["text"] if t.strip())
    return out


def read_jsonl_texts(path: Path) -> list[str]:
    return [r["text"] for r in read_jsonl(path, {"text": str})]


def sentences(specs: list[str], root: str | os.PathLike | None = None) -> list[str]:
    """Unique sentences, first occurrence order (SimCSE's training set)."""
    return list(dict.fromkeys(t.strip() for t in texts(specs, root) if t.strip()))


def chunks(
    tokenizer: PreTrainedTokenizerBase, specs: list[str], length: int, root: str | os.PathLike | None = None
) -> list[list[int]]:
    """Texts tokenized in one call, joined with EOS and cut into chunks of exactly ``length`` tokens (MNTP)."""
    ids = tokenizer(texts(specs, root), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [token for row in ids for token in row + eos]
    out = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
    if not out:
        raise ValueError(f"the MNTP data has {len(stream)} tokens: fewer than one chunk of {length}")
    return out


def triplets(specs: list[str], root: str | os.PathLike | None = None) -> list[Triplet]:
    """(query, positive, negative) records; the dataset is named after the file's folder (or the hub id)."""
    if not specs:
        raise ValueError("no training data given")
    fields = {"query": str, "positive": str, "negative": str}
    out: list[Triplet] = []
    for spec in specs:
        source = resolve_data(spec, root)
        if isinstance(source, Path):
            name = source.parent.name if source.stem == "train" else source.stem
            out.extend(Triplet(name, r["query"], r["positive"], r["negative"]) for r in read_jsonl(source, fields))
        else:
            rows = _hub(source)
            out.extend(
                Triplet(source, q, p, n)
                for q, p, n in zip(rows["query"], rows["positive"], rows["negative"], strict=True)
            )
    return out
