"""The embeddings server, for real: uvicorn on a free loopback port, called with the official openai client."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from openai import OpenAI

import lm2vec
from tests.support import free_port, get, post, random_texts, running, tiny_encoder

TEXTS = random_texts(12, seed=5)


@pytest.fixture(scope="module")
def encoder() -> lm2vec.Encoder:
    return tiny_encoder(prompts={"query": "w5 w6 "})


def test_openai_client_float_and_base64_equal_encode(encoder: lm2vec.Encoder):
    expected = encoder.encode(TEXTS, normalize_embeddings=True)
    with running(encoder) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        floats = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
        np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), expected, atol=1e-6)
        assert [d.index for d in floats.data] == list(range(len(TEXTS)))
        assert floats.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)
        packed = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="base64")
        rows = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data]
        np.testing.assert_allclose(np.stack(rows), expected, atol=1e-6)
        default = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
        np.testing.assert_allclose(np.array([d.embedding for d in default.data]), expected, atol=1e-6)
        one = client.embeddings.create(model="tiny", input=TEXTS[0], dimensions=16)
        short = encoder.encode(TEXTS[0], truncate_dim=16, normalize_embeddings=True)
        np.testing.assert_allclose(one.data[0].embedding, short, atol=1e-6)
        query = client.embeddings.create(model="tiny", input=TEXTS[:2], extra_body={"prompt_name": "query"})
        expected_query = encoder.encode(TEXTS[:2], prompt_name="query", normalize_embeddings=True)
        np.testing.assert_allclose([d.embedding for d in query.data], expected_query, atol=1e-6)
        ids = encoder.tokenizer(TEXTS[:2])["input_ids"]
        by_ids = client.embeddings.create(model="tiny", input=ids)
        np.testing.assert_allclose([d.embedding for d in by_ids.data], expected[:2], atol=1e-6)


def test_quantized_outputs_match_encode(encoder: lm2vec.Encoder):
    with running(encoder) as url:
        for precision, dtype in (("int8", np.int8), ("ubinary", np.uint8)):
            status, body = post(f"{url}/v1/embeddings", {"model": "tiny", "input": TEXTS, "precision": precision})
            assert status == 200, body
            expected = encoder.encode(TEXTS, normalize_embeddings=True, precision=precision)
            np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], dtype=dtype), expected)
            status, body = post(
                f"{url}/v1/embeddings",
                {"model": "tiny", "input": TEXTS, "precision": precision, "encoding_format": "base64"},
            )
            rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype=dtype) for d in body["data"]]
            np.testing.assert_array_equal(np.stack(rows), expected)


BAD_REQUESTS = [
    (b"{not json", 400, "malformed JSON"),
    ({"model": "tiny", "input": 42}, 422, "input"),
    ({"model": "tiny", "input": ["ok", 3]}, 422, "input"),
    ({"model": "tiny", "input": []}, 422, "must not be empty"),
    ({"model": "tiny", "input": ["w4", ""]}, 422, "input[1] is an empty string"),
    ({"model": "tiny", "input": [[4, 99999]]}, 422, "token ids"),
    ({"model": "tiny", "input": "w4", "dimensions": 0}, 422, "dimensions"),
    ({"model": "tiny", "input": "w4", "dimensions": 65}, 422, "at most 64"),
    ({"model": "tiny", "input": "w4", "encoding_format": "hex"}, 422, "encoding_format"),
    ({"model": "tiny", "input": "w4", "prompt_name": "nope"}, 422, "unknown prompt_name"),
    ({"model": "gpt-4", "input": "w4"}, 404, "unknown model 'gpt-4'"),
    ({"input": "w4"}, 422, "model"),
    ({"model": "tiny", "input": ["w4"] * 9}, 413, "at most 8 per request"),
    ({"model": "tiny", "input": "w4 " * 40}, 413, "at most 100"),
    (b'{"model": "tiny", "input": "' + b"w4 " * 3_500_000 + b'"}', 413, "request body over the limit"),
]


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(encoder: lm2vec.Encoder):
    with running(encoder, max_inputs=8, max_chars=100, max_body_bytes=1024 * 1024) as url:
        for body, status, message in BAD_REQUESTS:
            got, reply = post(f"{url}/v1/embeddings", body)
            assert got == status, (body if isinstance(body, dict) else body[:40], reply)
            assert message in reply["error"]["message"], reply
            assert reply["error"]["type"] == "invalid_request_error"
        status, body = post(f"{url}/v1/embeddings", {"model": "tiny", "input": TEXTS[:3]})
        assert status == 200 and len(body["data"]) == 3


def test_api_key(encoder: lm2vec.Encoder):
    with running(encoder, api_key="s3cret") as url:
        assert post(f"{url}/v1/embeddings", {"model": "tiny", "input": "w4"})[0] == 401
        wrong = {"Authorization": "Bearer nope"}
        assert post(f"{url}/v1/embeddings", {"model": "tiny", "input": "w4"}, wrong)[0] == 401
        status, refused = post(f"{url}/embed", {"inputs": "w4"})  # TEI's route: TEI's shape
        assert status == 401 and refused == {"error": "missing or wrong API key", "error_type": "Validation"}
        client = OpenAI(base_url=f"{url}/v1", api_key="s3cret")
        assert len(client.embeddings.create(model="tiny", input=["w4", "w5"]).data) == 2
        with urllib.request.urlopen(f"{url}/health") as response:  # health needs no key
            assert json.loads(response.read())["status"] == "ok"


def test_concurrent_requests_share_model_calls(encoder: lm2vec.Encoder):
    """64 requests in flight at once: answered correctly, in fewer model calls than requests."""
    from openai import AsyncOpenAI

    expected = encoder.encode(TEXTS, normalize_embeddings=True)

    async def flood(url: str) -> list:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        jobs = [client.embeddings.create(model="tiny", input=TEXTS[i % 12 : i % 12 + 1 + i % 3]) for i in range(64)]
        return await asyncio.gather(*jobs)

    with running(encoder) as url:
        replies = asyncio.run(flood(url))
        with urllib.request.urlopen(f"{url}/health") as response:
            calls = json.loads(response.read())["model_calls"]
    for i, reply in enumerate(replies):
        start = i % 12
        got = np.array([d.embedding for d in reply.data])
        np.testing.assert_allclose(got, expected[start : start + len(got)], atol=1e-6)
    assert calls < 64, calls


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port``, from the kernel's table (Linux)."""
    addresses = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN; the address is little-endian hex
            addresses.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return addresses


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads the kernel's socket table (Linux)")
def test_cli_serves_on_loopback(tiny_dir: Path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lm2vec.cli", "serve", str(tiny_dir), "--port", str(port), "--name", "t"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    assert json.loads(response.read())["model"] == "t"
                    break
            except OSError:
                assert process.poll() is None and time.time() < deadline, process.stderr.read()
                time.sleep(0.2)
        status, body = post(f"http://127.0.0.1:{port}/v1/embeddings", {"model": "t", "input": ["w4 w5"]})
        assert status == 200 and len(body["data"][0]["embedding"]) == 64
        assert listening_addresses(port) == {"127.0.0.1"}  # bound to loopback only
    finally:
        process.terminate()
        process.wait(10)


def test_tei_embed_and_info_match_the_openai_route(encoder: lm2vec.Encoder):
    """A client written for text-embeddings-inference (its JSON, its routes) gets the OpenAI route's vectors."""
    with running(encoder) as url:
        status, tei = post(f"{url}/embed", {"inputs": TEXTS})
        assert status == 200, tei
        _, openai = post(f"{url}/v1/embeddings", {"model": "tiny", "input": TEXTS})
        np.testing.assert_allclose(tei, [d["embedding"] for d in openai["data"]], atol=1e-6)
        _, raw = post(f"{url}/embed", {"inputs": TEXTS[0], "normalize": False, "dimensions": 8})
        np.testing.assert_allclose(raw, encoder.encode([TEXTS[0]], truncate_dim=8), atol=1e-5)
        long_text = " ".join(["w5"] * 100)  # over max_length=64: TEI refuses unless truncate is set
        status, refused = post(f"{url}/embed", {"inputs": [TEXTS[0], long_text]})
        assert status == 413 and "input[1]" in refused["error"] and "truncate" in refused["error"]  # TEI's shape
        assert refused["error_type"] == "Validation"
        _, cut = post(f"{url}/embed", {"inputs": long_text, "truncate": True})
        np.testing.assert_allclose(cut, encoder.encode([long_text], normalize_embeddings=True), atol=1e-6)
        status, info = get(f"{url}/info")
        assert status == 200 and info["model_id"] == "tiny" and info["max_input_length"] == 64
        assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_client_batch_size"] == 2048


def test_metrics_parse_and_count_what_was_sent(encoder: lm2vec.Encoder):
    from prometheus_client.parser import text_string_to_metric_families

    sizes, tokens = [1, 3, 5, 2], 0
    with running(encoder) as url:
        for n in sizes:
            status, body = post(f"{url}/v1/embeddings", {"model": "tiny", "input": TEXTS[:n]})
            assert status == 200
            tokens += body["usage"]["total_tokens"]
        for bad in ({"model": "tiny", "input": []}, {"model": "tiny"}, b"[[["):
            assert post(f"{url}/v1/embeddings", bad)[0] in (400, 422)
        assert post(f"{url}/embed", {"inputs": TEXTS[:2]})[0] == 200
        tokens += sum(len(text.split()) for text in TEXTS[:2])
        _, health = get(f"{url}/health")
        with urllib.request.urlopen(f"{url}/metrics") as response:
            text = response.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def requests(route: str, status: int) -> float:
        return samples.get(("lm2vec_requests_total", (("route", route), ("status", str(status)))), 0)

    assert requests("/v1/embeddings", 200) == len(sizes)
    assert requests("/v1/embeddings", 422) == 2 and requests("/v1/embeddings", 400) == 1
    assert requests("/embed", 200) == 1 and requests("/health", 200) == 1
    assert samples[("lm2vec_embedded_texts_total", ())] == sum(sizes) + 2
    assert samples[("lm2vec_embedded_tokens_total", ())] == tokens
    assert samples[("lm2vec_model_call_texts_count", ())] == health["model_calls"]
    assert samples[("lm2vec_queue_tokens", ())] == 0
    latency = samples[("lm2vec_request_duration_seconds_count", (("route", "/v1/embeddings"),))]
    assert latency == len(sizes) + 3
