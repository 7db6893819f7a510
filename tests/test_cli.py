"""The installed ``lm2vec`` console script, run as a user would."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lm2vec
from lm2vec.cli import main
from tests.support import CLI, random_texts
from tests.support import run_cli as run


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


def test_encode_says_which_texts_max_length_cut(tiny_dir, tmp_path):
    texts = ["w4 w5", " ".join(["w6"] * 20), "w7", " ".join(["w8"] * 9)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    done = run("encode", tiny_dir, source, "-o", tmp_path / "out.npy", "--max-length", "8")
    assert done.returncode == 0, done.stderr
    assert "2 of 4 texts were longer than 8 tokens" in done.stderr and "(texts 2, 4)" in done.stderr
    assert "raise --max-length" in done.stderr
    done = run("encode", tiny_dir, source, "-o", tmp_path / "out.npy", "--max-length", "20")
    assert done.returncode == 0, done.stderr
    assert "longer than" not in done.stderr
    source.write_text(" ".join(["w6"] * 80) + "\n")  # past the tiny model's 64 positions: a longer limit is refused
    done = run("encode", tiny_dir, source, "-o", tmp_path / "out.npy")
    assert "1 of 1 texts were longer than 64 tokens" in done.stderr and "the model has no more positions" in done.stderr


def test_malformed_jsonl_is_a_clean_error_naming_the_line(tiny_dir, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "w4 w5"}\n{"text": "w6"\n')
    done = run("encode", tiny_dir, source, "-o", tmp_path / "out.npy")
    assert done.returncode == 2
    assert f"lm2vec: error: {source}:2: invalid JSON" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.npy").exists()


def test_bad_numbers_and_an_output_that_cannot_be_written_fail_before_the_model_loads(tmp_path, capsys):
    source = tmp_path / "texts.txt"
    source.write_text("w4 w5\n")
    missing_model = str(tmp_path / "no-model")  # loading it would fail with another message
    for flag, value, message in (("--max-length", "0", "a positive integer, got '0'"), ("--batch-size", "x", "'x'")):
        with pytest.raises(SystemExit) as exit_:
            main(["encode", missing_model, str(source), "-o", str(tmp_path / "out.npy"), flag, value])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", missing_model, "--port", "70000"])
    assert "a port number (0-65535), got '70000'" in capsys.readouterr().err
    unwritable = tmp_path / "no-folder" / "out.npy"
    assert main(["encode", missing_model, str(source), "-o", str(unwritable)]) == 2
    assert f"cannot write {unwritable}: {unwritable.parent} is not a writable folder" in capsys.readouterr().err


def test_info_json_reports_verified_bidirectional_attention(tiny_dir):
    done = run("info", tiny_dir, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["architecture"] == "llama"
    assert info["attention"] == "bidirectional" and info["attention_verified"] is True
    assert info["dimension"] == 64
    assert info["engine"] == "torch" and info["dtype"] in ("float32", "bfloat16", "int8")  # dtype="auto"
    assert set(info["machine"]["linear_speeds"]) >= {"float32", "bfloat16", "int8", "int8x2"}  # + oneDNN float32


def test_train_and_convert_refuse_bad_recipes_and_settings_before_loading(tmp_path):
    done = run("convert", "default", "--recipe", "turbo", "-o", tmp_path / "out")
    assert done.returncode == 2 and "unknown recipe 'turbo'" in done.stderr and "cpu" in done.stderr
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"description": "", "how_chosen": "", "stages": [{"stage": "simcse", "stepz": 3}]}))
    done = run("convert", "default", "--recipe", recipe, "-o", tmp_path / "out")
    assert done.returncode == 2 and "stage 1: unknown simcse setting(s) 'stepz'" in done.stderr
    done = run("convert", "default", "--recipe", "cpu", "-o", tmp_path / "out", "--data", tmp_path / "nodata")
    assert done.returncode == 2 and "training data not found" in done.stderr
    done = run("train", "simcse", "default", "-o", tmp_path / "out", "--set", "batch_size=0")
    assert done.returncode == 2 and "batch_size must be a positive integer" in done.stderr
    done = run("train", "simcse", "default", "-o", tmp_path / "out", "--set", "gradient_checkpointing=False")
    assert done.returncode == 2 and "gradient_checkpointing must be bool, got 'False'" in done.stderr  # not JSON
    assert not (tmp_path / "out" / "1-mntp").exists() and not (tmp_path / "out" / "checkpoint-1").exists()


def test_help_usage_errors_and_the_cache_listing_import_neither_torch_nor_transformers(tmp_path):
    """`lm2vec --help` or a bad recipe answers at once: the parser (its stages, recipes, poolings and precisions) and
    the commands' checks are light; torch and transformers load with a model."""
    code = f"""
import sys
from lm2vec.cli import main
refused = (["convert", "default", "--recipe", "turbo", "-o", {str(tmp_path)!r}],
           ["train", "simcse", "default", "-o", {str(tmp_path)!r}, "--set", "batch_size=0"],
           ["evaluate", "default", "--tasks", "stsbb", "-o", {str(tmp_path)!r}])
codes = [main(args) for args in (*refused, ["cache"])]
print(codes, [m for m in ("torch", "transformers", "peft", "sklearn") if m in sys.modules])
"""
    env = {**os.environ, "LM2VEC_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[2, 2, 2, 0] []", done.stdout
    assert "unknown recipe 'turbo'" in done.stderr and "batch_size must be a positive integer" in done.stderr
    assert "unknown task 'stsbb'; known tasks: stsb, stsb-dev" in done.stderr  # the registry, without its evaluators


def test_a_command_of_an_extra_not_installed_names_the_extra(tmp_path):
    (tmp_path / "uvicorn").mkdir()  # uvicorn as a machine without lm2vec[serve] has it: not at all
    (tmp_path / "uvicorn" / "__init__.py").write_text("raise ModuleNotFoundError('no uvicorn', name='uvicorn')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([CLI, "serve", "default"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "serve needs uvicorn: pip install 'lm2vec[serve]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_extra_that_installs_a_module_comes_from_the_package_metadata():
    from lm2vec.cli import extra_providing

    assert [extra_providing(m) for m in ("sklearn.metrics", "prometheus_client", "ray", "onnxruntime", "numpy")] == [
        "eval",
        "serve",
        "corpus",
        "onnx",
        None,  # a base dependency: not an extra's
    ]


def test_train_simcse_from_the_command_line(tiny_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(random_texts(20, seed=6, max_words=8)))
    out = tmp_path / "run"
    settings = ["steps=2", "batch_size=4", "save_steps=1", "logging_steps=1", "max_length=16", "bf16=false"]
    done = run("train", "simcse", tiny_dir, "-o", out, "--set", f"data={json.dumps([str(corpus)])}", *settings)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "encoder" / "modules.json").is_file() and (out / "checkpoint-2").is_dir()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["bf16_autocast"] == 0.0  # the precision chosen, recorded first
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    again = run("train", "simcse", tiny_dir, "-o", out, "--set", f"data={json.dumps([str(corpus)])}", *settings)
    assert again.returncode == 2 and "--resume" in again.stderr
    other = Path(shutil.copytree(tiny_dir, tmp_path / "other"))  # another model: its files differ
    (other / "config.json").write_text((other / "config.json").read_text().replace("{", '{"note": 1, ', 1))
    settings.append(f"data={json.dumps([str(corpus)])}")
    resumed = run("train", "simcse", other, "-o", out, "--resume", "--set", *settings)
    assert resumed.returncode == 2 and f"holds a run on another model ({tiny_dir})" in resumed.stderr, resumed.stderr


def test_cache_lists_each_kind_and_prunes_what_has_gone_unused(tiny_dir, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """`lm2vec cache` lists what loads leave (lowered weights, calibrations, ...) by kind; `--prune DAYS` removes
    what has not been used for that long (an older version's leftovers) and keeps the lowered weights a load has just
    read back, from which the model loads again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LM2VEC_CACHE", str(cache))
    expected = lm2vec.load(tiny_dir, dtype="int8").encode(random_texts(4, seed=3))
    (lowered,) = (cache / "lower").iterdir()
    (cache / "lower" / "int8-an-older-version.safetensors").write_bytes(b"x" * 1000)
    (cache / "gguf" / "an-older-conversion").mkdir(parents=True)
    (cache / "gguf" / "an-older-conversion" / "model.safetensors").write_bytes(b"x" * 1000)
    month_ago = time.time() - 40 * 86400
    for path in [cache, *cache.rglob("*")]:
        os.utime(path, (month_ago, month_ago))
    lm2vec.load(tiny_dir, dtype="int8")  # reads the lowered weights back: used now

    listed = run("cache")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^lower\s+2\s", listed.stdout, re.M) and re.search(r"^gguf\s+1\s", listed.stdout, re.M)
    assert re.search(r"^calibration\s+[1-9]", listed.stdout, re.M)
    dry = run("cache", "--prune", 30, "--dry-run")
    assert "would remove" in dry.stdout and "an-older-conversion" in dry.stdout
    assert (cache / "gguf" / "an-older-conversion").is_dir()  # a dry run removes nothing

    pruned = run("cache", "--prune", 30)
    assert pruned.returncode == 0, pruned.stderr
    assert "removed" in pruned.stdout and str(lowered) not in pruned.stdout
    assert lowered.is_file() and not (cache / "gguf" / "an-older-conversion").exists()
    assert not (cache / "lower" / "int8-an-older-version.safetensors").exists()
    np.testing.assert_array_equal(lm2vec.load(tiny_dir, dtype="int8").encode(random_texts(4, seed=3)), expected)
    assert run("cache", "--prune", 0).returncode == 0 and not [p for p in cache.rglob("*") if p.is_file()]
