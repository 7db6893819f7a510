"""Reranking with MTEB's metrics: rank each query's candidates by cosine similarity; MAP (main) and MRR@10, x100.

MTEB 2 turns a reranking sample into a small retrieval task: the positives become documents
``apositive_<query>_<i:05d>`` of grade 1, the negatives ``negative_<query>_<i:05d>`` of grade 0, and the run is
scored by trec_eval, which breaks score ties by descending id. So a negative tied with a positive ranks above it,
and samples with no positive or no negative are dropped. The same ids and metrics are used here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..datafiles import data_file, numbered_lines, read_jsonl
from .base import NO_INSTRUCTIONS, Instructions, TaskResult, TextEncoder, embed_unique
from .retrieval import average_precision_at_k, rank_run, reciprocal_rank_at_k, unit_rows

MAP_CUTOFF = 1000  # MTEB keeps the top 1000 candidates and reports MAP@1000 as the main score


@dataclass(frozen=True)
class RerankingSample:
    query: str
    positive: list[str]
    negative: list[str]


@dataclass(frozen=True)
class RerankingData:
    name: str
    split: str
    samples: list[RerankingSample]


def load_reranking(name: str, split: str = "test", data: str | os.PathLike | None = None) -> RerankingData:
    """Read ``reranking/NAME/SPLIT.jsonl`` (``query``, ``positive`` and ``negative`` lists of texts), MTEB's format.

    Samples without a positive or without a negative are dropped, as MTEB drops them.
    """
    path = data_file(data, "reranking", name, f"{split}.jsonl")
    records = read_jsonl(path, {"query": str, "positive": list, "negative": list})
    samples = []
    for (number, _), record in zip(numbered_lines(path), records, strict=True):
        for side in ("positive", "negative"):
            if not all(isinstance(text, str) for text in record[side]):
                raise ValueError(f"{path}:{number}: field {side!r} must be a list of strings")
        if record["positive"] and record["negative"]:
            samples.append(RerankingSample(record["query"], record["positive"], record["negative"]))
    if not samples:
        raise ValueError(f"{path}: no sample has both a positive and a negative")
    return RerankingData(name, split, samples)


def reranking_metrics(similarities: Sequence[float], n_positive: int) -> tuple[float, float]:
    """(average precision@1000, reciprocal rank@10) of one sample, as fractions.

    ``similarities`` holds the positives' scores, then the negatives'; each candidate gets MTEB's id for its tie-break.
    """
    ids = [f"apositive_{i:05d}" for i in range(n_positive)]
    ids += [f"negative_{i:05d}" for i in range(len(similarities) - n_positive)]
    judged = {doc: int(i < n_positive) for i, doc in enumerate(ids)}
    ranked = rank_run(dict(zip(ids, map(float, similarities), strict=True)))
    return average_precision_at_k(ranked, judged, MAP_CUTOFF), reciprocal_rank_at_k(ranked, judged, 10)


def evaluate_reranking(
    encoder: TextEncoder,
    data: str | os.PathLike | None = None,
    instructions: Instructions = NO_INSTRUCTIONS,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
    *,
    name: str,
    split: str = "test",
) -> TaskResult:
    """Score ``encoder`` on ``reranking/NAME/SPLIT.jsonl`` as MTEB does (main score: MAP x100).

    Queries get ``instructions.query``, candidates ``instructions.document``; each distinct query and each distinct
    candidate is embedded once. MAP is MTEB's ``map_at_1000``, the same number when a query has at most 1000
    candidates.
    """
    start = time.perf_counter()
    dataset = load_reranking(name, split, data)
    queries = unit_rows(
        embed_unique(encoder, [s.query for s in dataset.samples], instructions.query, batch_size, show_progress_bar)
    )
    texts = [text for s in dataset.samples for text in s.positive + s.negative]
    candidates = unit_rows(embed_unique(encoder, texts, instructions.document, batch_size, show_progress_bar))
    results, first = [], 0  # the sample's candidates are rows first..last of ``candidates``
    for query, sample in zip(queries, dataset.samples, strict=True):
        last = first + len(sample.positive) + len(sample.negative)
        similarities, first = candidates[first:last] @ query, last
        if np.isnan(similarities).any():
            raise ValueError("NaN similarity: the encoder returned NaN embeddings")
        results.append(reranking_metrics(similarities, len(sample.positive)))
    average_precision, reciprocal_rank = np.mean(results, axis=0)
    return TaskResult(
        task=name if split == "test" else f"{name}-{split}",
        type="reranking",
        main_metric="map",
        scores={"map": 100 * float(average_precision), "mrr_at_10": 100 * float(reciprocal_rank)},
        samples={
            "queries": len(dataset.samples),
            "candidates": sum(len(s.positive) + len(s.negative) for s in dataset.samples),
        },
        seconds=time.perf_counter() - start,
    )
