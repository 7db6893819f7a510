"""Pair classification as MTEB scores it: how well the cosine similarity of a pair separates positives, x100.

MTEB (``AbsTaskPairClassification``) reports, per similarity, the average precision (the main score is
``max_ap`` over similarities; here only cosine is computed, so the main score is ``cosine_ap``) and the accuracy
and F1 at the best threshold, where a threshold may only fall between two distinct scores.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score

from ..datafiles import data_file, read_jsonl
from .base import NO_INSTRUCTIONS, Instructions, TaskResult, TextEncoder, sample_indices
from .sts import pair_cosines


@dataclass(frozen=True)
class PairClassificationData:
    name: str
    sentence1: list[str]
    sentence2: list[str]
    labels: np.ndarray


def load_pair_classification(name: str = "snli", data: str | os.PathLike | None = None) -> PairClassificationData:
    """Read ``pair_classification/NAME/test.jsonl`` (``sentence1``, ``sentence2``, ``label`` 1 or 0)."""
    path = data_file(data, "pair_classification", name, "test.jsonl")
    records = read_jsonl(path, {"sentence1": str, "sentence2": str, "label": int})
    for number, record in enumerate(records, start=1):
        if record["label"] not in (0, 1):
            raise ValueError(
                f"{path}: record {number} (blank lines not counted) has label {record['label']!r}, not 1/0"
            )
    labels = np.array([r["label"] for r in records], dtype=np.int64)
    return PairClassificationData(name, [r["sentence1"] for r in records], [r["sentence2"] for r in records], labels)


def _cuts(similarities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives above, pairs above) for each threshold between two distinct neighbouring similarities.

    MTEB walks the pairs from most to least similar and skips cuts inside ties, so that the order of tied pairs
    cannot change the metric; it never tries "all positive" or "all negative".
    """
    order = np.argsort(-np.asarray(similarities, dtype=np.float64), kind="stable")
    ranked, ranked_labels = np.asarray(similarities)[order], np.asarray(labels)[order]
    between_distinct = ranked[:-1] != ranked[1:]
    positives_above = np.cumsum(ranked_labels)[:-1]
    pairs_above = np.arange(1, len(ranked))
    return positives_above[between_distinct], pairs_above[between_distinct]


def best_accuracy(similarities: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy (0-1) of "positive if more similar than t" at the best threshold t (0 when no threshold exists)."""
    positives_above, pairs_above = _cuts(similarities, labels)
    negatives = len(labels) - int(np.sum(labels))
    correct = positives_above + negatives - (pairs_above - positives_above)
    return float(correct.max(initial=0) / len(labels))


def best_f1(similarities: np.ndarray, labels: np.ndarray) -> float:
    """F1 (0-1) of the positive class at the best threshold (0 when no threshold exists)."""
    positives_above, pairs_above = _cuts(similarities, labels)
    f1 = 2 * positives_above / (pairs_above + int(np.sum(labels)))  # 2PR / (P + R), with P = tp/above, R = tp/pos
    return float(f1.max(initial=0))


def pair_classification_scores(similarities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Average precision, best accuracy and best F1 of similarities against 1/0 labels (0-1, not x100)."""
    return {
        "ap": float(average_precision_score(labels, similarities)),
        "accuracy": best_accuracy(similarities, labels),
        "f1": best_f1(similarities, labels),
    }


def evaluate_pair_classification(
    encoder: TextEncoder,
    data: str | os.PathLike | None = None,
    instructions: Instructions = NO_INSTRUCTIONS,
    batch_size: int = 32,
    seed: int = 42,
    *,
    name: str = "snli",
    max_samples: int | None = None,
    show_progress_bar: bool | None = None,
) -> TaskResult:
    """Score ``encoder`` on ``pair_classification/NAME`` (main score: cosine average precision x100).

    The task is symmetric: both sentences get ``instructions.query`` (pass ``Instructions.symmetric(...)``), which
    lets each distinct sentence be embedded once. ``max_samples`` keeps a seeded random sample of that many pairs
    (in file order) to fit a CPU budget; MTEB scores every pair.
    """
    start = time.perf_counter()
    dataset = load_pair_classification(name, data)
    chosen = sample_indices(len(dataset.labels), max_samples, seed)
    sentence1, sentence2 = [dataset.sentence1[i] for i in chosen], [dataset.sentence2[i] for i in chosen]
    labels = dataset.labels[chosen]
    similarities = pair_cosines(encoder, sentence1, sentence2, instructions.query, batch_size, show_progress_bar)
    scores = pair_classification_scores(similarities, labels)
    return TaskResult(
        task=name,
        type="pair_classification",
        main_metric="cosine_ap",
        scores={f"cosine_{metric}": 100 * value for metric, value in scores.items()},
        samples={"pairs": len(labels), "positives": int(labels.sum())},
        seconds=time.perf_counter() - start,
    )
