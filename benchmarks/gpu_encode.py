"""GPU encoding throughput of the built-in model: lm2vec against plain transformers, across batch sizes.

Texts: the first 1000 unique STS-B test sentences and ``--wiki`` sentences from the shared wiki corpus
(repeated to that count, 100,000 by default). Baseline: plain transformers in bf16, the same bidirectional
model, texts sorted by length and padded per batch of N texts, mean pooling. lm2vec: bf16, equal-length
batches bounded by N texts and ``--max-tokens`` tokens (no padding beyond one column). Each setting runs
twice, alternating, after a warm-up; tokens/s counts real (non-padding) tokens. The lm2vec embeddings are
checked against float32 CPU embeddings of the STS-B sentences (lowest cosine printed).

    python benchmarks/gpu_encode.py [--batch-sizes 32,256,1024] [--wiki 100000] [--device cuda] [--model M]

``--device cpu --count 64 --wiki 256`` runs the same code paths on a CPU (for tests; speed means nothing).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import lm2vec
from lm2vec.attention import position_ids_for
from lm2vec.choices import PoolingMode
from lm2vec.datafiles import data_dir
from lm2vec.evaluation import cosine_rows, load_sts
from lm2vec.pooling import pool


def stsb_sentences(data: Path, count: int) -> list[str]:
    return load_sts("stsb", "test", data).interleaved_sentences()[:count]


def wiki_sentences(data: Path, count: int) -> list[str]:
    lines = [line.strip() for line in (data / "corpus" / "wiki1m_10k.txt").open() if line.strip()]
    return [lines[i % len(lines)] for i in range(count)]


@torch.inference_mode()
def plain_transformers(encoder: lm2vec.Encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """What a user writes with transformers alone: sort by length, pad each batch, one forward, mean-pool."""
    tokenizer, model = encoder.tokenizer, encoder.model
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            [texts[i] for i in order[start : start + batch_size]],
            padding=True,
            truncation=True,
            max_length=encoder.max_length,
            return_tensors="pt",
        ).to(encoder.device)
        mask = batch["attention_mask"]
        hidden = model(**batch, position_ids=position_ids_for(mask)).last_hidden_state
        out.append(pool(hidden, mask, mask.bool(), PoolingMode.MEAN))
    embeddings = torch.cat(out).float().cpu().numpy()
    return embeddings[np.argsort(order)]


def timed(run, device: torch.device) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--count", type=int, default=1000, help="STS-B sentences")
    parser.add_argument("--wiki", type=int, default=100_000, help="wiki sentences (the corpus repeated)")
    parser.add_argument("--batch-sizes", default="32,256,1024")
    parser.add_argument("--max-tokens", type=int, default=32768, help="lm2vec's token bound per forward pass")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default=None, help="a model directory, .gguf file or hub id (default: built-in)")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = args.data or data_dir()
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    encoder = lm2vec.load(args.model, dtype="bfloat16", device=device)
    cpu_reference = lm2vec.load(args.model, dtype="float32")
    sets = {"stsb": stsb_sentences(data, args.count), "wiki": wiki_sentences(data, args.wiki)}
    reference = cpu_reference.encode(sets["stsb"], batch_size=32)
    del cpu_reference

    encoder.encode(sets["stsb"][:64])  # warm-up: kernels, allocator
    print(f"{'texts':<7}{'batch':>7}{'plain tok/s':>13}{'lm2vec tok/s':>14}{'gain':>7}")
    for name, texts in sets.items():
        tokens = sum(len(ids) for ids in encoder.tokenization.tokenize([""] * len(texts), texts)[0])
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            plain, ours = [], []
            for _ in range(2):
                plain.append(timed(lambda: plain_transformers(encoder, texts, batch_size), device)[0])  # noqa: B023
                seconds, embeddings = timed(
                    lambda: encoder.encode(texts, batch_size=batch_size, max_tokens=args.max_tokens),  # noqa: B023
                    device,
                )
                ours.append(seconds)
            rate_plain, rate_ours = tokens / min(plain), tokens / min(ours)
            print(f"{name:<7}{batch_size:>7}{rate_plain:>13,.0f}{rate_ours:>14,.0f}{rate_ours / rate_plain:>6.2f}x")
            if name == "stsb":
                cosine = cosine_rows(embeddings, reference)
                print(f"        cosine to CPU float32: min {cosine.min():.5f}, mean {cosine.mean():.5f}")


if __name__ == "__main__":
    main()
