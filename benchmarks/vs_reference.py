"""CPU encoding speed of the built-in model: the reference llm2vec against lm2vec in each precision, one run.

Texts: the first 1000 unique STS-B test sentences (``--texts stsb``) or 1000 SciFact abstracts truncated at
512 tokens (``--texts scifact``); batch 32, 2 threads, mean pooling, bidirectional. Every mode runs in its own
worker process (so peak RSS is per mode): the reference ``llm2vec==0.2.3`` in its own venv (built by
``make reference``, see ../shared/peers/official_llm2vec), lm2vec in this one. All workers load and warm up
on one batch first; then the timed runs alternate between modes (reference, fp32, bf16, int8, reference, ...)
so drift in the machine's speed hits all alike. In the same run the parent measures the matmul peak of
each precision (2048^3 products on the same threads), and each mode's model FLOP/s is given as a fraction
of its precision's peak. Model FLOPs: 2 x non-embedding parameters x real tokens, plus attention
(4 x layers x hidden x length^2 per text).

    python benchmarks/vs_reference.py [--texts stsb|scifact] [--repeats 3] [--modes reference,fp32,bf16,int8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPLY = "RESULT "  # worker stdout lines carrying results start with this; anything else is passed over
LM2VEC_MODES = {"fp32": "float32", "fp32-fast": "float32", "bf16": "bfloat16", "int8": "int8"}
PEAK_OF = {"reference": "fp32", "fp32": "fp32", "fp32-fast": "fp32", "bf16": "bf16", "int8": "int8"}
MODE_NAMES = ", ".join(["reference", *LM2VEC_MODES])
REFERENCE_DIR = Path(os.environ.get("LM2VEC_REFERENCE_DIR", Path(__file__).resolve().parents[1] / ".peer-llm2vec"))


def reply(obj: dict) -> None:
    print(REPLY + json.dumps(obj), flush=True)


def serve(encode, tokens: int, texts: list[str], args: argparse.Namespace, extra: dict) -> None:
    """The worker loop shared by both sides: warm up, report, then one timed pass per ``run`` line."""
    import numpy as np

    embeddings = encode(texts[: args.batch_size])
    reply({"tokens": tokens, **extra})
    for command in sys.stdin:
        if command.strip() != "run":
            break
        start = time.perf_counter()
        embeddings = encode(texts)
        reply({"seconds": time.perf_counter() - start})
    np.save(args.embeddings, np.asarray(embeddings, dtype=np.float32))
    reply({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})  # KiB on Linux


def reference_worker(args: argparse.Namespace, texts: list[str]) -> None:
    """Runs in the reference's venv: only torch and llm2vec are imported."""
    import torch
    from llm2vec import LLM2Vec

    torch.set_num_threads(args.threads)
    # doc_max_length: the reference otherwise cuts documents to 400 tokens (by whole words) before max_length
    model = LLM2Vec.from_pretrained(
        str(args.reference / "smollm2-hf"),
        enable_bidirectional=True,
        pooling_mode="mean",
        max_length=args.max_length,
        doc_max_length=args.max_length,
    )
    model.eval()
    tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"])

    def encode(batch: list[str]):
        return model.encode(batch, batch_size=args.batch_size, show_progress_bar=False).float().numpy()

    serve(encode, tokens, texts, args, {})


def lm2vec_worker(args: argparse.Namespace, texts: list[str]) -> None:
    import torch

    import lm2vec

    torch.set_num_threads(args.threads)
    encoder = lm2vec.load(dtype=LM2VEC_MODES[args.worker], max_length=args.max_length)
    encoder.batch_invariant = args.worker != "fp32-fast"
    lengths = [len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    config = encoder.model.config
    embedding = encoder.model.get_input_embeddings().weight.numel()
    parameters = sum(p.numel() for p in encoder.model.parameters()) + sum(
        b.numel() for name, b in encoder.model.named_buffers() if name.endswith("weight_t")
    )
    attention = sum(4 * config.num_hidden_layers * config.hidden_size * n * n for n in lengths)
    flops = 2 * (parameters - embedding) * sum(lengths) + attention

    def encode(batch: list[str]):
        return encoder.encode(batch, batch_size=args.batch_size, show_progress_bar=False)

    serve(encode, sum(lengths), texts, args, {"flops": flops})


def load_texts(kind: str, count: int, data: Path) -> list[str]:
    """STS-B test sentences (file order, unique) or SciFact documents (title and abstract, file order)."""
    if kind == "stsb":
        from lm2vec.evaluation import load_sts

        return load_sts("stsb", "test", data).interleaved_sentences()[:count]
    records = [json.loads(line) for line in (data / "retrieval" / "scifact" / "corpus.jsonl").open()]
    return [f"{r.get('title') or ''} {r['text']}".strip() for r in records[:count]]


class Worker:
    """A worker process for one mode, driven line by line over its stdin/stdout."""

    def __init__(self, mode: str, python: str, texts: Path, embeddings: Path, args: argparse.Namespace):
        command = [python, __file__, "--worker", mode, "--texts-file", str(texts), "--embeddings", str(embeddings)]
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        command += ["--max-length", str(args.max_length), "--reference", str(args.reference)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line.removeprefix(REPLY))
        raise RuntimeError(f"the worker exited with code {self.process.wait()} before replying")

    def send(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()


def matmul_peaks(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s (ops/s for int8) of one size^3 product per precision, best of ``repeats`` after a warm-up."""
    import torch

    torch.set_num_threads(threads)
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        if dtype == torch.int8:
            a = torch.randint(-127, 128, (size, size), dtype=dtype)
            b = torch.randint(-127, 128, (size, size), dtype=dtype)
            product = torch._int_mm
        else:
            a, b, product = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype), torch.mm
        product(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            product(a, b)
            best = min(best, time.perf_counter() - start)
        peaks[name] = 2 * size**3 / best
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", choices=["stsb", "scifact"], default="stsb")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (after one warm-up)")
    parser.add_argument("--modes", default="reference,fp32,bf16,int8", help="comma-separated, from: " + MODE_NAMES)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--data", type=Path, default=None, help="the datasets folder (default: LM2VEC_DATA)")
    parser.add_argument("--reference", type=Path, default=REFERENCE_DIR, help="the reference's set-up folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--embeddings", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        texts = json.loads(args.texts_file.read_text())
        (reference_worker if args.worker == "reference" else lm2vec_worker)(args, texts)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from lm2vec.datafiles import data_dir
    from lm2vec.evaluation import cosine_rows
    from lm2vec.hardware import cpu_info, describe_cpu

    modes = args.modes.split(",")
    unknown = set(modes) - {"reference", *LM2VEC_MODES}
    if unknown:
        sys.exit(f"unknown mode(s) {sorted(unknown)}; choose from: {MODE_NAMES}")
    reference_python = args.reference / "venv" / "bin" / "python"
    if "reference" in modes and not (reference_python.is_file() and (args.reference / "smollm2-hf").is_dir()):
        sys.exit(f"the reference is not set up in {args.reference}: run `make reference` (or pass --reference DIR)")
    texts = load_texts(args.texts, args.count, args.data or data_dir())
    print(f"CPU: {describe_cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        workers = {
            mode: Worker(
                mode,
                str(reference_python) if mode == "reference" else sys.executable,
                texts_file,
                Path(tmp) / f"{mode}.npy",
                args,
            )
            for mode in modes
        }
        setup = {mode: w.read() for mode, w in workers.items()}  # all load and warm up before any timing
        peaks = matmul_peaks(args.threads)  # workers idle, waiting on stdin
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, w in workers.items():
                seconds[mode].append(w.send("run")["seconds"])
        peak_rss = {mode: w.send("stop")["peak_rss_mb"] for mode, w in workers.items()}
        for w in workers.values():
            w.process.wait()
        embeddings = {mode: np.load(Path(tmp) / f"{mode}.npy") for mode in modes}

    from lm2vec.encoder import CPU_MAX_TOKENS  # here: the reference's workers run this file without lm2vec

    lm2vec_setup = next((s for m, s in setup.items() if m != "reference"), None)
    flops = lm2vec_setup["flops"] if lm2vec_setup else None
    tokens = lm2vec_setup["tokens"] if lm2vec_setup else setup["reference"]["tokens"]
    print(
        f"{len(texts)} {args.texts} texts ({tokens / len(texts):.1f} tokens each), batch {args.batch_size} "
        f"(lm2vec: and at most {CPU_MAX_TOKENS} tokens, its CPU default), "
        f"{args.threads} threads, max length {args.max_length}; warm-up on one batch, then {args.repeats} timed "
        f"runs per mode, alternating"
    )
    print("matmul peak (2048^3): " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()) + "\n")
    base = statistics.median(seconds["reference"]) if "reference" in modes else None
    anchor = embeddings["reference"] if "reference" in modes else embeddings[modes[0]]
    header = f"{'mode':<10}{'sent/s':>8}{'tokens/s':>10}{'peak RSS':>10}{'vs ref':>8}{'TFLOP/s':>9}{'of peak':>9}"
    print(header + f"{'cos min':>9}   runs (s)")
    figures: dict[str, dict] = {}
    for mode in modes:
        median = statistics.median(seconds[mode])
        cosine = cosine_rows(embeddings[mode], anchor)
        rate = flops / median if flops else None
        figures[mode] = {
            "sentences_per_s": len(texts) / median,
            "tokens_per_s": setup[mode]["tokens"] / median,
            "peak_rss_mb": peak_rss[mode],
            "vs_reference": base / median if base else None,
            "model_tflops": rate / 1e12 if rate else None,
            "fraction_of_peak": rate / peaks[PEAK_OF[mode]] if rate else None,
            "cosine_to_anchor_min": float(cosine.min()),
            "cosine_to_anchor_mean": float(cosine.mean()),
            "seconds": seconds[mode],
        }
        f = figures[mode]
        print(
            f"{mode:<10}{f['sentences_per_s']:>8.1f}{f['tokens_per_s']:>10.0f}{f['peak_rss_mb']:>7.0f} MB"
            f"{_fmt(f['vs_reference'], 'x'):>8}{_fmt(f['model_tflops'], ''):>9}{_fmt(f['fraction_of_peak'], '%'):>9}"
            f"{cosine.min():>9.4f}   " + ", ".join(f"{s:.1f}" for s in seconds[mode])
        )
    print(f"\n'cos min': lowest per-text cosine to {'the reference' if base else modes[0]}'s embeddings")
    print("'of peak': model FLOP/s over the matmul peak of the mode's precision (reference and fp32: fp32)")
    if args.json:
        summary = {"cpu": cpu_info(), "texts": args.texts, "count": len(texts), "tokens": tokens, "flops": flops}
        summary |= {"batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats}
        summary |= {"matmul_peaks": peaks, "modes": figures}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}{unit}"


if __name__ == "__main__":
    main()
