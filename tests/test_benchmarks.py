"""The benchmarks at a tiny size: ``gpu_encode.py`` on the CPU (the first GPU a session is lent, for minutes of
device time, should not be where it is found broken) and ``vs_reference.py`` without the reference (its own venv)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lm2vec.datafiles import data_dir
from lm2vec.loading.source import builtin_gguf_path
from tests.support import needs_data

ROOT = Path(__file__).resolve().parents[1]


def benchmark(name: str, *args: str) -> str:
    """Run ``benchmarks/<name>`` on the shared data; its standard output."""
    command = [sys.executable, str(ROOT / "benchmarks" / name), *args, "--data", str(data_dir())]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@needs_data("sts/stsb/test.jsonl", "corpus/wiki1m_10k.txt")
def test_gpu_encode_runs_its_code_paths_on_a_cpu():
    gguf = str(builtin_gguf_path())  # as a GPU session passes the file it carried over (--model)
    args = ("--device", "cpu", "--count", "32", "--wiki", "64", "--batch-sizes", "16", "--model", gguf)
    out = benchmark("gpu_encode.py", *args)
    rows = {line.split()[0] for line in out.splitlines() if line.split()[:2] in (["stsb", "16"], ["wiki", "16"])}
    assert rows == {"stsb", "wiki"}, out
    cosine = next(line for line in out.splitlines() if "cosine to CPU float32" in line)
    assert float(cosine.split("min ")[1].split(",")[0]) >= 0.99, cosine


@needs_data("sts/stsb/test.jsonl")
def test_vs_reference_measures_each_mode(tmp_path: Path):
    figures = tmp_path / "figures.json"
    benchmark("vs_reference.py", "--count", "8", "--repeats", "1", "--modes", "fp32,default", "--json", str(figures))
    result = json.loads(figures.read_text())
    assert result["cpu"]["model"] and set(result["modes"]) == {"fp32", "default"} and result["tokens"] > 8
    default = result["modes"]["default"]
    assert default["sentences_per_s"] > 0 and 0 < default["fraction_of_peak"] and default["peak_rss_mb"] > 0
    assert default["cosine_to_anchor_min"] >= 0.99
