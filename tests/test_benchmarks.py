"""The benchmarks at a tiny size: ``gpu_encode.py`` and ``gpu_convert.sh`` on the CPU (the first GPU a session is
lent, for minutes of device time, should not be where they are found broken) and ``vs_reference.py`` without the
reference (its own venv)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lm2vec.datafiles import data_dir
from lm2vec.loading.source import builtin_gguf_path
from lm2vec.training.config import load_recipe
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


def device_kit(folder: Path, parts: int = 3) -> Path:
    """What ``make device-kit`` packs, for ``gpu_convert.sh``: the built-in GGUF in parts, its SHA-256, the data."""
    blob = builtin_gguf_path().read_bytes()
    folder.mkdir()
    size = -(-len(blob) // parts)
    for i in range(parts):
        (folder / f"gguf.part.a{'abcdefgh'[i]}").write_bytes(blob[i * size : (i + 1) * size])
    (folder / "gguf.sha256").write_text(hashlib.sha256(blob).hexdigest() + "\n")
    (folder / "data").symlink_to(data_dir())
    return folder


def gpu_convert(kit: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DEVICE_KIT": str(kit),
        "KIT": str(tmp_path / "kit"),
        "OUT": str(tmp_path / "out"),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    command = ["bash", str(ROOT / "benchmarks" / "gpu_convert.sh"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


@needs_data(*sorted({file for _, stage in load_recipe("small").stages for file in stage.data}))
def test_gpu_convert_joins_the_parts_trains_and_returns_the_results_on_a_cpu(tmp_path: Path):
    recipe = load_recipe("small").to_dict()  # the GPU recipe's stages and data, a step each
    for stage in recipe["stages"]:
        stage.update(steps=1, batch_size=2, max_length=16, save_steps=1, eval_steps=None)
    (tmp_path / "tiny-small.json").write_text(json.dumps(recipe))
    kit = device_kit(tmp_path / "device")
    done = gpu_convert(kit, tmp_path, str(tmp_path / "tiny-small.json"), "300", "--no-eval")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [row["model"] for row in rows] == [
        "bidirectional + mntp",
        "bidirectional + mntp + simcse",
        "bidirectional + mntp + simcse + supervised",
    ]
    assert {p.name for p in (tmp_path / "out").glob("*.jsonl")} == {
        f"tiny-small-{i}-{stage}.jsonl" for i, stage in enumerate(("mntp", "simcse", "supervised"), start=1)
    }
    (kit / "gguf.part.ab").write_bytes(b"not the part")  # a part carried wrong: refused before anything loads
    shutil.rmtree(tmp_path / "kit")
    done = gpu_convert(kit, tmp_path, str(tmp_path / "tiny-small.json"), "300", "--no-eval")
    assert done.returncode == 1 and "does not match gguf.sha256" in done.stderr, done.stderr[-3000:]


@needs_data("sts/stsb/test.jsonl")
def test_vs_reference_measures_each_mode(tmp_path: Path):
    figures = tmp_path / "figures.json"
    benchmark("vs_reference.py", "--count", "8", "--repeats", "1", "--modes", "fp32,default", "--json", str(figures))
    result = json.loads(figures.read_text())
    assert result["cpu"]["model"] and set(result["modes"]) == {"fp32", "default"} and result["tokens"] > 8
    default = result["modes"]["default"]
    assert default["sentences_per_s"] > 0 and 0 < default["fraction_of_peak"] and default["peak_rss_mb"] > 0
    assert default["cosine_to_anchor_min"] >= 0.99


def test_train_speed_times_peft_input_casting_in_paired_rounds():
    command = [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--paired", "4", "--rows", "4"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    machine, line = run.stdout.splitlines()[:2]
    assert machine.startswith("Machine: ")
    timing = json.loads(line)
    assert timing["casting_s"] > 0 and timing["no_casting_s"] > 0 and len(timing["tokens_per_s"]) == 2
