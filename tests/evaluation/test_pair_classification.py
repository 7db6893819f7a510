"""Pair classification: AP and best-threshold accuracy/F1 against hand and brute-force computations, end to end."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

from lm2vec.datafiles import data_dir
from lm2vec.evaluation.base import Instructions
from lm2vec.evaluation.pair_classification import (
    best_accuracy,
    best_f1,
    evaluate_pair_classification,
    load_pair_classification,
    pair_classification_scores,
)
from tests.support import TableEncoder, needs_data, record_encode_calls, word_encoder, write_jsonl

SNLI = data_dir() / "pair_classification" / "snli" / "test.jsonl"
needs_snli = needs_data("pair_classification/snli/test.jsonl")


def brute_force(similarities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best (accuracy, F1) over every threshold halfway between two distinct similarities, scored by sklearn."""
    values = np.unique(similarities)
    thresholds = (values[:-1] + values[1:]) / 2
    predictions = [(similarities > t).astype(int) for t in thresholds]
    return (
        max((accuracy_score(labels, p) for p in predictions), default=0.0),
        max((f1_score(labels, p, zero_division=0.0) for p in predictions), default=0.0),
    )


def torch_cosines(vectors: dict[str, torch.Tensor], first: list[str], second: list[str]) -> np.ndarray:
    a, b = torch.stack([vectors[s] for s in first]).double(), torch.stack([vectors[s] for s in second]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()


def test_five_pairs_by_hand():
    sims = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 1, 0])
    # Positives at ranks 1, 3, 4: precision there is 1/1, 2/3, 3/4.
    ap = (1 + 2 / 3 + 3 / 4) / 3
    # Cutting after rank 4 predicts 1,1,1,1,0: one error (rank 2); P = 3/4, R = 1, F1 = 6/7 (the best cut for both).
    scores = pair_classification_scores(sims, labels)
    assert scores["ap"] == pytest.approx(ap) == average_precision_score(labels, sims)
    assert scores["accuracy"] == pytest.approx(4 / 5)
    assert scores["f1"] == pytest.approx(6 / 7)


def test_a_threshold_never_splits_tied_similarities():
    sims = np.array([0.9, 0.5, 0.5, 0.1])
    # Splitting the tie would classify all four right; the allowed cuts (after 0.9, after the 0.5s) get 3 of 4.
    assert best_accuracy(sims, np.array([1, 1, 0, 0])) == best_accuracy(sims, np.array([1, 0, 1, 0])) == 0.75
    assert best_f1(sims, np.array([1, 1, 0, 0])) == pytest.approx(0.8)  # cut after the 0.5s: P = 2/3, R = 1
    # All tied: no threshold at all, which MTEB scores 0.
    assert (
        best_accuracy(np.full(4, 0.3), np.array([1, 0, 1, 0])) == best_f1(np.full(4, 0.3), np.array([1, 0, 1, 0])) == 0
    )


def test_best_thresholds_match_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(5):
        labels = rng.integers(0, 2, size=200)
        sims = np.round(rng.normal(size=200) + labels * trial * 0.5, 1)  # rounding makes many ties
        accuracy, f1 = brute_force(sims, labels)
        assert best_accuracy(sims, labels) == pytest.approx(accuracy, abs=1e-12)
        assert best_f1(sims, labels) == pytest.approx(f1, abs=1e-12)


def test_scores_match_mteb():
    mteb_pairs = pytest.importorskip("mteb.abstasks.pair_classification", reason="mteb (the eval extra) not installed")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=300)
    sims = np.round(rng.normal(size=300) + labels, 2)
    task = object.__new__(mteb_pairs.AbsTaskPairClassification)  # the metric methods use no task state
    expected = task._compute_metrics_values(sims.tolist(), labels, True)
    ours = pair_classification_scores(sims, labels)
    for metric in ("ap", "accuracy", "f1"):
        assert ours[metric] == pytest.approx(expected[metric], abs=1e-12)


def test_evaluate_on_handmade_pairs(tmp_path):
    table = {"a": [1, 0], "b": [0.9, 0.1], "c": [0, 1], "d": [-1, 0.2], "e": [0.6, 0.6]}
    pairs = [("a", "b", 1), ("a", "c", 0), ("a", "e", 1), ("c", "d", 0), ("e", "c", 1), ("b", "d", 0)]
    write_jsonl(
        tmp_path / "pair_classification" / "toy" / "test.jsonl",
        [{"sentence1": s1, "sentence2": s2, "label": y} for s1, s2, y in pairs],
    )
    encoder = TableEncoder(table)
    result = evaluate_pair_classification(encoder, tmp_path, Instructions.symmetric("Same meaning?"), name="toy")

    assert len(encoder.calls) == 1
    assert sorted(encoder.calls[0][0]) == sorted(table) and encoder.calls[0][1] == "Same meaning?"
    vectors = {s: torch.tensor(v) for s, v in table.items()}
    sims = torch_cosines(vectors, [s1 for s1, *_ in pairs], [s2 for _, s2, _ in pairs])
    labels = np.array([y for *_, y in pairs])
    accuracy, f1 = brute_force(sims, labels)
    assert (result.task, result.type, result.main_metric) == ("toy", "pair_classification", "cosine_ap")
    assert result.main_score == pytest.approx(100 * average_precision_score(labels, sims))
    assert result.scores["cosine_accuracy"] == pytest.approx(100 * accuracy)
    assert result.scores["cosine_f1"] == pytest.approx(100 * f1)
    assert result.samples == {"pairs": 6, "positives": 3}

    sampled = evaluate_pair_classification(TableEncoder(table), tmp_path, name="toy", max_samples=4, seed=3)
    assert sampled.samples["pairs"] == 4
    assert (
        sampled.scores
        == evaluate_pair_classification(TableEncoder(table), tmp_path, name="toy", max_samples=4, seed=3).scores
    )


def test_loader_errors_name_the_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "pair_classification" / "toy" / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1}]
    )
    with path.open("a") as f:
        f.write('{"sentence1": "a", "sentence2": "b", "label": "yes"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: field 'label' is str")):
        load_pair_classification("toy", tmp_path)
    write_jsonl(
        path, [{"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "a", "sentence2": "b", "label": 2}]
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 2") + ".*not 1/0"):
        load_pair_classification("toy", tmp_path)
    with pytest.raises(FileNotFoundError, match="LM2VEC_DATA"):
        load_pair_classification("absent", tmp_path)


@needs_snli
def test_evaluate_snli_end_to_end(monkeypatch):
    data = load_pair_classification("snli")
    encoder = word_encoder(data.sentence1 + data.sentence2)
    calls = record_encode_calls(monkeypatch, encoder)
    result = evaluate_pair_classification(encoder, max_samples=150, batch_size=64)

    chosen = np.sort(np.random.default_rng(42).choice(len(data.labels), size=150, replace=False))
    s1, s2 = [data.sentence1[i] for i in chosen], [data.sentence2[i] for i in chosen]
    labels = data.labels[chosen]
    assert len(calls) == 1 and sorted(calls[0][0]) == sorted(set(s1 + s2))
    assert result.samples == {"pairs": 150, "positives": int(labels.sum())}

    # Independently: look each side up, cosine with torch, AP from sklearn, thresholds by brute force.
    vector = {s: torch.from_numpy(e) for s, e in zip(*calls[0], strict=True)}
    sims = torch_cosines(vector, s1, s2)
    assert np.unique(sims.round(6)).size > 100  # the random model tells most pairs apart
    accuracy, f1 = brute_force(sims, labels)
    assert result.main_score == pytest.approx(100 * average_precision_score(labels, sims), abs=1e-6)
    assert result.scores["cosine_accuracy"] == pytest.approx(100 * accuracy, abs=1e-6)
    assert result.scores["cosine_f1"] == pytest.approx(100 * f1, abs=1e-6)
