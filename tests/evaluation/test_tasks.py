"""The task registry, the runner and ``lm2vec evaluate`` end to end on the shared data with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm2vec import Encoder
from lm2vec.datafiles import data_dir, read_jsonl
from lm2vec.evaluation.base import Instructions
from lm2vec.evaluation.report import load_results
from lm2vec.evaluation.tasks import DEFAULT_TASKS, TASKS, get_task, load_instructions, run_tasks
from tests.support import needs_data, word_encoder
from tests.support import run_cli as run

needs_shared = needs_data("sts/stsb/test.jsonl", "sts/stsb/dev.jsonl", "pair_classification/snli/test.jsonl")


def data_encoder() -> Encoder:
    """A tiny random model whose vocabulary covers STS-B and SNLI, so texts get distinct vectors."""
    rows = read_jsonl(data_dir() / "sts" / "stsb" / "test.jsonl") + read_jsonl(
        data_dir() / "sts" / "stsb" / "dev.jsonl"
    )
    rows += read_jsonl(data_dir() / "pair_classification" / "snli" / "test.jsonl")
    return word_encoder([r[k] for r in rows for k in ("sentence1", "sentence2")])


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="known tasks: stsb, stsb-dev, scifact"):
        get_task("stsbb")


def test_packaged_instructions_cover_the_sentence_tasks():
    instructions = load_instructions()
    assert {t for t in DEFAULT_TASKS if TASKS[t].type != "word_probing"} <= set(instructions)
    assert instructions["scifact"].document is None and instructions["scifact"].query.endswith(": ")
    assert instructions["stsb"].query == instructions["stsb"].document  # symmetric


def test_instructions_file_errors(tmp_path: Path):
    (tmp_path / "i.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_instructions(tmp_path / "i.json")


@needs_shared
def test_run_tasks_uses_the_cache(tmp_path: Path):
    encoder = data_encoder()
    first = run_tasks(encoder, ["stsb-dev", "snli"], cache_dir=tmp_path, show_progress_bar=False)
    assert [r.task for r in first] == ["stsb-dev", "snli"] and [r.type for r in first] == ["sts", "pair_classification"]
    calls = []
    original = encoder.encode
    encoder.encode = lambda *a, **k: calls.append(a) or original(*a, **k)
    again = run_tasks(encoder, ["stsb-dev", "snli"], cache_dir=tmp_path, show_progress_bar=False)
    assert calls == []  # everything came from the cache
    assert [r.scores for r in again] == [r.scores for r in first]
    no_instructions = run_tasks(encoder, ["stsb-dev"], cache_dir=tmp_path, instructions={}, show_progress_bar=False)
    assert len(calls) > 0 and no_instructions[0].scores != first[0].scores
    custom = {"stsb": Instructions.symmetric("w9 ")}
    assert run_tasks(encoder, ["stsb-dev"], instructions=custom, show_progress_bar=False)[0].scores != first[0].scores


@needs_shared
def test_cli_evaluate_writes_the_report_and_compares(tmp_path: Path):
    tiny_dir = data_encoder().save(tmp_path / "tiny")
    out = tmp_path / "report"
    done = run("evaluate", tiny_dir, "--tasks", "stsb", "snli", "-o", out, "--cache", tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    runs = load_results(out / "results.json")
    assert list(runs) == ["tiny"] and [r.task for r in runs["tiny"]] == ["stsb", "snli"]
    assert (out / "results.png").stat().st_size > 1000
    again = run(
        "evaluate", tiny_dir, "--tasks", "stsb", "--causal", "-o", tmp_path / "r2", "--compare", out / "results.json"
    )
    assert again.returncode == 0, again.stderr
    table = (tmp_path / "r2" / "results.md").read_text()
    assert "| task | metric | tiny | tiny (causal) |" in table
    assert json.loads((tmp_path / "r2" / "results.json").read_text())["meta"]["tasks"] == ["stsb"]


def test_cli_unknown_task_and_a_report_folder_that_cannot_be_made_fail_before_scoring(tiny_dir: Path, tmp_path: Path):
    done = run("evaluate", tiny_dir, "--tasks", "nope")
    assert done.returncode == 2 and "known tasks: stsb" in done.stderr
    (tmp_path / "a-file").write_text("")
    done = run("evaluate", tiny_dir, "--tasks", "stsb", "-o", tmp_path / "a-file" / "report")
    assert done.returncode == 2 and "a-file" in done.stderr and "stsb" not in done.stdout  # no task was scored
