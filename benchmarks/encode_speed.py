"""Encoding speed of the built-in model on CPU, fp32 against bf16.

The first 1000 unique STS-B test sentences, batch 32, 2 threads (the development machines' budget). Each
mode runs in its own worker process, so peak RSS is per mode; both workers load and warm up (one batch, as
the reference benchmark in ``shared/peers/official_llm2vec`` does), then the timed runs alternate between
them (fp32, bf16, fp32, ...) so that drift in the machine's speed hits both alike.

    python benchmarks/encode_speed.py [--repeats 3] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lm2vec.data import data_dir
from lm2vec.evaluation import cosine_rows, load_sts
from lm2vec.hardware import cpu_info, describe_cpu

MODES = {"fp32": "float32", "bf16": "bfloat16"}
REPLY = "RESULT "  # worker stdout lines carrying results start with this; anything else is passed over


def sentences(data: Path, count: int) -> list[str]:
    """STS-B test sentences in file order (sentence1, then sentence2 of each pair), first ``count`` unique."""
    pairs = load_sts("stsb", "test", data)
    unique = dict.fromkeys(s for pair in zip(pairs.sentence1, pairs.sentence2, strict=True) for s in pair)
    return list(unique)[:count]


def worker(args: argparse.Namespace) -> None:
    """Load one mode, warm up on one batch, then time one encoding pass per ``run`` line read from stdin."""
    import torch

    import lm2vec

    torch.set_num_threads(args.threads)
    texts = sentences(args.data, args.texts)
    encoder = lm2vec.load(dtype=MODES[args.mode])
    masks = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)["attention_mask"]
    embeddings = encoder.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up, as the reference
    reply({"tokens": sum(map(sum, masks)), "texts": len(texts)})
    for command in sys.stdin:
        if command.strip() != "run":
            break
        start = time.perf_counter()
        embeddings = encoder.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
        reply({"seconds": time.perf_counter() - start})
    np.save(args.embeddings, embeddings)
    reply({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})  # KiB on Linux


def reply(obj: dict) -> None:
    print(REPLY + json.dumps(obj), flush=True)


class Worker:
    """A worker process for one mode, driven line by line over its stdin/stdout."""

    def __init__(self, mode: str, args: argparse.Namespace, embeddings: Path):
        command = [sys.executable, __file__, "--worker", mode, "--embeddings", str(embeddings)]
        command += ["--data", str(args.data), "--texts", str(args.texts)]
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line.removeprefix(REPLY))
        raise RuntimeError(f"the worker exited with code {self.process.wait()} before replying")

    def send(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (after one warm-up)")
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--embeddings", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.mode = args.worker
        worker(args)
        return

    print(f"CPU: {describe_cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        workers = {mode: Worker(mode, args, Path(tmp) / f"{mode}.npy") for mode in MODES}
        setup = {mode: w.read() for mode, w in workers.items()}  # both load and warm up before any timing
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode, w in workers.items():
                seconds[mode].append(w.send("run")["seconds"])
        peak = {mode: w.send("stop")["peak_rss_mb"] for mode, w in workers.items()}
        for w in workers.values():
            w.process.wait()
        similarity = cosine_rows(*(np.load(Path(tmp) / f"{mode}.npy") for mode in MODES))

    texts, tokens = setup["fp32"]["texts"], setup["fp32"]["tokens"]
    print(
        f"{texts} unique STS-B test sentences ({tokens / texts:.1f} tokens each), batch {args.batch_size}, "
        f"{args.threads} threads, warm-up on one batch, then {args.repeats} timed runs per mode, alternating\n"
    )
    figures: dict[str, dict] = {}
    print(f"{'mode':<6}{'sentences/s':>12}{'tokens/s':>10}{'peak RSS':>10}   runs (s)")
    for mode in MODES:
        median = statistics.median(seconds[mode])
        figures[mode] = {
            "sentences_per_s": texts / median,
            "tokens_per_s": tokens / median,
            "peak_rss_mb": peak[mode],
            "seconds": seconds[mode],
        }
        runs = ", ".join(f"{s:.1f}" for s in seconds[mode])
        print(f"{mode:<6}{texts / median:>12.1f}{tokens / median:>10.0f}{peak[mode]:>7.0f} MB   {runs}")
    ratio = figures["bf16"]["sentences_per_s"] / figures["fp32"]["sentences_per_s"]
    print(f"\nbf16/fp32 speed: {ratio:.2f}x")
    print(f"cosine(fp32, bf16) per sentence: min {similarity.min():.4f}, mean {similarity.mean():.4f}")
    if args.json:
        summary = {
            "cpu": cpu_info(),
            "texts": texts,
            "tokens": tokens,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "repeats": args.repeats,
            "modes": figures,
            "bf16_over_fp32": ratio,
            "cosine_fp32_bf16_min": float(similarity.min()),
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
