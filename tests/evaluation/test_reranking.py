"""Reranking: MAP and MRR@10 against hand computations, scikit-learn and pytrec_eval; loading; end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from sklearn.metrics import average_precision_score

from lm2vec.evaluation.base import Instructions
from lm2vec.evaluation.reranking import evaluate_reranking, load_reranking, reranking_metrics
from tests.support import BagOfWords, random_texts, tiny_encoder


def write_reranking(folder: Path, lines: list[str]) -> Path:
    """``folder/reranking/toy/test.jsonl`` with the given lines; returns ``folder`` (the data directory)."""
    path = folder / "reranking" / "toy" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(line + "\n" for line in lines))
    return folder


def test_worked_example():
    # positives 0.9 and 0.3, negatives 0.5, 0.1, 0.95: ranking n, p, n, p, n -> positives at ranks 2 and 4
    average_precision, reciprocal_rank = reranking_metrics([0.9, 0.3, 0.5, 0.1, 0.95], n_positive=2)
    assert average_precision == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert reciprocal_rank == pytest.approx(1 / 2)
    assert reranking_metrics([0.2, 0.1, 0.9], n_positive=2) == (pytest.approx((1 / 2 + 2 / 3) / 2), 1 / 2)


def test_a_negative_tied_with_a_positive_ranks_first_as_in_mteb():
    assert reranking_metrics([0.5, 0.5, 0.1], n_positive=1) == (pytest.approx(1 / 2), 1 / 2)
    assert reranking_metrics([0.5, 0.4, 0.1], n_positive=1) == (1.0, 1.0)
    # among tied positives the later one (larger MTEB id) comes first; it changes nothing for MAP and MRR
    assert reranking_metrics([0.5, 0.5, 0.5], n_positive=2) == (pytest.approx((1 / 2 + 2 / 3) / 2), 1 / 2)


def test_reciprocal_rank_counts_only_the_top_ten():
    negatives_first = [0.0] + [1.0 - i / 100 for i in range(10)]
    assert reranking_metrics(negatives_first, n_positive=1)[1] == 0.0
    assert reranking_metrics(negatives_first[:10], n_positive=1)[1] == pytest.approx(1 / 10)


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_scikit_learn_without_ties(seed):
    rng = np.random.default_rng(seed)
    n_positive, n_negative = int(rng.integers(1, 6)), int(rng.integers(1, 30))
    similarities = rng.uniform(-1, 1, n_positive + n_negative)
    labels = np.r_[np.ones(n_positive), np.zeros(n_negative)]
    average_precision, reciprocal_rank = reranking_metrics(similarities, n_positive)
    assert average_precision == pytest.approx(average_precision_score(labels, similarities), abs=1e-12)
    first_positive = 1 + int(np.flatnonzero(labels[np.argsort(-similarities)])[0])
    assert reciprocal_rank == (1 / first_positive if first_positive <= 10 else 0.0)


def test_metrics_match_pytrec_eval_with_mtebs_ids_and_ties():
    rng = np.random.default_rng(0)
    qrels, runs, ours = {}, {}, {}
    for q in range(50):
        n_positive, n_negative = int(rng.integers(1, 4)), int(rng.integers(1, 25))
        similarities = rng.integers(0, 5, n_positive + n_negative) / 4  # many ties
        ids = [f"apositive_test_query{q}_{i:05d}" for i in range(n_positive)]
        ids += [f"negative_test_query{q}_{i:05d}" for i in range(n_negative)]
        qrels[str(q)] = {doc: int(i < n_positive) for i, doc in enumerate(ids)}
        runs[str(q)] = dict(zip(ids, map(float, similarities), strict=True))
        ours[str(q)] = reranking_metrics(similarities, n_positive)
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"map_cut.1000", "recip_rank"}).evaluate(runs)
    for q, (average_precision, reciprocal_rank) in ours.items():
        assert average_precision == pytest.approx(reference[q]["map_cut_1000"], abs=1e-12)
        rr = reference[q]["recip_rank"]
        assert reciprocal_rank == pytest.approx(rr if rr >= 0.1 else 0.0, abs=1e-12)


def test_load_drops_samples_without_a_positive_or_a_negative(tmp_path):
    data = write_reranking(
        tmp_path,
        [
            json.dumps({"query": "a", "positive": ["b"], "negative": ["c", "d"]}),
            json.dumps({"query": "e", "positive": [], "negative": ["f"]}),
            json.dumps({"query": "g", "positive": ["h"], "negative": []}),
        ],
    )
    dataset = load_reranking("toy", data=data)
    assert [(s.query, s.positive, s.negative) for s in dataset.samples] == [("a", ["b"], ["c", "d"])]


def test_malformed_sample_names_the_file_and_line(tmp_path):
    good = json.dumps({"query": "a", "positive": ["b"], "negative": ["c"]})
    data = write_reranking(tmp_path, [good, "", json.dumps({"query": "a", "positive": ["b", 3], "negative": ["c"]})])
    path = data / "reranking" / "toy" / "test.jsonl"
    with pytest.raises(ValueError, match=f"{path}:3: field 'positive' must be a list of strings"):
        load_reranking("toy", data=data)
    (path).write_text(good + "\n" + json.dumps({"query": "a", "positive": "b", "negative": ["c"]}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: field 'positive' is str, expected list"):
        load_reranking("toy", data=data)


def test_evaluate_reranking_with_an_encoder_that_matches_exactly(tmp_path):
    samples = [
        {"query": "w4 w5", "positive": ["w4 w5"], "negative": ["w6", "w7 w8"]},  # positive first: AP 1, RR 1
        {"query": "w9", "positive": ["w10", "w9 w11"], "negative": ["w9", "w6"]},  # ranks n, p, n, p
    ]
    data = write_reranking(tmp_path, [json.dumps(s) for s in samples])
    encoder = BagOfWords()
    result = evaluate_reranking(encoder, data, Instructions("q:", "d:"), name="toy")
    assert result.type == "reranking" and result.main_metric == "map" and result.task == "toy"
    # sample 2: "w9" (cos 1) > "w9 w11" (0.71) > "w10" = "w6" (0): the tied negative "w6" ranks before "w10"
    assert result.scores["map"] == pytest.approx(100 * (1 + (1 / 2 + 2 / 4) / 2) / 2)
    assert result.scores["mrr_at_10"] == pytest.approx(100 * (1 + 1 / 2) / 2)
    assert result.samples == {"queries": 2, "candidates": 7}
    (queries, query_instruction), (candidates, candidate_instruction) = encoder.calls
    assert (queries, query_instruction, candidate_instruction) == (["w4 w5", "w9"], "q:", "d:")
    assert sorted(candidates) == sorted({"w4 w5", "w6", "w7 w8", "w10", "w9 w11", "w9"})  # "w6" embedded once


def test_evaluate_reranking_end_to_end_with_a_tiny_model(tmp_path):
    texts = random_texts(40, seed=3)
    samples = [
        {"query": texts[i], "positive": texts[i + 1 : i + 3], "negative": texts[i + 3 : i + 8]} for i in range(0, 40, 8)
    ]
    data = write_reranking(tmp_path, [json.dumps(s) for s in samples])
    result = evaluate_reranking(tiny_encoder(), data, Instructions("Find the related text:", None), name="toy")
    assert result.samples == {"queries": 5, "candidates": 35}
    assert 0 < result.scores["map"] <= 100 and 0 < result.scores["mrr_at_10"] <= 100
    assert result.main_score == result.scores["map"]
