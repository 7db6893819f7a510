"""Semantic textual similarity: Spearman (x100) of the cosine similarity against gold scores, as MTEB reports it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from ..datafiles import data_dir, read_jsonl
from .base import NO_INSTRUCTIONS, Instructions, TaskResult, TextEncoder


@dataclass(frozen=True)
class STSPairs:
    sentence1: list[str]
    sentence2: list[str]
    scores: np.ndarray

    def interleaved_sentences(self) -> list[str]:
        """Each distinct sentence once, in file order (sentence1, then sentence2 of each pair): benchmark texts."""
        return list(dict.fromkeys(s for pair in zip(self.sentence1, self.sentence2, strict=True) for s in pair))


def load_sts(
    name: str = "stsb", split: str = "test", data: str | os.PathLike | None = None, limit: int | None = None
) -> STSPairs:
    """Read ``sts/NAME/SPLIT.jsonl`` under the data directory (the first ``limit`` pairs if given)."""
    path = Path(data if data is not None else data_dir()) / "sts" / name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (set LM2VEC_DATA or pass data= to point at the datasets)")
    fields = {"sentence1": str, "sentence2": str, "score": (int, float)}
    records = read_jsonl(path, fields)[:limit]
    return STSPairs(
        [r["sentence1"] for r in records],
        [r["sentence2"] for r in records],
        np.array([r["score"] for r in records], dtype=np.float64),
    )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``, in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def correlations(similarities: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(Spearman x100, Pearson x100) of predicted similarities against gold scores."""
    if len(similarities) != len(scores) or len(scores) < 2:
        raise ValueError(f"need two equally long arrays of at least 2 items, got {len(similarities)} and {len(scores)}")
    return 100 * float(spearmanr(similarities, scores).statistic), 100 * float(pearsonr(similarities, scores).statistic)


def score_pairs(
    encoder: TextEncoder,
    pairs: STSPairs,
    batch_size: int = 32,
    instruction: str | None = None,
    show_progress_bar: bool | None = None,
) -> tuple[float, float]:
    """(Spearman x100, Pearson x100) of the encoder's cosine similarities; each distinct sentence embedded once."""
    unique = list(dict.fromkeys(pairs.sentence1 + pairs.sentence2))
    embeddings = np.asarray(
        encoder.encode(unique, instruction=instruction, batch_size=batch_size, show_progress_bar=show_progress_bar)
    )
    row = {sentence: i for i, sentence in enumerate(unique)}
    similarities = cosine_rows(
        embeddings[[row[s] for s in pairs.sentence1]], embeddings[[row[s] for s in pairs.sentence2]]
    )
    return correlations(similarities, pairs.scores)


def evaluate_sts(
    encoder: TextEncoder,
    split: str = "test",
    name: str = "stsb",
    data: str | os.PathLike | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    show_progress_bar: bool | None = None,
    instructions: Instructions = NO_INSTRUCTIONS,
) -> TaskResult:
    """Score ``encoder`` on an STS split (main score: Spearman x100). Each distinct sentence is embedded once.

    STS is symmetric: both sentences get ``instructions.query``.
    """
    start = time.perf_counter()
    pairs = load_sts(name, split, data, limit)
    spearman, pearson = score_pairs(encoder, pairs, batch_size, instructions.query, show_progress_bar)
    return TaskResult(
        task=name if split == "test" else f"{name}-{split}",
        type="sts",
        main_metric="spearman",
        scores={"spearman": spearman, "pearson": pearson},
        samples={"pairs": len(pairs.scores)},
        seconds=time.perf_counter() - start,
    )
