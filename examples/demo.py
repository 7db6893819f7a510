"""Demo, the main job: convert the built-in SmolLM2-135M into an encoder with the `cpu` recipe.

Scores STS-B after every stage (causal baseline, bidirectional untrained, +MNTP, +SimCSE, +supervised on
SNLI triplets), prints the table with the targets, and writes it to ``--output/results.md``. With
``--ablation`` it then trains the causal model for the same time: the contrastive stages, SimCSE with MNTP's
time added (the recipe ``<recipe>-no-mntp`` where one is packaged, e.g. ``cpu-no-mntp``), and scores the untrained
model with the two poolings the rows do not use (causal mean, bidirectional weighted mean).

    python examples/demo.py --data ../shared/data [--output outputs/demo] [--ablation] [--resume]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lm2vec
from lm2vec import PoolingMode
from lm2vec.datafiles import data_dir
from lm2vec.evaluation import evaluate_sts
from lm2vec.hardware import describe_machine
from lm2vec.training import convert
from lm2vec.training.config import builtin_recipes
from lm2vec.training.conversion import Row
from lm2vec.training.stage import TRAINING_DTYPE

# STS-B test Spearman targets (issue "Training", means of 3 seeds on any CPU); the causal baseline is RECIPE.md's.
TARGETS = {
    "causal, weighted mean (baseline)": "43.1",
    "bidirectional + mntp + simcse": ">= 60 (3-seed mean)",
    "bidirectional + mntp + simcse + supervised": ">= 70 (3-seed mean)",
}


def other_poolings(data: Path) -> dict[tuple[str, str], float]:
    """STS-B test of the untrained model with the poolings ``convert``'s baselines do not use.

    In float32, as ``convert`` scores its rows: the four figures compare poolings, not precisions, and the default
    precision would first calibrate each attention mode (minutes on a fresh machine). Each ``load`` proves its
    attention mode (causal / bidirectional) on the loaded model or raises.
    """
    scores: dict[tuple[str, str], float] = {}
    for bidirectional, pooling in ((False, PoolingMode.MEAN), (True, PoolingMode.WEIGHTED_MEAN)):
        encoder = lm2vec.load(bidirectional=bidirectional, pooling=pooling, dtype=TRAINING_DTYPE)
        key = ("bidirectional" if bidirectional else "causal", pooling.value)
        scores[key] = evaluate_sts(encoder, "test", data=data, batch_size=64).scores["spearman"]
        print(f"untrained {key[0]} {key[1]} (attention verified): STS-B test {scores[key]:.1f}", flush=True)
    return scores


def print_poolings(pooled: dict[tuple[str, str], float], rows: list[Row]) -> None:
    """The untrained model's four poolings: ``pooled``'s two and the baseline rows' (the first two of ``rows``)."""
    for key, row in zip((("causal", "weighted_mean"), ("bidirectional", "mean")), rows, strict=False):
        pooled[key] = row.test if row.test is not None else float("nan")
    print("\nuntrained model, STS-B test Spearman x100 (attention verified at every load):")
    for mode in ("causal", "bidirectional"):
        print(f"  {mode:<15}mean {pooled[(mode, 'mean')]:5.1f}   weighted mean {pooled[(mode, 'weighted_mean')]:5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the shared data folder (default: LM2VEC_DATA)")
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument(
        "--ablation", action="store_true", help="also train the causal model for the same time; score other poolings"
    )
    parser.add_argument("--resume", action="store_true", help="reuse finished stages of an earlier run")
    args = parser.parse_args()
    data = args.data or data_dir()
    began = time.perf_counter()
    print(f"Machine: {describe_machine()}", flush=True)

    runs = [("bidirectional", args.output, args.recipe, False)]
    if args.ablation:
        equal_budget = f"{args.recipe}-no-mntp"
        ablation = equal_budget if equal_budget in builtin_recipes() else args.recipe
        runs.append(("causal ablation", args.output / f"causal-{ablation}", ablation, True))
    pooled = other_poolings(data) if args.ablation else {}  # two more scorings: ~2 min on two cores
    rows: list[Row] = []
    for name, output, recipe, causal in runs:
        start = time.perf_counter()
        _, table = convert(
            None,
            recipe,
            output,
            data_root=data,
            resume=args.resume,
            causal=causal,
            baselines=not rows,
            log=lambda line: print(line, flush=True),
        )
        rows += table
        print(f"{name}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    if pooled:
        print_poolings(pooled, rows)
    print(f"\nSTS-B Spearman x100, recipe {args.recipe!r}, on {describe_machine()}")
    print(f"{'model':<46}{'dev':>7}{'test':>7}{'minutes':>9}{'peak GB':>9}   target (test)")
    for row in rows:
        target = TARGETS.get(row.model, "")
        figures = f"{row.dev:>7.1f}{row.test:>7.1f}{row.seconds / 60:>9.1f}{row.peak_memory_gb:>9.1f}"
        print(f"{row.model:<46}{figures}   {target}")
    peak = max(r.peak_memory_gb for r in rows)
    print(f"\nwall time {(time.perf_counter() - began) / 60:.1f} min; peak memory {peak:.1f} GB")
    print(f"results: {args.output / 'results.md'}; final encoder: {args.output / 'encoder'}")


if __name__ == "__main__":
    main()
