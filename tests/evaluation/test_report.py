"""Results files: JSON round trip, Markdown table, PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm2vec.evaluation.base import TaskResult
from lm2vec.evaluation.report import load_results, markdown_table, write_report


def result(task: str, score: float, metric: str = "spearman") -> TaskResult:
    return TaskResult(task, "sts", metric, {metric: score, "other": 1.0}, {"pairs": 3}, 0.5)


RUNS = {
    "causal": [result("stsb", 43.1), result("scifact", 20.0, "ndcg_at_10")],
    "bidirectional": [result("stsb", 16.9), result("scifact", 10.0, "ndcg_at_10"), result("extra", 5.0)],
}


def test_write_report(tmp_path: Path):
    paths = write_report(tmp_path / "out", RUNS, meta={"model": "x"})
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_results(paths["json"])
    assert loaded == RUNS
    assert json.loads(paths["json"].read_text())["runs"]["causal"][0]["main_score"] == 43.1
    table = paths["markdown"].read_text()
    assert "| stsb | spearman | 43.1 | 16.9 |" in table
    assert "| extra | spearman |  | 5.0 |" in table
    assert "**average** (2 tasks) | | **31.6** | **13.4** |" in table


def test_single_task_has_no_average():
    assert "average" not in markdown_table({"a": [result("stsb", 1.0)]})


def test_bad_results_file(tmp_path: Path):
    (tmp_path / "r.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="not an lm2vec results file"):
        load_results(tmp_path / "r.json")
