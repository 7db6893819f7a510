"""Classification: undersampling as mteb draws it, the metrics by hand, and a run on Banking77."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from lm2vec.datafiles import data_dir
from lm2vec.evaluation.base import Instructions
from lm2vec.evaluation.classification import (
    classification_scores,
    evaluate_classification,
    load_classification,
    undersample,
)
from tests.support import TableEncoder, needs_data, record_encode_calls, word_encoder, write_jsonl

BANKING77 = data_dir() / "classification" / "banking77"
needs_banking77 = needs_data("classification/banking77/train.jsonl", "classification/banking77/test.jsonl")


def test_undersample_takes_samples_per_label_of_each_label():
    labels = ["a"] * 20 + ["b"] * 12 + ["c"] * 3 + ["a"] * 5
    experiments = undersample(labels, samples_per_label=8, n_experiments=5, seed=42)
    assert len(experiments) == 5
    for chosen in experiments:
        assert len(set(chosen)) == len(chosen)
        assert Counter(labels[i] for i in chosen) == {"a": 8, "b": 8, "c": 3}  # all of a rarer label
    assert len({tuple(sorted(chosen)) for chosen in experiments}) == 5  # each experiment draws anew
    assert undersample(labels, 8, 5, seed=42) == experiments
    assert undersample(labels, 8, 5, seed=43) != experiments


def test_undersample_matches_mteb():
    mteb_classification = pytest.importorskip("mteb.abstasks.classification", reason="mteb (eval extra) not installed")
    from datasets import Dataset

    labels = [f"label{i}" for i in np.random.default_rng(0).integers(0, 6, size=120)]
    dataset = Dataset.from_dict({"label": labels})
    task = SimpleNamespace(seed=7, samples_per_label=4, label_column_name="label")  # all _undersample_data reads
    order, expected = None, []
    for i in range(10):
        _, order, chosen = mteb_classification.AbsTaskClassification._undersample_data(task, dataset, i, order)
        expected.append(chosen)
    assert undersample(labels, samples_per_label=4, n_experiments=10, seed=7) == expected


def test_scores_on_separable_embeddings_by_hand():
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(size=(8, 2)) + [6, 0], rng.normal(size=(8, 2)) - [6, 0]])
    train_labels = ["A"] * 8 + ["B"] * 8
    # Test: 4 A and 3 B on their sides, and one "C" (a label never trained on) on A's side.
    test = np.concatenate([rng.normal(size=(5, 2)) + [6, 0], rng.normal(size=(3, 2)) - [6, 0]])
    test_labels = ["A"] * 4 + ["C"] + ["B"] * 3
    scores = classification_scores(train, train_labels, test, test_labels)
    # Predictions are A x5, B x3: 7 of 8 right. F1: A has P = 4/5, R = 1; B is perfect; C is never predicted: 0.
    f1 = {"A": 2 * (4 / 5) / (4 / 5 + 1), "B": 1.0, "C": 0.0}
    support = {"A": 4, "B": 3, "C": 1}
    assert scores["accuracy"] == pytest.approx(7 / 8)
    assert scores["f1"] == pytest.approx(sum(f1.values()) / 3)
    assert scores["f1_weighted"] == pytest.approx(sum(f1[k] * support[k] for k in f1) / 8)


def toy_dataset(root: Path) -> dict[str, np.ndarray]:
    """Integer labels 0/1 on either side of x = 0; label 2 only in test, on 0's side. Returns the text->vector table."""
    rng = np.random.default_rng(1)
    centre = {0: [5.0, 0.0], 1: [-5.0, 0.0], 2: [5.0, 0.0]}
    train = [(f"train {i}", i % 2) for i in range(60)] + [("shared", 1)]
    test = [(f"test {i}", i % 2) for i in range(10)] + [("shared", 1), ("odd one", 2), ("shared", 1)]
    for split, rows in (("train", train), ("test", test)):
        write_jsonl(root / "classification" / "toy" / f"{split}.jsonl", [{"text": t, "label": y} for t, y in rows])
    return {t: rng.normal(size=2) + centre[y] for t, y in train + test}


def test_evaluate_on_a_handmade_dataset(tmp_path):
    encoder = TableEncoder(toy_dataset(tmp_path))
    result = evaluate_classification(
        encoder, tmp_path, Instructions("Classify the intent", "ignored"), name="toy", samples_per_label=2
    )
    # Every experiment predicts the side of x = 0: right except "odd one" (label 2). Test labels: 0 x5, 1 x7, 2 x1.
    f1 = {0: 2 * (5 / 6) / (5 / 6 + 1), 1: 1.0, 2: 0.0}
    assert (result.task, result.type, result.main_metric) == ("toy", "classification", "accuracy")
    assert result.main_score == pytest.approx(100 * 12 / 13)
    assert result.scores["f1"] == pytest.approx(100 * sum(f1.values()) / 3)
    assert result.scores["f1_weighted"] == pytest.approx(100 * (5 * f1[0] + 7 * f1[1]) / 13)
    assert result.samples == {"train": 4, "test": 13, "experiments": 10}

    # One call, each distinct text once: the union of the experiments' train sets and the test set.
    train_texts, train_labels = [f"train {i}" for i in range(60)] + ["shared"], [i % 2 for i in range(60)] + [1]
    union = {train_texts[i] for chosen in undersample(train_labels, 2, 10, seed=42) for i in chosen}
    test_texts = {f"test {i}" for i in range(10)} | {"shared", "odd one"}
    assert len(encoder.calls) == 1 and encoder.calls[0][1] == "Classify the intent"
    assert len(encoder.calls[0][0]) == len(set(encoder.calls[0][0])) and set(encoder.calls[0][0]) == union | test_texts
    assert len(union) <= 40 < len(train_texts)  # ten experiments of 4 cannot cover the train split

    # max_samples: a seeded sample of the test set, all of which (and nothing else from it) is embedded.
    sampled_encoder = TableEncoder(encoder.table)
    sampled = evaluate_classification(sampled_encoder, tmp_path, name="toy", max_samples=5, n_experiments=2, seed=3)
    assert sampled.samples == {"train": 16, "test": 5, "experiments": 2}
    test_rows = [f"test {i}" for i in range(10)] + ["shared", "odd one", "shared"]
    kept = {test_rows[i] for i in np.random.default_rng(3).choice(13, size=5, replace=False)}
    union = {train_texts[i] for chosen in undersample(train_labels, 8, 2, seed=3) for i in chosen}
    assert set(sampled_encoder.calls[0][0]) == union | kept


def test_loader_errors_name_the_file_and_line(tmp_path):
    write_jsonl(tmp_path / "classification" / "toy" / "train.jsonl", [{"text": "a", "label": "x"}])
    path = tmp_path / "classification" / "toy" / "test.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": [1]}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: field 'label' is list")):
        load_classification("toy", tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + ".*LM2VEC_DATA"):
        load_classification("toy", tmp_path)


@needs_banking77
def test_evaluate_banking77_end_to_end(monkeypatch):
    data = load_classification("banking77")
    encoder = word_encoder(data.train_texts + data.test_texts)
    calls = record_encode_calls(monkeypatch, encoder)
    result = evaluate_classification(encoder, samples_per_label=2, n_experiments=2, max_samples=60, batch_size=64)

    experiments = undersample(data.train_labels, 2, 2, seed=42)
    test = np.sort(np.random.default_rng(42).choice(len(data.test_texts), size=60, replace=False))
    train_texts = {data.train_texts[i] for chosen in experiments for i in chosen}
    assert len(calls) == 1 and sorted(calls[0][0]) == sorted(train_texts | {data.test_texts[i] for i in test})
    assert result.samples == {"train": 2 * 77, "test": 60, "experiments": 2}

    # Independently: look the texts up, fit MTEB's classifier per experiment, score with sklearn, average.
    vector = dict(zip(*calls[0], strict=True))
    x_test, y_test = np.array([vector[data.test_texts[i]] for i in test]), [data.test_labels[i] for i in test]
    accuracies, f1s = [], []
    for chosen in experiments:
        classifier = LogisticRegression(max_iter=100, random_state=42)
        classifier.fit(np.array([vector[data.train_texts[i]] for i in chosen]), [data.train_labels[i] for i in chosen])
        predicted = classifier.predict(x_test)
        accuracies.append(accuracy_score(y_test, predicted))
        f1s.append(f1_score(y_test, predicted, average="macro", zero_division=0.0))
    assert 100 / 77 < result.main_score < 100  # above chance for 77 intents: the random model carries signal
    assert result.main_score == pytest.approx(100 * np.mean(accuracies), abs=1e-9)
    assert result.scores["f1"] == pytest.approx(100 * np.mean(f1s), abs=1e-9)
