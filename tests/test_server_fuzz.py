"""Hundreds of malformed or hostile bodies against the real server: every answer is a 4xx in OpenAI's error
shape, and the server goes on serving."""

from __future__ import annotations

import json
import random

import numpy as np

from tests.support import call, post, random_texts, running, tiny_encoder

VALID = {"model": "tiny", "input": ["w4 w5", "w6 w7 w8"]}
WRONG_VALUES = {
    "input": [42, 4.5, True, None, {}, {"a": 1}, [1.5], [["w4"]], [[]], [None], [-1], [10**30], [[4, -2]], ["w4", 5]]
    + [[[4], ["w4"]], [""], "", []],
    "model": [1, None, [], {}, True, "gpt-4", ""],
    "encoding_format": ["hex", 1, None, "", ["float"]],
    "dimensions": [0, -3, "8", 1.5, True, 10**40, [], 65, float("inf")],
    "prompt_name": [1, [], "nope", {}],
    "precision": ["float64", 3, None, "INT8"],
}
NUMBERS = [b"1" * 5000, b"1e999", b"-1e999", b"NaN", b"-Infinity", b"1" * 100, b"0x10", b"1_000", b"+1", b".5"]


def hostile_bodies(rng: random.Random) -> list[bytes]:
    bodies = []
    for _ in range(20):  # not UTF-8: a continuation byte first
        junk = bytes([rng.randrange(0x80, 0xC0)] + [rng.randrange(0x80, 0x100) for _ in range(rng.randint(0, 7))])
        bodies.append(b'{"model": "tiny", "input": "w4 ' + junk + b'"}')
    for escape in (b"\\ud83d", b"\\udcff", b"\\ude00\\ud83d"):  # lone surrogates: valid JSON, no valid text
        bodies.append(b'{"model": "tiny", "input": "w4 ' + escape + b'"}')
        bodies.append(b'{"model": "tiny", "input": ["w4", "' + escape + b' w5"]}')
    for depth in (64, 1000, 10_000, 100_000, 400_000):  # deep nesting
        bodies += [b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth]
        bodies.append(b'{"model": "tiny", "input": ' + b"[" * depth + b'"w4"' + b"]" * depth + b"}")
    for number in NUMBERS:  # numbers Python will not read, or reads as inf/nan
        bodies.append(b'{"model": "tiny", "input": [[' + number + b"]]}")
        bodies.append(b'{"model": "tiny", "input": "w4", "dimensions": ' + number + b"}")
    for field, values in WRONG_VALUES.items():  # wrong types and values, one field at a time
        bodies += [json.dumps(VALID | {field: value}).encode() for value in values]
    for field in VALID:  # a missing field
        bodies.append(json.dumps({k: v for k, v in VALID.items() if k != field}).encode())
    bodies += [b"", b"null", b"[]", b'"w4"', b"42", b"{}", b"true", b"{,}", b"{'model': 'tiny'}"]  # not a request
    bodies.append(json.dumps({"model": "tiny", "input": ["w4"] * 9}).encode())  # too many inputs
    bodies.append(json.dumps({"model": "tiny", "input": "w4 " * 2_000_000}).encode())  # over the body limit
    whole = json.dumps({"model": "tiny", "input": random_texts(20, seed=3), "dimensions": 8}).encode()
    bodies += [whole[: rng.randrange(1, len(whole))] for _ in range(50)]  # truncated
    bodies += [rng.randbytes(rng.randint(1, 300)) for _ in range(50)]  # noise
    return bodies


def not_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return True
    return False


def assert_openai_error(status: int, reply, what: object) -> None:
    assert 400 <= status < 500, (status, what, reply)
    error = reply["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), reply
    assert "param" in error and "code" in error, reply


def test_hostile_bodies_get_openai_shaped_4xx_and_the_server_keeps_serving():
    encoder = tiny_encoder()
    rng = random.Random(0)
    bodies = hostile_bodies(rng)
    assert len(bodies) >= 200
    with running(encoder, max_inputs=8, max_body_bytes=2 * 1024 * 1024) as url:
        for body in bodies:
            status, _, reply = call(f"{url}/v1/embeddings", body)
            assert_openai_error(status, reply, body[:80])
        for body in bodies:  # the TEI route parses the same way and answers in TEI's shape
            status, _, reply = call(f"{url}/embed", body.replace(b'"input"', b'"inputs"'))
            if status == 200:  # a valid TEI body (the OpenAI-only fields are ignored)
                continue
            assert 400 <= status < 500 and set(reply) == {"error", "error_type"}, (status, body[:80], reply)
            assert isinstance(reply["error"], str) and reply["error"] and reply["error_type"] == "Validation", reply
        for path in ("/nowhere", "/v1/embeddings/x", "/v1/models"):  # unknown route, and a wrong method (POST)
            status, _, reply = call(f"{url}{path}", b"{}")
            assert_openai_error(status, reply, path)
        status, reply = post(f"{url}/v1/embeddings", VALID)
        assert status == 200, reply
        expected = encoder.encode(VALID["input"], normalize_embeddings=True)
        np.testing.assert_allclose([d["embedding"] for d in reply["data"]], expected, atol=1e-6)
