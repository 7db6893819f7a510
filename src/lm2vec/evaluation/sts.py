"""Semantic textual similarity: Spearman (x100) of the cosine similarity against gold scores, as MTEB reports it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr, spearmanr

from ..datafiles import data_file, read_jsonl
from .base import NO_INSTRUCTIONS, Instructions, TaskResult, TextEncoder, embed_unique


@dataclass(frozen=True)
class STSPairs:
    sentence1: list[str]
    sentence2: list[str]
    scores: np.ndarray

    def interleaved_sentences(self) -> list[str]:
        """Each distinct sentence once, in file order (sentence1, then sentence2 of each pair): benchmark texts."""
        return list(dict.fromkeys(s for pair in zip(self.sentence1, self.sentence2, strict=True) for s in pair))


def load_sts(
    name: str = "stsb", split: str = "test", data: str | os.PathLike | None = None, max_samples: int | None = None
) -> STSPairs:
    """Read ``sts/NAME/SPLIT.jsonl`` under the data directory (the first ``max_samples`` pairs if given)."""
    fields = {"sentence1": str, "sentence2": str, "score": (int, float)}
    records = read_jsonl(data_file(data, "sts", name, f"{split}.jsonl"), fields)[:max_samples]
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


def pair_cosines(
    encoder: TextEncoder,
    sentence1: list[str],
    sentence2: list[str],
    instruction: str | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> np.ndarray:
    """Cosine similarity of each pair (``sentence1[i]``, ``sentence2[i]``), each distinct sentence embedded once."""
    embeddings = embed_unique(encoder, sentence1 + sentence2, instruction, batch_size, show_progress_bar)
    return cosine_rows(embeddings[: len(sentence1)], embeddings[len(sentence1) :])


def score_pairs(
    encoder: TextEncoder,
    pairs: STSPairs,
    batch_size: int = 32,
    instruction: str | None = None,
    show_progress_bar: bool | None = None,
) -> tuple[float, float]:
    """(Spearman x100, Pearson x100) of the encoder's cosine similarities; each distinct sentence embedded once."""
    similarities = pair_cosines(encoder, pairs.sentence1, pairs.sentence2, instruction, batch_size, show_progress_bar)
    return correlations(similarities, pairs.scores)


def evaluate_sts(
    encoder: TextEncoder,
    split: str = "test",
    name: str = "stsb",
    data: str | os.PathLike | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    show_progress_bar: bool | None = None,
    instructions: Instructions = NO_INSTRUCTIONS,
) -> TaskResult:
    """Score ``encoder`` on an STS split (main score: Spearman x100). Each distinct sentence is embedded once.

    STS is symmetric: both sentences get ``instructions.query``.
    """
    start = time.perf_counter()
    pairs = load_sts(name, split, data, max_samples)
    spearman, pearson = score_pairs(encoder, pairs, batch_size, instructions.query, show_progress_bar)
    return TaskResult(
        task=name if split == "test" else f"{name}-{split}",
        type="sts",
        main_metric="spearman",
        scores={"spearman": spearman, "pearson": pearson},
        samples={"pairs": len(pairs.scores)},
        seconds=time.perf_counter() - start,
    )


def sts_by_dimension(
    encoder: TextEncoder,
    dims: list[int],
    split: str = "test",
    name: str = "stsb",
    data: str | os.PathLike | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
) -> dict[int, float]:
    """Spearman x100 with the embeddings cut to each of ``dims`` leading dimensions (``truncate_dim``), from one
    encoding: how much a Matryoshka-trained encoder keeps when truncated."""
    pairs = load_sts(name, split, data, max_samples)
    n = len(pairs.sentence1)
    embeddings = embed_unique(encoder, pairs.sentence1 + pairs.sentence2, None, batch_size)
    if any(not isinstance(d, int) or not 1 <= d <= embeddings.shape[1] for d in dims):
        raise ValueError(f"dims must be integers from 1 to the dimension {embeddings.shape[1]}, got {dims!r}")
    return {d: correlations(cosine_rows(embeddings[:n, :d], embeddings[n:, :d]), pairs.scores)[0] for d in dims}
