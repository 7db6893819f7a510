"""STS evaluation: the metric against independent rank computations, and evaluate_sts end to end."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lm2vec.datafiles import data_dir
from lm2vec.evaluation import correlations, cosine_rows, evaluate_sts, load_sts, sts_by_dimension
from tests.support import needs_data, word_encoder

STSB_DEV = data_dir() / "sts" / "stsb" / "dev.jsonl"
needs_stsb = needs_data("sts/stsb/dev.jsonl")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the positions they span (the textbook definition)."""
    ranks = np.empty(len(values))
    for value in np.unique(values):
        below, equal = (values < value).sum(), (values == value).sum()
        ranks[values == value] = below + (equal + 1) / 2
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / np.sqrt((dx**2).sum() * (dy**2).sum()))


def test_spearman_without_ties_matches_the_rank_difference_formula():
    rng = np.random.default_rng(0)
    sims, gold = rng.normal(size=50), rng.uniform(0, 5, size=50)
    d = np.argsort(np.argsort(sims)) - np.argsort(np.argsort(gold))
    n = len(d)
    expected = 1 - 6 * (d**2).sum() / (n * (n**2 - 1))
    spearman, pearson_ = correlations(sims, gold)
    assert spearman == pytest.approx(100 * expected, abs=1e-9)
    assert pearson_ == pytest.approx(100 * pearson(sims, gold), abs=1e-9)


def test_spearman_with_ties_uses_average_ranks():
    sims = np.array([0.1, 0.4, 0.4, 0.9, 0.2, 0.4])
    gold = np.array([1.0, 2.0, 3.0, 3.0, 0.0, 5.0])
    assert list(average_ranks(sims)) == [1, 4, 4, 6, 2, 4]
    expected = pearson(average_ranks(sims), average_ranks(gold))
    assert correlations(sims, gold)[0] == pytest.approx(100 * expected, abs=1e-9)


def test_monotonic_but_nonlinear_is_perfect_for_spearman_only():
    gold = np.linspace(0, 5, 20)
    spearman, pearson_ = correlations(np.exp(gold), gold)
    assert spearman == pytest.approx(100)
    assert pearson_ < 95
    assert correlations(-gold, gold)[0] == pytest.approx(-100)


def test_correlations_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="equally long"):
        correlations(np.zeros(3), np.zeros(4))


def test_cosine_rows():
    a = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    b = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).numpy()
    np.testing.assert_allclose(cosine_rows(a.numpy(), b.numpy()), expected, atol=1e-12)
    assert cosine_rows(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0  # zero vector: 0, not NaN


def test_missing_split_says_how_to_point_at_the_data(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(str(tmp_path / "sts" / "stsb" / "dev.jsonl")) + ".*LM2VEC_DATA"
    ):
        load_sts("stsb", "dev", data=tmp_path)


@needs_stsb
def test_evaluate_sts_end_to_end(monkeypatch):
    pairs = load_sts("stsb", "dev", max_samples=40)
    encoder = word_encoder(pairs.sentence1 + pairs.sentence2)
    encode = encoder.encode
    calls: list[list[str]] = []

    def recording_encode(sentences, **kwargs):
        calls.append(list(sentences))
        return encode(sentences, **kwargs)

    monkeypatch.setattr(encoder, "encode", recording_encode)
    result = evaluate_sts(encoder, split="dev", max_samples=40, batch_size=8)

    unique = set(pairs.sentence1 + pairs.sentence2)
    assert len(calls) == 1 and len(calls[0]) == len(unique) and set(calls[0]) == unique
    assert (result.task, result.type, result.samples) == ("stsb-dev", "sts", {"pairs": 40})

    # Independently: embed each side in pair order, cosine with torch, Spearman as Pearson of average ranks.
    e1 = torch.from_numpy(encode(pairs.sentence1, batch_size=8)).double()
    e2 = torch.from_numpy(encode(pairs.sentence2, batch_size=8)).double()
    sims = torch.nn.functional.cosine_similarity(e1, e2, dim=1).numpy()
    assert np.unique(sims.round(6)).size == 40  # distinct similarities: a random model still tells pairs apart
    spearman = 100 * pearson(average_ranks(sims), average_ranks(pairs.scores))
    assert result.main_score == result.scores["spearman"] == pytest.approx(spearman, abs=1e-3)
    assert result.scores["pearson"] == pytest.approx(100 * pearson(sims, pairs.scores), abs=1e-3)


@needs_stsb
def test_sts_by_dimension_scores_the_truncated_embeddings():
    pairs = load_sts("stsb", "dev", max_samples=40)
    encoder = word_encoder(pairs.sentence1 + pairs.sentence2)
    dim = encoder.encode(["a"]).shape[1]
    scores = sts_by_dimension(encoder, [4, dim], split="dev", max_samples=40, batch_size=8)
    assert scores[dim] == pytest.approx(evaluate_sts(encoder, split="dev", max_samples=40).main_score, abs=1e-9)
    e1 = torch.from_numpy(encoder.encode(pairs.sentence1, truncate_dim=4)).double()
    e2 = torch.from_numpy(encoder.encode(pairs.sentence2, truncate_dim=4)).double()
    sims = torch.nn.functional.cosine_similarity(e1, e2, dim=1).numpy()
    assert scores[4] == pytest.approx(100 * pearson(average_ranks(sims), average_ranks(pairs.scores)), abs=1e-3)
    assert scores[4] != pytest.approx(scores[dim], abs=1e-3)
    with pytest.raises(ValueError, match="dims must be integers"):
        sts_by_dimension(encoder, [dim + 1], split="dev", max_samples=40)
