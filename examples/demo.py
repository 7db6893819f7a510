"""Demo: the built-in SmolLM2-135M as a causal and as a verified bidirectional encoder, scored on STS-B test.

Untrained bidirectional attention is expected to *hurt* (RECIPE.md, section 6): the model has never seen
future tokens. MNTP and SimCSE training are what make the bidirectional encoder worthwhile.

    python examples/demo.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lm2vec
from lm2vec import PoolingMode
from lm2vec.data import data_dir
from lm2vec.evaluation import evaluate_sts
from lm2vec.hardware import describe_cpu

# Spearman x100 measured on this model (RECIPE.md, section 6): what the table should come close to.
EXPECTED = {
    ("causal", PoolingMode.MEAN): "37.1",
    ("causal", PoolingMode.WEIGHTED_MEAN): "43.1",
    ("bidirectional", PoolingMode.MEAN): "15.9-16.9",
    ("bidirectional", PoolingMode.WEIGHTED_MEAN): "not measured",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the shared data folder (default: LM2VEC_DATA)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N pairs (quick runs)")
    args = parser.parse_args()
    data = args.data or data_dir()

    start = time.perf_counter()
    print(f"CPU: {describe_cpu()}")
    rows = []
    for bidirectional in (False, True):
        mode = "bidirectional" if bidirectional else "causal"
        loaded = time.perf_counter()
        encoder = lm2vec.load(bidirectional=bidirectional, dtype="float32")  # load() verifies the mode
        info = encoder.info()
        print(
            f"\nloaded the built-in {info['architecture']} model ({info['parameters']:,} parameters, "
            f"{info['attn_implementation']}) {mode} in {time.perf_counter() - loaded:.1f} s; attention verified at load"
        )
        encoder.verify()  # raises lm2vec.AttentionError if the first token's state does not behave as asked
        behaviour = "changes" if bidirectional else "does not change"
        print(
            f"encoder.verify(): passed, {mode}: the first token's state {behaviour} when the last token changes "
            "(alone, in a left-padded and in a right-padded batch)"
        )
        for pooling in (PoolingMode.MEAN, PoolingMode.WEIGHTED_MEAN):
            encoder.pooling = pooling
            scored = time.perf_counter()
            result = evaluate_sts(encoder, "test", data=data, batch_size=args.batch_size, limit=args.limit)
            scores = f"Spearman {result.scores['spearman']:.2f}, Pearson {result.scores['pearson']:.2f}"
            print(f"  {mode} {pooling.value}: STS-B test: {scores} ({time.perf_counter() - scored:.0f} s)")
            rows.append((mode, pooling, result))

    print(f"\nSTS-B test, {rows[0][2].samples['pairs']} pairs, cosine similarity, x100")
    print(f"{'attention':<15}{'pooling':<15}{'Spearman':>9}{'Pearson':>9}   expected Spearman")
    for mode, pooling, result in rows:
        expected = EXPECTED[(mode, pooling)]
        spearman, pearson = result.scores["spearman"], result.scores["pearson"]
        print(f"{mode:<15}{pooling.value:<15}{spearman:>9.1f}{pearson:>9.1f}   {expected}")
    print(f"\nwall time {time.perf_counter() - start:.0f} s on {describe_cpu()}")


if __name__ == "__main__":
    main()
