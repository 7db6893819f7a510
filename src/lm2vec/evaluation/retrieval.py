"""Retrieval on BEIR-layout data with MTEB's metrics: exact cosine search, then nDCG@10 (main), MAP, recall, MRR.

MTEB (``AbsTaskRetrieval``) ranks the whole corpus for each query by cosine similarity and scores the run with
pytrec_eval (trec_eval), except MRR, which it computes itself. The metrics here are that arithmetic in numpy:
documents tied on score are ordered by descending id, as trec_eval orders them, and a query's metric counts every
judged document of the query, whether or not the corpus (or its sample) holds it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..datafiles import data_file, numbered_lines, read_jsonl
from ..late_chunking import chunk_spans
from .base import NO_INSTRUCTIONS, Instructions, TaskResult, TextEncoder, embed

if TYPE_CHECKING:
    from ..encoder import Encoder

TOP_K = 100  # the deepest cutoff reported (recall@100)
QRELS_HEADER = ["query-id", "corpus-id", "score"]
_EMPTY = np.iinfo(np.int64).min  # search key of a slot with no document


@dataclass(frozen=True)
class RetrievalData:
    """Queries, documents and judgments (query id -> document id -> grade) of one split, in file order."""

    name: str
    split: str
    query_ids: list[str]
    queries: list[str]
    corpus_ids: list[str]
    documents: list[str]
    qrels: dict[str, dict[str, int]]


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (header ``query-id corpus-id score``); a repeated pair keeps its last grade, as in MTEB."""
    lines = numbered_lines(path)
    number, header = next(lines)
    if header.split("\t") != QRELS_HEADER:
        raise ValueError(
            f"{path}:{number}: expected the tab-separated header {' '.join(QRELS_HEADER)!r}, got {header!r}"
        )
    qrels: dict[str, dict[str, int]] = {}
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) != 3 or not fields[0] or not fields[1]:
            raise ValueError(f"{path}:{number}: expected 'query-id<TAB>corpus-id<TAB>score', got {line!r}")
        try:
            grade = int(fields[2])
        except ValueError:
            raise ValueError(f"{path}:{number}: score {fields[2]!r} is not an integer") from None
        qrels.setdefault(fields[0], {})[fields[1]] = grade
    return qrels


def _unique_ids(records: list[dict], path: Path) -> list[str]:
    seen: set[str] = set()
    for record in records:
        if record["_id"] in seen:
            raise ValueError(f"{path}: _id {record['_id']!r} appears more than once")
        seen.add(record["_id"])
    return [record["_id"] for record in records]


def _document_text(record: dict) -> str:
    """Title and text joined by a space when there is a title, as MTEB (and BEIR) embed a document."""
    title = record.get("title") or ""
    return f"{title} {record['text']}".strip() if title else record["text"].strip()


def load_retrieval(
    name: str = "scifact",
    split: str = "test",
    data: str | os.PathLike | None = None,
    *,
    max_samples: int | None = None,
    max_queries: int | None = None,
    seed: int = 42,
) -> RetrievalData:
    """Read ``retrieval/NAME`` (BEIR layout) under the data directory, keeping the queries judged in ``split``.

    For CPU budgets, ``max_queries`` keeps a seeded random sample of the judged queries, and ``max_samples`` keeps
    every document judged for the kept queries plus a seeded random sample of the others, up to ``max_samples``
    documents in all (more when the judged ones alone exceed it). Sampling the corpus makes the task easier than
    MTEB's, so such scores compare only with scores on the same sample.
    """
    if (max_samples is not None and max_samples < 1) or (max_queries is not None and max_queries < 1):
        raise ValueError(f"max_samples and max_queries must be positive, got {max_samples} and {max_queries}")
    paths = {
        "corpus": data_file(data, "retrieval", name, "corpus.jsonl"),
        "queries": data_file(data, "retrieval", name, "queries.jsonl"),
        "qrels": data_file(data, "retrieval", name, "qrels", f"{split}.tsv"),
    }
    corpus = read_jsonl(paths["corpus"], {"_id": str, "text": str}, {"title": (str, type(None))})
    queries = read_jsonl(paths["queries"], {"_id": str, "text": str})
    corpus_ids, query_ids = _unique_ids(corpus, paths["corpus"]), _unique_ids(queries, paths["queries"])
    qrels = read_qrels(paths["qrels"])
    if not qrels:
        raise ValueError(f"{paths['qrels']}: no judgments after the header")
    missing = qrels.keys() - set(query_ids)
    if missing:
        raise ValueError(f"{paths['qrels']}: query id {min(missing)!r} is not in {paths['queries']}")

    rng = np.random.default_rng(seed)
    kept_queries = [i for i, qid in enumerate(query_ids) if qid in qrels]
    if max_queries is not None and max_queries < len(kept_queries):
        kept_queries = sorted(rng.choice(kept_queries, size=max_queries, replace=False).tolist())
    kept_docs: Sequence[int] = range(len(corpus))
    if max_samples is not None and max_samples < len(corpus):
        judged_ids = {doc for i in kept_queries for doc in qrels[query_ids[i]]}
        judged = [i for i, doc in enumerate(corpus_ids) if doc in judged_ids]
        others = [i for i, doc in enumerate(corpus_ids) if doc not in judged_ids]
        extra = rng.choice(others, size=max(0, max_samples - len(judged)), replace=False).tolist()
        kept_docs = sorted(judged + extra)
    return RetrievalData(
        name,
        split,
        [query_ids[i] for i in kept_queries],
        [queries[i]["text"] for i in kept_queries],
        [corpus_ids[i] for i in kept_docs],
        [_document_text(corpus[i]) for i in kept_docs],
        {query_ids[i]: qrels[query_ids[i]] for i in kept_queries},
    )


# -- exact search -----------------------------------------------------------------------------------------------


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32 (zero rows stay zero), so a matrix product gives cosine similarities."""
    x = np.asarray(embeddings, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def _search_keys(similarities: np.ndarray, tie_ranks: np.ndarray) -> np.ndarray:
    """int64 keys ordered like (similarity, id): argpartition on them is an exact top-k with trec_eval's tie-break.

    The upper 32 bits map the float32 similarity to an integer of the same order (-0.0 and 0.0 both to 0); the
    lower 32 bits are the document's rank in ascending id order, so of two tied documents the larger id ranks first.
    """
    bits = np.ascontiguousarray(similarities, dtype=np.float32).view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return (ordered << 32) | tie_ranks


def _similarities_of(keys: np.ndarray) -> np.ndarray:
    """The float32 similarities encoded in search keys (the inverse of :func:`_search_keys`' upper half)."""
    ordered = keys >> 32
    return np.where(ordered < 0, -ordered - 2**31, ordered).astype(np.int32).view(np.float32)


def search(
    query_embeddings: np.ndarray,
    corpus_chunks: Iterable[np.ndarray],
    corpus_ids: Sequence[str],
    k: int = TOP_K,
    query_chunk_size: int = 256,
    query_ids: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` documents of each query by cosine similarity, ranked as trec_eval ranks them.

    ``corpus_chunks`` yields the document embeddings in corpus order, a block at a time, so only one block of
    embeddings and one (query block x document block) similarity matrix exist at once. With ``query_ids``, a
    document whose id is its query's id is skipped (MTEB's ``ignore_identical_ids``, set per task).

    Returns (indices into the corpus, float32 similarities), each ``(queries, min(k, documents))``, best first;
    a row with fewer documents (only when some were skipped) ends with index -1 and similarity -inf.
    """
    queries = unit_rows(query_embeddings)
    if k < 1 or not corpus_ids:
        raise ValueError(f"need k >= 1 and a non-empty corpus, got k={k} and {len(corpus_ids)} documents")
    by_id = np.argsort(np.array(corpus_ids))
    tie_ranks = np.empty(len(corpus_ids), dtype=np.int64)
    tie_ranks[by_id] = np.arange(len(corpus_ids))
    row_of = {doc: i for i, doc in enumerate(corpus_ids)}
    identical = np.array([row_of.get(q, -1) for q in query_ids] if query_ids is not None else [-1] * len(queries))
    best = np.full((len(queries), min(k, len(corpus_ids))), _EMPTY, dtype=np.int64)
    start = 0
    for chunk in corpus_chunks:
        documents = unit_rows(chunk)
        stop = start + len(documents)
        for q0 in range(0, len(queries), query_chunk_size):
            q1 = min(q0 + query_chunk_size, len(queries))
            similarities = queries[q0:q1] @ documents.T
            if np.isnan(similarities).any():
                raise ValueError("NaN similarity: the encoder returned NaN embeddings")
            keys = _search_keys(similarities, tie_ranks[start:stop])
            rows = np.flatnonzero((identical[q0:q1] >= start) & (identical[q0:q1] < stop))
            keys[rows, identical[q0 + rows] - start] = _EMPTY
            merged = np.concatenate([best[q0:q1], keys], axis=1)
            top = np.argpartition(merged, merged.shape[1] - best.shape[1], axis=1)[:, -best.shape[1] :]
            best[q0:q1] = np.take_along_axis(merged, top, axis=1)
        start = stop
    if start != len(corpus_ids):
        raise ValueError(f"the corpus chunks hold {start} embeddings for {len(corpus_ids)} corpus ids")
    best = np.sort(best, axis=1)[:, ::-1]
    found = best != _EMPTY
    indices = np.where(found, by_id[best & 0xFFFFFFFF], -1)
    return indices, np.where(found, _similarities_of(best), -np.inf).astype(np.float32)


# -- metrics (one query; fractions, not x100) -------------------------------------------------------------------


def rank_run(run: Mapping[str, float]) -> list[str]:
    """Document ids by descending score, ties by descending id: the order trec_eval (and so MTEB) evaluates."""
    return sorted(run, key=lambda doc: (run[doc], doc), reverse=True)


def _relevant(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> np.ndarray:
    return np.array([judged.get(doc, 0) > 0 for doc in ranked[:k]], dtype=bool)


def _relevant_count(judged: Mapping[str, int]) -> int:
    return sum(grade > 0 for grade in judged.values())


def ndcg_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """trec_eval's ``ndcg_cut``: gain = grade (negative grades count 0), discount log2(rank + 1), ideal DCG from
    all judged documents of the query in their best order."""
    discounts = 1 / np.log2(np.arange(2, k + 2))
    gains = np.maximum([judged.get(doc, 0) for doc in ranked[:k]], 0).astype(np.float64)
    ideal = np.sort(np.maximum(np.fromiter(judged.values(), dtype=np.float64), 0))[::-1][:k]
    ideal_dcg = float(ideal @ discounts[: len(ideal)])
    return float(gains @ discounts[: len(gains)]) / ideal_dcg if ideal_dcg > 0 else 0.0


def average_precision_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """trec_eval's ``map_cut``: precision at each relevant document in the top k, summed, over all relevant ones."""
    hits = _relevant(ranked, judged, k)
    relevant = _relevant_count(judged)
    if relevant == 0:
        return 0.0
    ranks = np.flatnonzero(hits) + 1
    return float((np.arange(1, len(ranks) + 1) / ranks).sum() / relevant)


def recall_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    relevant = _relevant_count(judged)
    return float(_relevant(ranked, judged, k).sum() / relevant) if relevant else 0.0


def precision_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """trec_eval's ``P``: divided by k even when fewer than k documents were retrieved."""
    return float(_relevant(ranked, judged, k).sum() / k)


def reciprocal_rank_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """MTEB's ``MRR@k``: 1 / rank of the first relevant document in the top k, else 0."""
    hits = np.flatnonzero(_relevant(ranked, judged, k))
    return 1 / float(hits[0] + 1) if len(hits) else 0.0


METRICS = {
    "ndcg_at_10": (ndcg_at_k, 10),
    "map_at_10": (average_precision_at_k, 10),
    "recall_at_10": (recall_at_k, 10),
    "recall_at_100": (recall_at_k, 100),
    "mrr_at_10": (reciprocal_rank_at_k, 10),
    "precision_at_10": (precision_at_k, 10),
}


def retrieval_scores(ranked: Sequence[Sequence[str]], judgments: Sequence[Mapping[str, int]]) -> dict[str, float]:
    """Each metric x100, averaged over queries: ``ranked[i]`` is query i's ranking, ``judgments[i]`` its qrels."""
    if len(ranked) != len(judgments) or not ranked:
        raise ValueError(f"need as many rankings as judgments (at least one), got {len(ranked)} and {len(judgments)}")
    return {
        name: 100 * float(np.mean([metric(r, j, k) for r, j in zip(ranked, judgments, strict=True)]))
        for name, (metric, k) in METRICS.items()
    }


# -- the task ---------------------------------------------------------------------------------------------------


def evaluate_retrieval(
    encoder: TextEncoder,
    data: str | os.PathLike | None = None,
    instructions: Instructions = NO_INSTRUCTIONS,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
    chunk_size: int = 4096,
    *,
    name: str = "scifact",
    split: str = "test",
    max_samples: int | None = None,
    max_queries: int | None = None,
    seed: int = 42,
    ignore_identical_ids: bool = False,
) -> TaskResult:
    """Score ``encoder`` on ``retrieval/NAME`` as MTEB does (main score: nDCG@10 x100).

    Queries get ``instructions.query``, documents ``instructions.document``. Documents are embedded and searched
    ``chunk_size`` at a time, so memory holds one chunk of document embeddings, never the whole corpus's. Texts are
    embedded as they are, not deduplicated as in other tasks: each query and document is its own entry (its id).
    ``max_samples``/``max_queries``/``seed`` subsample as :func:`load_retrieval` describes; ``ignore_identical_ids``
    is MTEB's per-task flag (off for SciFact).
    """
    start = time.perf_counter()
    dataset = load_retrieval(name, split, data, max_samples=max_samples, max_queries=max_queries, seed=seed)

    def corpus_chunks() -> Iterator[np.ndarray]:
        for i in range(0, len(dataset.documents), chunk_size):
            yield embed(
                encoder, dataset.documents[i : i + chunk_size], instructions.document, batch_size, show_progress_bar
            )

    indices, _ = search(
        embed(encoder, dataset.queries, instructions.query, batch_size, show_progress_bar),
        corpus_chunks(),
        dataset.corpus_ids,
        query_ids=dataset.query_ids if ignore_identical_ids else None,
    )
    ranked = [[dataset.corpus_ids[i] for i in row if i >= 0] for row in indices]
    return TaskResult(
        task=name if split == "test" else f"{name}-{split}",
        type="retrieval",
        main_metric="ndcg_at_10",
        scores=retrieval_scores(ranked, [dataset.qrels[q] for q in dataset.query_ids]),
        samples={
            "queries": len(dataset.query_ids),
            "documents": len(dataset.corpus_ids),
            "judgments": sum(map(len, dataset.qrels.values())),
        },
        seconds=time.perf_counter() - start,
    )


def chunked_retrieval_scores(
    encoder: Encoder,
    dataset: RetrievalData,
    chunk_tokens: int,
    late: bool,
    instructions: Instructions = NO_INSTRUCTIONS,
) -> dict[str, float]:
    """Retrieval with each document split into runs of ``chunk_tokens`` tokens, a document scoring by its best
    chunk: chunk vectors pooled from the whole document (``late``: :mod:`lm2vec.late_chunking`) or each chunk
    embedded alone. Queries get ``instructions.query``; documents (or their chunks) ``instructions.document``."""
    document = instructions.document
    if late:
        documents = tqdm(dataset.documents, desc="late chunks", unit="document")
        chunks = [
            encoder.late_chunks([doc], chunk_tokens=chunk_tokens, instruction=document)[0].embeddings
            for doc in documents
        ]
    else:
        spans = [chunk_spans(encoder.tokenizer, doc, chunk_tokens) for doc in dataset.documents]
        texts = [doc[a:b] for doc, doc_spans in zip(dataset.documents, spans, strict=True) for a, b in doc_spans]
        alone = np.asarray(encoder.encode(texts, instruction=document, show_progress_bar=True))
        chunks = np.split(alone, np.cumsum([len(s) for s in spans])[:-1])
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(chunks)])
    queries = unit_rows(embed(encoder, dataset.queries, instructions.query))
    similarities = queries @ unit_rows(np.concatenate(chunks)).T
    best = np.full((len(queries), len(dataset.documents)), -np.inf, dtype=np.float32)
    np.maximum.at(best.T, owner, similarities.T)
    ranked = [[dataset.corpus_ids[i] for i in np.argsort(-row, kind="stable")[:TOP_K]] for row in best]
    return retrieval_scores(ranked, [dataset.qrels[q] for q in dataset.query_ids])
