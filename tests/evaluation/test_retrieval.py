"""Retrieval: metrics against hand computations and pytrec_eval/MTEB, chunked search against brute force, loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from lm2vec.datafiles import data_dir
from lm2vec.evaluation.base import Instructions
from lm2vec.evaluation.retrieval import (
    average_precision_at_k,
    evaluate_retrieval,
    load_retrieval,
    ndcg_at_k,
    precision_at_k,
    rank_run,
    read_qrels,
    recall_at_k,
    reciprocal_rank_at_k,
    retrieval_scores,
    search,
)
from tests.support import BagOfWords, needs_data, tiny_encoder

SCIFACT = data_dir() / "retrieval" / "scifact"
needs_scifact = needs_data("retrieval/scifact/qrels/test.tsv")
PYTREC_MEASURES = {"ndcg_cut.10", "map_cut.10", "recall.10,100", "P.10", "recip_rank"}


def write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: str, split: str = "test") -> Path:
    """A BEIR-layout dataset ``folder/retrieval/toy``; returns ``folder`` (the data directory)."""
    root = folder / "retrieval" / "toy"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return folder


def synthetic_beir(folder: Path, n_docs: int = 300, n_queries: int = 40, seed: int = 0) -> tuple[Path, dict]:
    """Random texts; every query judges two random documents. Returns (data directory, qrels)."""
    rng = np.random.default_rng(seed)
    corpus = [{"_id": f"d{i}", "title": "", "text": f"w{4 + i % 100}"} for i in range(n_docs)]
    queries = [{"_id": f"q{i}", "text": f"w{4 + i % 100}"} for i in range(n_queries)]
    qrels = {f"q{i}": {f"d{j}": 1 for j in rng.choice(n_docs, 2, replace=False)} for i in range(n_queries)}
    lines = "".join(f"{q}\t{d}\t{g}\n" for q, docs in qrels.items() for d, g in docs.items())
    return write_beir(folder, corpus, queries, lines), qrels


# -- metrics ----------------------------------------------------------------------------------------------------


def test_ndcg_worked_example():
    judged = {"a": 2, "b": 1, "c": 1, "d": 0}
    ranked = ["x", "a", "d", "c"]  # b (grade 1) is not retrieved; x is unjudged
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # a, b, c in their best order
    assert ndcg_at_k(ranked, judged, 10) == pytest.approx(dcg / ideal)
    assert dcg / ideal == pytest.approx(0.54058, abs=1e-5)
    assert ndcg_at_k(ranked, judged, 2) == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert ndcg_at_k(["a", "b", "c"], judged, 10) == pytest.approx(1.0)
    assert ndcg_at_k(ranked, {"d": 0}, 10) == 0.0


def test_map_recall_precision_mrr_worked_example():
    judged = {"a": 1, "b": 1, "c": 1, "z": 0}
    ranked = ["x", "a", "z", "b", "y"]  # relevant at ranks 2 and 4; c is never retrieved
    assert average_precision_at_k(ranked, judged, 10) == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert average_precision_at_k(ranked, judged, 3) == pytest.approx((1 / 2) / 3)  # divided by all 3 relevant
    assert recall_at_k(ranked, judged, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, judged, 3) == pytest.approx(1 / 3)
    assert precision_at_k(ranked, judged, 10) == pytest.approx(2 / 10)  # over k, though only 5 were retrieved
    assert precision_at_k(ranked, judged, 4) == pytest.approx(2 / 4)
    assert reciprocal_rank_at_k(ranked, judged, 10) == pytest.approx(1 / 2)
    assert reciprocal_rank_at_k(ranked, judged, 1) == 0.0
    no_relevant = {"x": 0}
    assert [f(ranked, no_relevant, 10) for f in (average_precision_at_k, recall_at_k, reciprocal_rank_at_k)] == [
        0,
        0,
        0,
    ]


def test_rank_run_breaks_ties_by_descending_id_like_trec_eval():
    run = {"a": 0.5, "c": 0.5, "b": 0.9, "x": 0.4}
    assert rank_run(run) == ["b", "c", "a", "x"]
    judged = {"a": 2, "c": 1, "e": 1}
    ours = ndcg_at_k(rank_run(run), judged, 10)
    theirs = pytrec_eval.RelevanceEvaluator({"q": judged}, {"ndcg_cut.10"}).evaluate({"q": run})["q"]["ndcg_cut_10"]
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours != pytest.approx(ndcg_at_k(["b", "a", "c", "x"], judged, 10))  # the other tie order scores differently


def random_judgments_and_runs(seed: int, n_queries: int = 40, n_docs: int = 150) -> tuple[dict, dict]:
    """Graded judgments (some queries with no relevant document) and runs with many tied scores."""
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(n_docs)]  # "d12" < "d7" as strings: ties are not broken numerically
    qrels, runs = {}, {}
    for q in range(n_queries):
        judged = rng.choice(docs, rng.integers(1, 8), replace=False)
        qrels[f"q{q}"] = {d: int(rng.integers(0, 4)) for d in judged}
        retrieved = rng.choice(docs, rng.integers(3, 120), replace=False)
        runs[f"q{q}"] = {d: float(rng.integers(0, 12)) / 10 for d in retrieved}
    return qrels, runs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_pytrec_eval_on_random_runs(seed):
    qrels, runs = random_judgments_and_runs(seed)
    reference = pytrec_eval.RelevanceEvaluator(qrels, PYTREC_MEASURES).evaluate(runs)
    for q, run in runs.items():
        ranked, judged, theirs = rank_run(run), qrels[q], reference[q]
        assert ndcg_at_k(ranked, judged, 10) == pytest.approx(theirs["ndcg_cut_10"], abs=1e-12)
        assert average_precision_at_k(ranked, judged, 10) == pytest.approx(theirs["map_cut_10"], abs=1e-12)
        assert recall_at_k(ranked, judged, 10) == pytest.approx(theirs["recall_10"], abs=1e-12)
        assert recall_at_k(ranked, judged, 100) == pytest.approx(theirs["recall_100"], abs=1e-12)
        assert precision_at_k(ranked, judged, 10) == pytest.approx(theirs["P_10"], abs=1e-12)
        rr = theirs["recip_rank"]  # over the whole run; MRR@10 counts only a first hit in the top 10
        assert reciprocal_rank_at_k(ranked, judged, 10) == pytest.approx(rr if rr >= 0.1 else 0.0, abs=1e-12)


# -- search -----------------------------------------------------------------------------------------------------


def dyadic_unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors with coordinates k/8: norms and cosines are exact in float32, whatever the summation order,
    and many cosines tie, so the search's tie-break is tested."""
    patterns = [[8], [4, 4, 4, 4], [6, 4, 2, 2, 2], [6] + [2] * 7, [5, 5, 3, 1, 1, 1, 1, 1], [2] * 16]
    vectors = np.zeros((n, dim), dtype=np.float32)
    for row in vectors:
        pattern = patterns[rng.integers(len(patterns))]
        row[rng.choice(dim, len(pattern), replace=False)] = np.array(pattern) * rng.choice([-1, 1], len(pattern)) / 8
    assert (np.sum(vectors * vectors, axis=1) == 1).all()
    return vectors


def brute_force_top_k(queries: np.ndarray, docs: np.ndarray, ids: list[str], k: int) -> list[list[int]]:
    """Every score at once, each row fully sorted by (score, id) descending."""
    full = queries @ docs.T
    return [sorted(range(len(ids)), key=lambda j, row=row: (row[j], ids[j]), reverse=True)[:k] for row in full]


def in_chunks(docs: np.ndarray, size: int):
    return (docs[i : i + size] for i in range(0, len(docs), size))


@pytest.mark.parametrize(("chunk_size", "query_chunk_size"), [(1, 5), (7, 1), (100, 256), (211, 4), (1000, 23)])
def test_chunked_search_returns_the_brute_force_top_k_with_ties(chunk_size, query_chunk_size):
    rng = np.random.default_rng(chunk_size)
    queries, docs = dyadic_unit_vectors(23, 16, rng), dyadic_unit_vectors(211, 16, rng)
    ids = [f"doc{i}" for i in rng.permutation(len(docs))]
    for k in (10, 100, 500):
        indices, scores = search(queries, in_chunks(docs, chunk_size), ids, k=k, query_chunk_size=query_chunk_size)
        expected = brute_force_top_k(queries, docs, ids, k)
        assert indices.tolist() == expected
        assert np.array_equal(scores, np.take_along_axis(queries @ docs.T, np.array(expected), axis=1))


@pytest.mark.parametrize("chunk_size", [3, 64, 4096])
def test_chunked_search_on_gaussian_embeddings_finds_the_best_scores(chunk_size):
    rng = np.random.default_rng(0)
    queries, docs = rng.normal(size=(31, 24)), rng.normal(size=(700, 24)) * rng.uniform(0.1, 10, size=(700, 1))
    ids = [str(i) for i in range(len(docs))]
    indices, scores = search(queries, in_chunks(docs, chunk_size), ids, k=100, query_chunk_size=8)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        docs / np.linalg.norm(docs, axis=1, keepdims=True)
    ).T
    assert np.allclose(scores, -np.sort(-cosine, axis=1)[:, :100], atol=1e-6)
    assert np.allclose(scores, np.take_along_axis(cosine, indices, axis=1), atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_search_then_metrics_agree_with_pytrec_eval_on_the_full_score_matrix():
    rng = np.random.default_rng(5)
    queries, docs = dyadic_unit_vectors(30, 16, rng), dyadic_unit_vectors(400, 16, rng)
    ids = [f"d{i}" for i in range(len(docs))]
    qrels = {f"q{i}": {ids[j]: int(rng.integers(1, 3)) for j in rng.choice(len(ids), 3)} for i in range(len(queries))}
    indices, _ = search(queries, in_chunks(docs, 50), ids, k=100)
    ours = retrieval_scores([[ids[j] for j in row] for row in indices], list(qrels.values()))
    full = queries @ docs.T  # pytrec_eval ranks every document, ties included
    runs = {q: dict(zip(ids, map(float, row), strict=True)) for q, row in zip(qrels, full, strict=True)}
    reference = pytrec_eval.RelevanceEvaluator(qrels, PYTREC_MEASURES).evaluate(runs)
    for ours_name, theirs_name in [
        ("ndcg_at_10", "ndcg_cut_10"),
        ("map_at_10", "map_cut_10"),
        ("recall_at_100", "recall_100"),
    ]:
        assert ours[ours_name] == pytest.approx(100 * np.mean([r[theirs_name] for r in reference.values()]), abs=1e-9)


def test_search_skips_a_document_with_the_query_id_only_when_asked():
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(6, 8))
    queries = docs[[2, 4]] + 0.01 * rng.normal(size=(2, 8))  # each query is closest to its namesake
    ids = ["a", "b", "q1", "c", "q2", "d"]
    plain, _ = search(queries, [docs], ids, k=10)
    assert plain[:, 0].tolist() == [2, 4] and plain.shape == (2, 6)
    skipped, scores = search(queries, in_chunks(docs, 4), ids, k=10, query_ids=["q1", "q2"])
    assert 2 not in skipped[0] and 4 not in skipped[1]
    assert skipped[:, :5].tolist() == [[j for j in row if j != self] for row, self in zip(plain, [2, 4], strict=True)]
    assert skipped[:, 5].tolist() == [-1, -1] and np.isneginf(scores[:, 5]).all()


def test_search_rejects_chunks_that_do_not_cover_the_corpus():
    with pytest.raises(ValueError, match="3 embeddings for 4 corpus ids"):
        search(np.ones((1, 2)), [np.ones((3, 2))], ["a", "b", "c", "d"])


# -- loading ----------------------------------------------------------------------------------------------------


def test_load_keeps_judged_queries_and_joins_titles(tmp_path):
    corpus = [
        {"_id": "d1", "title": "Title", "text": "body one"},
        {"_id": "d2", "title": "", "text": "body two"},
        {"_id": "d3", "text": "no title field"},
    ]
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(1, 5)]
    data = write_beir(tmp_path, corpus, queries, "q3\td2\t0\nq1\td1\t1\nq1\tmissing\t2\n")
    dataset = load_retrieval("toy", data=data)
    assert dataset.query_ids == ["q1", "q3"]  # file order; q2 and q4 have no judgments in the split
    assert dataset.queries == ["query 1", "query 3"]
    assert dataset.documents == ["Title body one", "body two", "no title field"]
    assert dataset.qrels == {"q1": {"d1": 1, "missing": 2}, "q3": {"d2": 0}}


def test_sampling_keeps_every_judged_document_and_is_seeded(tmp_path):
    data, qrels = synthetic_beir(tmp_path)
    sample = load_retrieval("toy", data=data, max_samples=50, max_queries=10, seed=1)
    assert len(sample.query_ids) == 10 and len(sample.corpus_ids) == 50
    judged = {d for q in sample.query_ids for d in qrels[q]}
    assert judged <= set(sample.corpus_ids)
    assert sample.qrels == {q: qrels[q] for q in sample.query_ids}
    assert sample == load_retrieval("toy", data=data, max_samples=50, max_queries=10, seed=1)
    assert sample.corpus_ids != load_retrieval("toy", data=data, max_samples=50, max_queries=10, seed=2).corpus_ids
    small = load_retrieval("toy", data=data, max_samples=5, max_queries=10, seed=1)
    assert set(small.corpus_ids) == judged  # the judged documents outnumber max_samples: all kept, no others


@needs_scifact
def test_sampling_scifact_keeps_every_judged_document():
    sample = load_retrieval("scifact", max_samples=200, max_queries=20)
    assert len(sample.query_ids) == 20 and len(sample.corpus_ids) == 200
    assert {d for judged in sample.qrels.values() for d in judged} <= set(sample.corpus_ids)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2 d2 1\n", 3, "expected 'query-id<TAB>corpus-id<TAB>score'"),
        ("query-id\tcorpus-id\tscore\n\nq1\td1\thigh\n", 3, "score 'high' is not an integer"),
        ("q1\td1\t1\n", 1, "expected the tab-separated header"),
    ],
)
def test_malformed_qrels_name_the_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "test.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}:{line}: {message}"):
        read_qrels(path)


def test_qrels_for_an_unknown_query_are_an_error(tmp_path):
    data = write_beir(tmp_path, [{"_id": "d1", "title": "", "text": "x"}], [{"_id": "q1", "text": "y"}], "q9\td1\t1\n")
    with pytest.raises(ValueError, match="query id 'q9' is not in"):
        load_retrieval("toy", data=data)


# -- end to end -------------------------------------------------------------------------------------------------


def test_evaluate_retrieval_with_an_encoder_that_matches_exactly(tmp_path):
    corpus = [{"_id": f"d{i}", "title": "", "text": f"w{10 + i} w{40 + i}"} for i in range(30)]
    queries = [{"_id": "q0", "text": "w10 w40"}, {"_id": "q1", "text": "w11 w41"}, {"_id": "q2", "text": "w12"}]
    data = write_beir(tmp_path, corpus, queries, "q0\td0\t1\nq1\td1\t2\nq2\td12\t1\n")
    encoder = BagOfWords()
    result = evaluate_retrieval(encoder, data, Instructions("find", "doc"), chunk_size=7, name="toy")
    assert result.type == "retrieval" and result.main_metric == "ndcg_at_10"
    assert result.scores["ndcg_at_10"] == pytest.approx(100 * 2 / 3)  # q2's only word points at d2, judged d12
    assert result.scores["recall_at_100"] == pytest.approx(100)  # all 30 documents are retrieved
    assert result.samples == {"queries": 3, "documents": 30, "judgments": 3}
    assert encoder.calls[0] == ([q["text"] for q in queries], "find")
    assert {instruction for _, instruction in encoder.calls[1:]} == {"doc"}
    assert [len(texts) for texts, _ in encoder.calls[1:]] == [7, 7, 7, 7, 2]


@needs_scifact
def test_evaluate_retrieval_on_a_scifact_sample_with_a_tiny_model():
    result = evaluate_retrieval(tiny_encoder(), max_queries=20, max_samples=200, chunk_size=64)
    assert result.task == "scifact" and result.main_score == result.scores["ndcg_at_10"]
    assert result.samples["queries"] == 20 and result.samples["documents"] == 200
    assert all(0 <= value <= 100 for value in result.scores.values())
    assert result.scores["recall_at_100"] >= result.scores["recall_at_10"]
