"""Late chunking against embedding each chunk alone, on SciFact retrieval (docs/results.md).

Every document is split into runs of ``--chunk-tokens`` tokens and scores by its best chunk. Late: the chunk
vectors are pooled from the whole document's token states (``Encoder.late_chunks``); naive: each chunk is
embedded alone. For a CPU budget the corpus is sampled (every document judged for the kept queries plus random
others, ``lm2vec.evaluation.load_retrieval``), so the scores compare only with each other.

    python examples/late_chunking.py --model DIR [--chunk-tokens 64] [--max-queries 100] [--max-samples 600]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lm2vec
from lm2vec.datafiles import data_dir
from lm2vec.evaluation.retrieval import chunked_retrieval_scores, load_retrieval
from lm2vec.hardware import describe_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an encoder directory (default: the built-in model)")
    parser.add_argument("--chunk-tokens", type=int, default=64)
    parser.add_argument("--max-queries", type=int, default=100)
    parser.add_argument("--max-samples", type=int, default=600, help="documents in the sampled corpus")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    print(f"CPU: {describe_cpu()}")
    encoder = lm2vec.load(args.model)
    dataset = load_retrieval(
        "scifact", "test", args.data or data_dir(), max_samples=args.max_samples, max_queries=args.max_queries
    )
    print(f"SciFact test: {len(dataset.queries)} queries, {len(dataset.documents)} documents, model {args.model}")
    rows = []
    for late in (False, True):
        start = time.perf_counter()
        scores = chunked_retrieval_scores(encoder, dataset, args.chunk_tokens, late)
        rows.append((late, scores, time.perf_counter() - start))
    print(f"\n| chunks of {args.chunk_tokens} tokens | nDCG@10 | recall@100 | minutes |\n|---|---|---|---|")
    for late, scores, seconds in rows:
        name = "late chunking (pooled from the document)" if late else "each chunk embedded alone"
        print(f"| {name} | {scores['ndcg_at_10']:.2f} | {scores['recall_at_100']:.2f} | {seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
