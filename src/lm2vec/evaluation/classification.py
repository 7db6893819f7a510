"""Classification with MTEB's protocol: logistic regression on a few embedded examples per label, x100.

MTEB (``AbsTaskClassification``) runs ``n_experiments`` (10) experiments; each trains
``LogisticRegression(max_iter=100, random_state=seed)`` on the train split undersampled to ``samples_per_label`` (8)
examples per label and scores it on the whole test split. Accuracy (the main score), macro F1 and weighted F1 are
averaged over the experiments.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from ..datafiles import data_file, read_jsonl
from .base import NO_INSTRUCTIONS, Instructions, TaskResult, TextEncoder, embed_unique, sample_indices

Label = str | int


@dataclass(frozen=True)
class ClassificationData:
    name: str
    train_texts: list[str]
    train_labels: list[Label]
    test_texts: list[str]
    test_labels: list[Label]


def load_classification(name: str = "banking77", data: str | os.PathLike | None = None) -> ClassificationData:
    """Read ``classification/NAME/{train,test}.jsonl`` (fields ``text``, ``label``) under the data directory."""
    splits = {}
    for split in ("train", "test"):
        records = read_jsonl(
            data_file(data, "classification", name, f"{split}.jsonl"), {"text": str, "label": (str, int)}
        )
        splits[split] = [r["text"] for r in records], [r["label"] for r in records]
    return ClassificationData(name, *splits["train"], *splits["test"])


def undersample(labels: Sequence[Hashable], samples_per_label: int, n_experiments: int, seed: int) -> list[list[int]]:
    """The train indices of each experiment, drawn exactly as MTEB's ``_undersample_data`` draws them.

    MTEB keeps one index list and, before each experiment, shuffles it again with a fresh
    ``np.random.RandomState(seed)``; an experiment takes the first ``samples_per_label`` indices of each label in
    that order (all of them for a rarer label). Reproducing this keeps the same train sets as MTEB.
    """
    order = list(range(len(labels)))
    experiments = []
    for _ in range(n_experiments):
        np.random.RandomState(seed).shuffle(order)
        taken: dict[Hashable, int] = defaultdict(int)
        chosen = []
        for i in order:
            if taken[labels[i]] < samples_per_label:
                chosen.append(i)
                taken[labels[i]] += 1
        experiments.append(chosen)
    return experiments


def classification_scores(
    train_embeddings: np.ndarray,
    train_labels: Sequence[Label],
    test_embeddings: np.ndarray,
    test_labels: Sequence[Label],
    seed: int = 42,
) -> dict[str, float]:
    """One experiment: MTEB's logistic regression fitted on train, scored on test (fractions, not x100).

    ``max_iter=100`` is MTEB's setting and it does not check convergence, so convergence warnings are silenced
    rather than repeated for every experiment. Undefined per-label F1 (a label never predicted) counts as 0, as
    with scikit-learn's default, without its warning.
    """
    classifier = LogisticRegression(max_iter=100, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(train_embeddings, list(train_labels))
    predicted = classifier.predict(test_embeddings)
    truth = list(test_labels)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "f1": float(f1_score(truth, predicted, average="macro", zero_division=0.0)),
        "f1_weighted": float(f1_score(truth, predicted, average="weighted", zero_division=0.0)),
    }


def evaluate_classification(
    encoder: TextEncoder,
    data: str | os.PathLike | None = None,
    instructions: Instructions = NO_INSTRUCTIONS,
    batch_size: int = 32,
    seed: int = 42,
    *,
    name: str = "banking77",
    samples_per_label: int = 8,
    n_experiments: int = 10,
    max_samples: int | None = None,
    show_progress_bar: bool | None = None,
) -> TaskResult:
    """Score ``encoder`` on ``classification/NAME`` with MTEB's protocol (main score: accuracy x100).

    Texts get ``instructions.query`` (only one side is embedded). Each distinct text among the experiments' train
    sets and the test set is embedded once, in one call. ``max_samples`` keeps a seeded random sample of that many
    test examples (not stratified) to fit a CPU budget; MTEB itself scores the whole test split.
    """
    if n_experiments < 1 or samples_per_label < 1:
        raise ValueError(
            f"need n_experiments >= 1 and samples_per_label >= 1, got {n_experiments}, {samples_per_label}"
        )
    start = time.perf_counter()
    dataset = load_classification(name, data)
    experiments = undersample(dataset.train_labels, samples_per_label, n_experiments, seed)
    test = sample_indices(len(dataset.test_texts), max_samples, seed)
    train_union = sorted(set().union(*experiments))
    texts = [dataset.train_texts[i] for i in train_union] + [dataset.test_texts[i] for i in test]
    embeddings = embed_unique(encoder, texts, instructions.query, batch_size, show_progress_bar)
    train_row = {index: row for row, index in enumerate(train_union)}
    test_embeddings, test_labels = embeddings[len(train_union) :], [dataset.test_labels[i] for i in test]
    runs = [
        classification_scores(
            embeddings[[train_row[i] for i in chosen]],
            [dataset.train_labels[i] for i in chosen],
            test_embeddings,
            test_labels,
            seed,
        )
        for chosen in experiments
    ]
    return TaskResult(
        task=name,
        type="classification",
        main_metric="accuracy",
        scores={metric: 100 * float(np.mean([run[metric] for run in runs])) for metric in runs[0]},
        samples={"train": len(experiments[0]), "test": len(test), "experiments": n_experiments},
        seconds=time.perf_counter() - start,
    )
