"""Clustering: V-measure against the entropy formula, the bootstrap against mteb's, and a run on 20 Newsgroups."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import v_measure_score

from lm2vec.datafiles import data_dir
from lm2vec.evaluation.base import Instructions
from lm2vec.evaluation.clustering import (
    bootstrap_v_measures,
    cluster_v_measure,
    evaluate_clustering,
    load_clustering,
)
from tests.support import TableEncoder, needs_data, record_encode_calls, word_encoder, write_jsonl

NEWSGROUPS = data_dir() / "clustering" / "twentynewsgroups" / "test.jsonl"
needs_newsgroups = needs_data("clustering/twentynewsgroups/test.jsonl")


def entropy(counts: list[int]) -> float:
    p = np.array(counts) / sum(counts)
    return float(-(p * np.log(p)).sum())


def conditional_entropy(pairs: list[tuple], n: int) -> float:
    """H(first | second) from a list of (first, second) pairs: sum over cells of -n_fs/n log(n_fs / n_s)."""
    cells, seconds = Counter(pairs), Counter(s for _, s in pairs)
    return float(-sum(c / n * np.log(c / seconds[s]) for (_, s), c in cells.items()))


def blobs(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Tight, far-apart groups of 2-D points, so that k-means must recover exactly these groups."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(scale=0.01, size=(n, 2)) + [10.0 * i, 5.0 * i**2] for i, n in enumerate(sizes)])


def test_v_measure_matches_the_entropy_formula():
    points = blobs([4, 4, 4])
    blob = [0] * 4 + [1] * 4 + [2] * 4
    labels = ["a", "a", "a", "a", "b", "b", "b", "c", "c", "c", "c", "a"]  # blob 1 and 2 each hold a stray label
    n = len(labels)
    pairs = list(zip(labels, blob, strict=True))
    homogeneity = 1 - conditional_entropy(pairs, n) / entropy(list(Counter(labels).values()))
    completeness = 1 - conditional_entropy([(k, c) for c, k in pairs], n) / entropy(list(Counter(blob).values()))
    expected = 2 * homogeneity * completeness / (homogeneity + completeness)
    assert 0.3 < expected < 0.7
    assert cluster_v_measure(points, labels, n_clusters=3) == pytest.approx(expected, abs=1e-12)
    # Perfect clusterings score 1 whatever the label names; one cluster for everything scores 0.
    assert cluster_v_measure(points, ["x"] * 4 + ["z"] * 4 + ["y"] * 4, n_clusters=3) == pytest.approx(1)
    assert cluster_v_measure(points, labels, n_clusters=1) == 0


def test_bootstrap_draws_with_replacement_from_the_given_generator():
    points, labels = blobs([5, 5]), ["a"] * 5 + ["b"] * 5
    scores = bootstrap_v_measures(points, labels, random.Random(7), n_runs=4, documents_per_run=30)
    assert scores == pytest.approx([1.0] * 4)  # 30 draws from 10 documents: only possible with replacement
    mixed = ["a", "b"] * 5  # labels unrelated to the blobs
    first = bootstrap_v_measures(points, mixed, random.Random(7), n_runs=3, documents_per_run=8)
    assert first == bootstrap_v_measures(points, mixed, random.Random(7), n_runs=3, documents_per_run=8)
    assert first != bootstrap_v_measures(points, mixed, random.Random(8), n_runs=3, documents_per_run=8)


def test_evaluate_matches_mteb_bootstrap(tmp_path):
    """Same documents embedded, same draws, same k-means as mteb's own function, down to the score."""
    mteb_clustering = pytest.importorskip("mteb.abstasks.clustering", reason="mteb (the eval extra) not installed")
    rng = np.random.default_rng(0)
    labels = [f"topic{i % 5}" for i in range(200)]
    table = {f"doc {i}": rng.normal(size=8) + 2 * (i % 5) for i in range(190)}
    texts = [f"doc {i % 190}" for i in range(200)]  # ten repeated texts
    write_jsonl(
        tmp_path / "clustering" / "toy" / "test.jsonl",
        [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)],
    )
    encoder = TableEncoder(table)
    instructions = Instructions("Identify the topic", "ignored")
    result = evaluate_clustering(
        encoder, tmp_path, instructions, name="toy", max_samples=150, n_runs=4, documents_per_run=100, seed=11
    )

    generator = random.Random(11)
    chosen = generator.sample(range(200), k=150)
    assert len(encoder.calls) == 1 and encoder.calls[0][1] == "Identify the topic"
    assert sorted(encoder.calls[0][0]) == sorted({texts[i] for i in chosen})
    scores, _ = mteb_clustering._evaluate_clustering_bootstrapped(
        np.array([table[texts[i]] for i in chosen]),
        [[labels[i]] for i in chosen],
        n_clusters=4,
        cluster_size=100,
        kmean_batch_size=512,
        max_depth=None,
        rng_state=generator,
        seed=11,
    )
    expected = scores["v_measure"]["Level 0"]
    assert (result.task, result.type, result.main_metric) == ("toy", "clustering", "v_measure")
    assert result.main_score == pytest.approx(100 * np.mean(expected), abs=1e-9)
    assert result.scores["v_measure_std"] == pytest.approx(100 * np.std(expected), abs=1e-9)
    assert result.samples == {"documents": 150, "clusters": 5, "runs": 4, "documents_per_run": 100}


def test_loader_errors_name_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "clustering" / "toy" / "test.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field(s) 'label'")):
        load_clustering("toy", tmp_path)
    with pytest.raises(FileNotFoundError, match="LM2VEC_DATA"):
        load_clustering("absent", tmp_path)


@needs_newsgroups
def test_evaluate_twentynewsgroups_end_to_end(monkeypatch):
    data = load_clustering("twentynewsgroups")
    encoder = word_encoder(data.texts)
    calls = record_encode_calls(monkeypatch, encoder)
    result = evaluate_clustering(encoder, max_samples=300, n_runs=3, documents_per_run=300, batch_size=64)

    generator = random.Random(42)
    chosen = generator.sample(range(len(data.texts)), k=300)
    assert len(calls) == 1 and sorted(calls[0][0]) == sorted({data.texts[i] for i in chosen})
    assert result.samples == {"documents": 300, "clusters": 20, "runs": 3, "documents_per_run": 300}

    # Independently: look the chosen documents up, then MTEB's draws and k-means settings, scored by sklearn.
    vector = dict(zip(*calls[0], strict=True))
    embeddings, labels = np.array([vector[data.texts[i]] for i in chosen]), np.array([data.labels[i] for i in chosen])
    expected = []
    for _ in range(3):
        drawn = generator.choices(range(300), k=300)
        kmeans = MiniBatchKMeans(n_clusters=20, batch_size=512, init="k-means++", n_init=1, random_state=42)
        expected.append(v_measure_score(labels[drawn], kmeans.fit_predict(embeddings[drawn])))
    assert 0 < result.main_score < 100
    assert result.main_score == pytest.approx(100 * np.mean(expected), abs=1e-9)
