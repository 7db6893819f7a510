"""Load test of `lm2vec serve` on loopback: many small requests with a few maximal ones mixed in.

Starts the real server (the built-in model unless ``--model``; ``--dtype auto``, the default) in a subprocess and
drives it with ``--clients`` concurrent clients (the official ``AsyncOpenAI``) sending ``--requests`` requests of
1-16 STS-B sentences each plus ``--maximal`` requests of ``--maximal-texts`` sentences (the most inputs a request
may carry) spread through the sequence, bounded by ``--max-seconds``. Prints the error count, p50/p99 latency of
the small requests, the maximal requests' latencies, texts/s, and the throughput as a ratio of ``encode()`` on
the same texts in the same precision, measured in this process after the server has stopped. Client and server
share the machine's cores, so on a 2-core machine the figures include the load generator's own cost.

    python benchmarks/serve_load.py [--requests 2000] [--clients 32] [--maximal 3] [--dtype auto]
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
from prometheus_client.parser import text_string_to_metric_families

from lm2vec.datafiles import data_dir
from lm2vec.evaluation import load_sts
from lm2vec.hardware import describe_cpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "lm2vec.cli", "serve", args.model, "--port", str(port), "--name", "bench"]
    command += ["--dtype", args.dtype]
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


async def drive(url: str, requests: list[list[str]], clients: int, max_seconds: float, small: int = 16) -> dict:
    """``clients`` workers take requests off one queue until it is empty or time is up."""
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for texts in requests:
        queue.put_nowait(texts)
    latencies: dict[str, list[float]] = {"small": [], "maximal": []}
    errors, texts_done = 0, 0
    start = time.perf_counter()
    api = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=max_seconds)

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
            latencies["small" if len(texts) <= small else "maximal"].append(time.perf_counter() - sent)
            errors += not ok
            texts_done += len(texts) if ok else 0

    await asyncio.gather(*(client() for _ in range(clients)))
    await api.close()
    seconds = time.perf_counter() - start
    done = sorted(latencies["small"])
    return {
        "requests": len(done) + len(latencies["maximal"]),
        "unsent": queue.qsize(),
        "errors": errors,
        "seconds": seconds,
        "texts_per_s": texts_done / seconds,
        "p50_ms": 1000 * statistics.median(done),
        "p99_ms": 1000 * done[min(len(done) - 1, int(0.99 * len(done)))],
        "maximal_s": [round(x, 1) for x in latencies["maximal"]],
    }


def model_time(url: str) -> dict[str, float]:
    """The server's own account (``/metrics``): model calls, texts, and seconds spent in them."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        samples = {
            sample.name: sample.value
            for family in text_string_to_metric_families(reply.read().decode())
            for sample in family.samples
            if not sample.labels
        }
    return {
        "calls": samples["lm2vec_model_call_seconds_count"],
        "seconds": samples["lm2vec_model_call_seconds_sum"],
        "texts": samples["lm2vec_embedded_texts_total"],
    }


def encode_speed(args: argparse.Namespace, texts: list[str]) -> float:
    """texts/s of ``encode()`` on the same texts, same model and precision, in this process."""
    import lm2vec

    encoder = lm2vec.load(None if args.model == "default" else args.model, dtype=args.dtype)
    encoder.encode(texts[:64])
    start = time.perf_counter()
    encoder.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "int8"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--maximal", type=int, default=3, help="maximal requests mixed in")
    parser.add_argument("--maximal-texts", type=int, default=2048, help="texts per maximal request (the limit)")
    parser.add_argument("--max-seconds", type=float, default=1200, help="time bound of the load")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    pairs = load_sts("stsb", "test", args.data or data_dir())
    sentences = list(dict.fromkeys(pairs.sentence1 + pairs.sentence2))
    rng = random.Random(0)
    requests = [rng.sample(sentences, rng.randint(1, 16)) for _ in range(args.requests)]
    for i in range(args.maximal):  # spread through the sequence: at 10%, 40%, 70%, ...
        position = int(len(requests) * (0.1 + 0.9 * i / max(args.maximal, 1)))
        requests.insert(position, rng.choices(sentences, k=args.maximal_texts))
    print(f"CPU: {describe_cpu()}")
    texts = [text for request in requests for text in request]
    print(
        f"{args.requests} requests of 1-16 STS-B sentences and {args.maximal} of {args.maximal_texts} "
        f"({len(texts)} texts), {args.clients} concurrent clients, model {args.model} (--dtype {args.dtype}), "
        f"at most {args.max_seconds:.0f} s\n"
    )
    process, url = start_server(args)
    try:
        asyncio.run(drive(url, requests[:64], args.clients, args.max_seconds))  # warm-up
        before = model_time(url)
        r = asyncio.run(drive(url, requests, args.clients, args.max_seconds))
        after = model_time(url)
    finally:
        process.terminate()
        process.wait(60)
    print(
        f"served {r['requests']} requests in {r['seconds']:.1f} s ({r['unsent']} unsent at the time bound): "
        f"errors {r['errors']}; small requests p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; "
        f"maximal requests {r['maximal_s']} s; {r['texts_per_s']:.1f} texts/s"
    )
    calls, busy, embedded = (after[key] - before[key] for key in ("calls", "seconds", "texts"))
    print(
        f"model calls: {calls:.0f} of {embedded / calls:.0f} texts on average, busy {busy:.1f} s "
        f"({100 * busy / r['seconds']:.0f}% of the wall time), {embedded / busy:.1f} texts/s within the calls"
    )
    baseline = encode_speed(args, texts)
    print(f"encode() on the same texts: {baseline:.1f} texts/s; server / encode(): {r['texts_per_s'] / baseline:.2f}x")


if __name__ == "__main__":
    main()
