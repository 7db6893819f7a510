"""``benchmarks/gpu_encode.py`` on the CPU at a tiny size: the first GPU a session is lent (minutes of device time)
should not be where it is found broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LM2VEC_DATA", ROOT.parent / "shared" / "data"))


def test_gpu_encode_runs_its_code_paths_on_a_cpu():
    needed = [DATA / "sts" / "stsb" / "test.jsonl", DATA / "corpus" / "wiki1m_10k.txt"]
    if not all(path.is_file() for path in needed):
        pytest.skip(f"shared data not found at {DATA} (set LM2VEC_DATA)")
    script = ROOT / "benchmarks" / "gpu_encode.py"
    command = [sys.executable, str(script), "--device", "cpu", "--count", "32", "--wiki", "64", "--batch-sizes", "16"]
    run = subprocess.run([*command, "--data", str(DATA)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split()[0] for line in run.stdout.splitlines() if line.split()[:2] in (["stsb", "16"], ["wiki", "16"])}
    assert rows == {"stsb", "wiki"}, run.stdout
    cosine = next(line for line in run.stdout.splitlines() if "cosine to CPU float32" in line)
    assert float(cosine.split("min ")[1].split(",")[0]) >= 0.99, cosine
