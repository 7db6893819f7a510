"""Training data: local files (or names under the shared data folder) and hub datasets, read once, checked.

Errors name the file and line (``lm2vec.datafiles``); a spec that is neither a file nor a plausible hub id
is refused before anything is trained.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..datafiles import data_dir, first_record, read_jsonl, read_lines


@dataclass(frozen=True)
class Triplet:
    """A supervised example; ``negative`` None in (query, positive) pair data (in-batch negatives only)."""

    dataset: str
    query: str
    positive: str
    negative: str | None = None


# The query's column: lm2vec's and the reference's name, then sentence-transformers' (its hub datasets' "anchor").
QUERY_COLUMNS = ("query", "anchor")


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
            rows = _hub(source)
            if "text" not in rows.column_names:
                raise ValueError(f"{source}: MNTP and SimCSE data needs a 'text' column; it has {rows.column_names}")
            out.extend(t for t in rows["text"] if t.strip())
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
    """(query, positive, negative) records, or (query, positive) pairs where a file or hub dataset has no negative
    column; ``anchor`` is taken for ``query`` (sentence-transformers' datasets). The dataset is named after the file's
    folder (or the hub id). Triplets and pairs are not mixed in one run: every batch, and under DDP every device's
    share of it, has the same number of candidates."""
    if not specs:
        raise ValueError("no training data given")
    out: list[Triplet] = []
    for spec in specs:
        source = resolve_data(spec, root)
        if isinstance(source, Path):
            name = source.parent.name if source.stem == "train" else source.stem
            query, negative = _columns(first_record(source))  # the first record sets the columns of every line
            fields = dict.fromkeys([query, "positive", *([negative] if negative else [])], str)
            records = read_jsonl(source, fields)
        else:
            name, rows = source, _hub(source)
            query, negative = _columns(rows.column_names)
            if query not in rows.column_names or "positive" not in rows.column_names:
                raise ValueError(
                    f"{source}: supervised data needs the columns query (or anchor) and positive, optionally "
                    f"negative; it has {rows.column_names}"
                )
            records = rows.select_columns([query, "positive", *([negative] if negative else [])]).to_list()
        out.extend(Triplet(name, r[query], r["positive"], r[negative] if negative else None) for r in records)
    kinds = {t.dataset: t.negative is not None for t in out}
    if len(set(kinds.values())) > 1:
        pairs = sorted(name for name, has in kinds.items() if not has)
        raise ValueError(
            f"the supervised data mixes (query, positive) pairs ({', '.join(pairs)}) with triplets that have a "
            "negative: train on one kind"
        )
    return out


def _columns(names: Iterable[str]) -> tuple[str, str | None]:
    """The query's column (the first of :data:`QUERY_COLUMNS` present, else "query" for the error to name) and the
    negative's, if there is one."""
    names = set(names)
    query = next((column for column in QUERY_COLUMNS if column in names), QUERY_COLUMNS[0])
    return query, "negative" if "negative" in names else None
