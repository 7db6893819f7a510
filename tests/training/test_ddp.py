"""SimCSE under ``torchrun --nproc_per_node 2`` (gloo, CPU): the loss sees every rank's candidates, and
gradients flow back through the all-gather to the rank that computed them; GradCache keeps the ranks in step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests.* import from here
SCRIPT = "tests.training.ddp_simcse"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cross_device_negatives_under_torchrun(tmp_path: Path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "-m", SCRIPT, str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(ranks):
        assert report["world_size"] == 2 and report["trainer_world_size"] == 2
        assert report["parallel_mode"].endswith("DISTRIBUTED")
        assert report["scores_shape"] == [4, 8]  # 4 queries against both ranks' 4 candidates: 2x the batch
        assert report["labels"] == [rank * 4 + i for i in range(4)]  # positives sit in this rank's block
    assert ranks[1]["candidate_grad_norm"] > 0  # rank 0's loss reached rank 1's candidates
    assert abs(ranks[0]["weight_sum"] - ranks[1]["weight_sum"]) < 1e-6  # gradients were synchronised
    for run in ("grad_cache_True_0", "grad_cache_True_3"):  # with GradCache too, replayed or kept graphs
        assert abs(ranks[0][f"{run}_weight_sum"] - ranks[1][f"{run}_weight_sum"]) < 1e-6
        assert all(report[f"{run}_vs_passes"] < 1e-4 for report in ranks)  # and the gradients of the passes
    assert (tmp_path / "train" / "encoder" / "modules.json").is_file()
    assert (tmp_path / "train" / "checkpoint-3" / "adapter_model.safetensors").is_file()
