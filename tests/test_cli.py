"""The installed ``lm2vec`` console script, run as a user would (each call pays the torch import, ~6 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import random_texts

import lm2vec

SCRIPT = Path(sys.executable).with_name("lm2vec")


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_encode_text_file_matches_the_library(tiny_dir, tmp_path):
    texts = random_texts(5, seed=1)
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")  # blank lines are skipped
    out = tmp_path / "out.npy"
    done = run("encode", tiny_dir, source, "-o", out, "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert "wrote 5 x 64 embeddings" in done.stderr
    np.testing.assert_allclose(np.load(out), lm2vec.load(tiny_dir).encode(texts), atol=1e-5)


def test_encode_jsonl_with_instructions_and_options(tiny_dir, tmp_path):
    texts = random_texts(3, seed=2)
    lines = [{"body": texts[0]}, {"body": texts[1], "instruction": "w5 w6 "}, {"body": texts[2], "id": 7}]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.npy"
    done = run("encode", tiny_dir, source, "-o", out, "--field", "body", "--pooling", "last_token", "--normalize")
    assert done.returncode == 0, done.stderr
    expected = lm2vec.load(tiny_dir, pooling="last_token").encode(
        [texts[0], ("w5 w6 ", texts[1]), texts[2]], normalize_embeddings=True
    )
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def test_malformed_jsonl_is_a_clean_error_naming_the_line(tiny_dir, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "w4 w5"}\n{"text": "w6"\n')
    done = run("encode", tiny_dir, source, "-o", tmp_path / "out.npy")
    assert done.returncode == 2
    assert f"lm2vec: error: {source}:2: invalid JSON" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.npy").exists()


def test_info_json_reports_verified_bidirectional_attention(tiny_dir):
    done = run("info", tiny_dir, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["architecture"] == "llama"
    assert info["attention"] == "bidirectional" and info["attention_verified"] is True
    assert info["dimension"] == 64
