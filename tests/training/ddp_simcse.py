"""Run by tests/training/test_ddp.py as ``-m tests.training.ddp_simcse`` under ``torchrun --nproc_per_node 2``
(gloo, CPU): cross-device negatives, and the GradCache loss's passes under DDP.

Each rank writes what it saw to ``OUT/rank-N.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from lm2vec.training import SimCSEConfig, SupervisedConfig, train_simcse, train_supervised
from lm2vec.training.losses import info_nce, similarities
from tests.support import random_texts, tiny_encoder, write_jsonl

BATCH = 4


class Seen(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        self.report = {"trainer_world_size": args.world_size, "parallel_mode": str(args.parallel_mode)}


def main(out: Path, corpus: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    queries = torch.randn(BATCH, 16, requires_grad=True)
    candidates = torch.randn(BATCH, 16, requires_grad=True)
    scores, labels = similarities(queries, candidates, scale=20.0)
    # Only rank 0's loss counts: rank 1's candidates get gradients only through the all-gather.
    loss = info_nce(queries, candidates, scale=20.0) * (1.0 if rank == 0 else 0.0)
    loss.backward()
    report = {
        "scores_shape": list(scores.shape),
        "labels": labels.tolist(),
        "candidate_grad_norm": candidates.grad.norm().item(),
    }
    dist.barrier()
    # The real thing: a SimCSE stage under the Trainer, DDP over gloo, in the same process group.
    config = SimCSEConfig(data=[str(corpus)], steps=3, batch_size=BATCH, save_steps=3, logging_steps=1, bf16=False)
    seen = Seen()
    encoder = train_simcse(tiny_encoder(), config, out / "train", callbacks=[seen])
    report |= seen.report
    # DDP keeps the ranks' weights equal although each rank saw other sentences
    report["weight_sum"] = sum(p.double().sum().item() for p in encoder.model.parameters())
    # GradCache under DDP: every pass but the last skips the all-reduce; the ranks must still agree, and the
    # weights must be those of the same passes run with a graph (same dropout masks, gradients summed); also with
    # passes whose graphs are kept from the first forward
    trained = {}
    for grad_cache, kept_graphs in ((True, 0), (False, 0), (True, 3)):  # 6 passes a step, 3 of them kept
        config = SupervisedConfig(
            data=[str(out / "nli" / "train.jsonl")],
            steps=2,
            batch_size=BATCH,
            learning_rate=1e-3,
            save_steps=2,
            bf16=False,
            mini_batch_size=2,
            grad_cache=grad_cache,
            kept_graphs=kept_graphs,
        )
        run = f"grad_cache_{grad_cache}_{kept_graphs}"
        trained[run] = train_supervised(tiny_encoder(), config, out / run).model
    for run in ("grad_cache_True_0", "grad_cache_True_3"):
        report[f"{run}_weight_sum"] = sum(p.double().sum().item() for p in trained[run].parameters())
        pairs = zip(trained[run].parameters(), trained["grad_cache_False_0"].parameters(), strict=True)
        report[f"{run}_vs_passes"] = max((a - b).abs().max().item() for a, b in pairs)
    report["world_size"] = int(os.environ["WORLD_SIZE"])
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    corpus = out / "corpus.txt"
    if int(os.environ["RANK"]) == 0:
        texts = random_texts(40, seed=6, max_words=8)
        rows = [{"query": t, "positive": t + " w5", "negative": texts[(i + 7) % 40]} for i, t in enumerate(texts)]
        write_jsonl(out / "nli" / "train.jsonl", rows)
        corpus.write_text("\n".join(random_texts(40, seed=5, max_words=8)))  # written last: the other rank waits on it
    else:
        import time

        while not corpus.exists():
            time.sleep(0.05)
    main(out, corpus)
