"""Load test of `lm2vec serve` on loopback: dynamic batching against one model call per request.

Starts the real server (the built-in model unless ``--model``) in a subprocess, once per mode, and drives it
with ``--clients`` concurrent clients (the official openai async client) sending ``--requests`` requests of
1-16 STS-B sentences each (a fixed seeded sequence, the same for both modes), each mode bounded by
``--max-seconds``. Prints requests/s,
texts/s, p50/p99 latency, the error count, and the gain of dynamic batching. Client and server share the
machine's cores, so on a 2-core machine the figures include the load generator's own cost.

    python benchmarks/serve_load.py [--requests 2000] [--clients 32] [--dtype int8]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openai import APIError, AsyncOpenAI

from lm2vec.datafiles import data_dir
from lm2vec.evaluation import load_sts
from lm2vec.hardware import describe_cpu

MODES = {"dynamic batching": [], "batch per request": ["--no-dynamic-batching"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "lm2vec.cli", "serve", args.model, "--port", str(port), "--name", "bench"]
    command += ["--dtype", args.dtype, *extra]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return process, url
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.5)


async def drive(url: str, requests: list[list[str]], clients: int, max_seconds: float) -> dict:
    """``clients`` workers take requests off one queue until it is empty or time is up."""
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for texts in requests:
        queue.put_nowait(texts)
    latencies: list[float] = []
    errors, texts_done = 0, 0
    start = time.perf_counter()
    api = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def client() -> None:
        nonlocal errors, texts_done
        while not queue.empty() and time.perf_counter() - start < max_seconds:
            texts = queue.get_nowait()
            sent = time.perf_counter()
            try:
                reply = await api.embeddings.create(model="bench", input=texts)
                ok = len(reply.data) == len(texts)
            except APIError:
                ok = False
            latencies.append(time.perf_counter() - sent)
            errors += not ok
            texts_done += len(texts) if ok else 0

    await asyncio.gather(*(client() for _ in range(clients)))
    await api.close()
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "texts_per_s": texts_done / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "auto"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=600, help="time bound per mode")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--only", choices=list(MODES), help="run one mode (no gain printed)")
    args = parser.parse_args()
    pairs = load_sts("stsb", "test", args.data or data_dir())
    sentences = list(dict.fromkeys(pairs.sentence1 + pairs.sentence2))
    rng = random.Random(0)
    requests = [rng.sample(sentences, rng.randint(1, 16)) for _ in range(args.requests)]
    print(f"CPU: {describe_cpu()}")
    texts = sum(map(len, requests))
    print(
        f"{args.requests} requests of 1-16 STS-B sentences ({texts} texts), {args.clients} concurrent clients, "
        f"model {args.model} ({args.dtype}), at most {args.max_seconds:.0f} s per mode\n"
    )
    results = {}
    for mode, flags in MODES.items():
        if args.only and mode != args.only:
            continue
        process, url = start_server(args, flags)
        try:
            asyncio.run(drive(url, requests[:64], args.clients, args.max_seconds))  # warm-up
            results[mode] = asyncio.run(drive(url, requests, args.clients, args.max_seconds))
        finally:
            process.terminate()
            process.wait(30)
        r = results[mode]
        print(
            f"{mode:<18} {r['requests']:>5} requests in {r['seconds']:6.1f} s: {r['requests_per_s']:6.1f} req/s, "
            f"{r['texts_per_s']:6.1f} texts/s, p50 {r['p50_ms']:7.0f} ms, p99 {r['p99_ms']:7.0f} ms, "
            f"errors {r['errors']}"
        )
    if len(results) == len(MODES):
        gain = results["dynamic batching"]["texts_per_s"] / results["batch per request"]["texts_per_s"]
        print(f"\ndynamic batching / batch per request (texts/s): {gain:.2f}x")


if __name__ == "__main__":
    main()
