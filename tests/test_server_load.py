"""The server under load and faults, for real: one big request cannot stall the others, a full queue answers
503, a client that leaves stops costing model time, SIGTERM drains."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lm2vec
from tests.support import WORDS, call, free_port, get, post, running, tiny_config, tiny_model, tiny_tokenizer


def slow_encoder() -> lm2vec.Encoder:
    """Big enough that 512 texts of 200 words take several seconds on 2 CPU cores (4 layers of width 256)."""
    config = tiny_config(
        "llama",
        pad_token_id=3,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        max_position_embeddings=256,
    )
    return lm2vec.Encoder(tiny_model(lm2vec.set_bidirectional(config)), tiny_tokenizer(), max_length=256)


def long_texts(n: int, words: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=words)) for _ in range(n)]


@pytest.fixture(scope="module")
def encoder() -> lm2vec.Encoder:
    return slow_encoder()


class Background(threading.Thread):
    """A POST in a thread of its own; ``reply`` is ``(status, body)`` once done."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.reply: tuple[int, dict] | None = None
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.reply = post(self.url, self.body, timeout=300)
        except OSError as err:  # refused, reset, timed out: left as the error, for the test to report
            self.error = err


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_a_maximal_request_does_not_stall_health_or_small_requests(encoder: lm2vec.Encoder):
    big_texts = long_texts(512)
    expected = encoder.encode(big_texts, normalize_embeddings=True)
    with running(encoder) as url:
        big = Background(f"{url}/v1/embeddings", {"model": "tiny", "input": big_texts})
        big.start()
        wait_for(lambda: get(f"{url}/health")[1]["model_calls"] > 0)
        start = time.perf_counter()
        status, health = get(f"{url}/health")
        health_seconds = time.perf_counter() - start
        start = time.perf_counter()
        status_small, small = post(f"{url}/v1/embeddings", {"model": "tiny", "input": "w4 w5 w6"})
        small_seconds = time.perf_counter() - start
        big_still_running = big.is_alive()
        big.join(300)
    assert big_still_running, "the big request finished first: make it bigger, or the test proves nothing"
    assert status == 200 and health_seconds < 0.2, health_seconds
    assert status_small == 200 and small_seconds < 2, small_seconds
    one = encoder.encode("w4 w5 w6", normalize_embeddings=True)
    np.testing.assert_allclose(small["data"][0]["embedding"], one, atol=1e-5)
    status, body = big.reply
    assert status == 200
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], expected, atol=1e-5)


def test_a_full_queue_answers_503_with_retry_after(encoder: lm2vec.Encoder):
    big_texts = long_texts(200)  # 40,000 tokens
    with running(encoder, max_request_tokens=50_000, max_queued_tokens=50_000) as url:
        big = Background(f"{url}/v1/embeddings", {"model": "tiny", "input": big_texts})
        big.start()
        wait_for(lambda: get(f"{url}/health")[1]["model_calls"] > 0)
        status, headers, body = call(f"{url}/v1/embeddings", {"model": "tiny", "input": long_texts(100, seed=1)})
        assert big.is_alive(), "the queue emptied before the second request: the test proves nothing"
        assert status == 503 and body["error"]["code"] == "overloaded", body
        assert int(headers["Retry-After"]) >= 1
        big.join(300)
        assert big.reply[0] == 200
        assert post(f"{url}/v1/embeddings", {"model": "tiny", "input": long_texts(100, seed=1)}, timeout=300)[0] == 200


def test_a_client_that_leaves_stops_costing_model_time(encoder: lm2vec.Encoder):
    texts = long_texts(512)  # ~50 model calls of 2048 tokens
    with running(encoder) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": "tiny", "input": texts}).encode()
        head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(head.encode() + body)
            wait_for(lambda: get(f"{url}/health")[1]["model_calls"] >= 2)
        wait_for(lambda: get(f"{url}/health")[1]["queued_tokens"] == 0, 10)
        time.sleep(1)  # the call running when the client left finishes
        calls_when_left = get(f"{url}/health")[1]["model_calls"]
        time.sleep(1)
        _, health = get(f"{url}/health")
        metrics = call(f"{url}/metrics")[2]
    assert health["model_calls"] == calls_when_left, "the model kept working for a client that left"
    assert health["model_calls"] < 10, health  # of the ~50 the request needed
    assert 'lm2vec_requests_total{route="/v1/embeddings",status="499"} 1.0' in metrics


def test_sigterm_during_load_answers_every_accepted_request(tmp_path: Path):
    """Big requests that cannot finish within --drain-seconds get 503; small ones queued beside them get served."""
    model_dir = slow_encoder().save(tmp_path / "slow")
    port = free_port()
    command = [sys.executable, "-m", "lm2vec.cli", "serve", str(model_dir), "--port", str(port), "--name", "slow"]
    log = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen([*command, "--drain-seconds", "2"], stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url) or process.poll() is not None, 120)
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
        embed = f"{url}/v1/embeddings"
        bigs = [Background(embed, {"model": "slow", "input": long_texts(200, seed=i)}) for i in range(4)]
        smalls = [Background(embed, {"model": "slow", "input": [f"w{4 + i} w9"]}) for i in range(4)]
        for client in bigs:
            client.start()
        wait_for(lambda: get(f"{url}/health")[1]["model_calls"] >= 2)
        for client in smalls:
            client.start()
        wait_for(lambda: _queued_requests(url) + sum(not c.is_alive() for c in smalls) >= len(bigs) + len(smalls))
        process.send_signal(signal.SIGTERM)
        for client in bigs + smalls:
            client.join(60)
        assert process.wait(30) == 0  # drained, then a normal exit
    finally:
        process.kill()
        log.close()
    assert all(c.reply for c in bigs + smalls), [c.error for c in bigs + smalls]  # none hung or was cut off
    assert [c.reply[0] for c in smalls if c.reply] == [200] * len(smalls)
    for client in bigs:
        assert client.reply and client.reply[0] == 503 and client.reply[1]["error"]["code"] == "shutting_down"


def _queued_requests(url: str) -> int:
    lines = call(f"{url}/metrics")[2].splitlines()
    return int(float(next(line.split()[1] for line in lines if line.startswith("lm2vec_queue_requests "))))


def _up(url: str) -> bool:
    try:
        return get(f"{url}/health", timeout=1)[0] == 200
    except OSError:
        return False


def test_a_port_in_use_is_a_clear_error(tmp_path: Path):
    model_dir = slow_encoder().save(tmp_path / "slow")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "lm2vec.cli", "serve", str(model_dir), "--port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"lm2vec: error: the server did not start on 127.0.0.1:{port}" in result.stderr
