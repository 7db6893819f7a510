"""STS-B at truncated dimensions: how much of each encoder's quality survives ``truncate_dim``.

Compare an encoder trained with a Matryoshka objective (``matryoshka_dims`` in a contrastive stage) with one
trained without it, from the same start and seed:

    python examples/matryoshka.py outputs/demo/3-supervised/encoder outputs/matryoshka/3-supervised/encoder \
        [--dims 64,128,256,576] [--split test]
"""

from __future__ import annotations

import argparse

import lm2vec
from lm2vec.evaluation import sts_by_dimension
from lm2vec.hardware import describe_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="encoder directories")
    parser.add_argument("--dims", default="64,128,256", help="comma-separated; the full dimension is added")
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--data", help="the datasets folder (default: LM2VEC_DATA or ../shared/data)")
    args = parser.parse_args()
    print(describe_cpu())
    rows = []
    for model in args.models:
        encoder = lm2vec.load(model, dtype="float32")
        dims = sorted({*map(int, args.dims.split(",")), encoder.dim})
        scores = sts_by_dimension(encoder, dims, args.split, data=args.data, batch_size=64)
        trained = ", ".join(map(str, encoder.matryoshka_dims or ())) or "no"
        rows.append((model, trained, scores))
    dims = sorted({d for _, _, scores in rows for d in scores})
    print(f"\nSTS-B {args.split} Spearman x100 by dimension\n")
    print("| model | Matryoshka dims | " + " | ".join(map(str, dims)) + " |")
    print("|---|---|" + "---|" * len(dims))
    for model, trained, scores in rows:
        cells = " | ".join(f"{scores[d]:.1f}" if d in scores else "-" for d in dims)
        print(f"| {model} | {trained} | {cells} |")


if __name__ == "__main__":
    main()
