"""Seconds per training step of the built-in model on this machine, per stage and setting.

Times a few real steps (after one warm-up step) through the same Trainer code the recipes use, so the
`cpu` recipe can be sized to its time budget. Prints the CPU it ran on. ``--paired N`` instead times an exact
switch (the same bits either way) on one fixed SimCSE-sized batch, on and off in alternate rounds, so the host's
drift cancels out: peft's cast of bf16 adapter inputs to float32, which bf16 stages switch off.

    python benchmarks/train_speed.py [--steps 3] [--only simcse] [--paired 40]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

import lm2vec
from lm2vec.hardware import describe_machine
from lm2vec.training import MNTPConfig, SimCSEConfig, SupervisedConfig, train_mntp, train_simcse, train_supervised
from lm2vec.training.stage import TRAINING_DTYPE, embed, embedding_stage

SETTINGS = {
    "simcse": [
        dict(batch_size=32, max_length=32, bf16=False),
        dict(batch_size=32, max_length=32, bf16=True),
        dict(batch_size=32, max_length=32, bf16=False, lora_layers=10),
        dict(batch_size=32, max_length=32, bf16=False, lora_layers=5),
    ],
    "supervised": [  # the cpu recipe's passes: 16 rows each
        dict(batch_size=32, max_length=48, mini_batch_size=16, bf16=True),
        dict(batch_size=32, max_length=48, mini_batch_size=16, bf16=False),
    ],
    "mntp": [dict(batch_size=4, max_length=256, bf16=True), dict(batch_size=4, max_length=256, bf16=False)],
}
CONFIGS = {"simcse": SimCSEConfig, "supervised": SupervisedConfig, "mntp": MNTPConfig}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def paired_casting(rounds: int, rows: int = 64, length: int = 32) -> None:
    """Forward and backward of ``rows`` texts of ``length`` tokens (SimCSE's batch, both views: 64 of 32) under bf16
    autocast, peft's input casting on in even rounds and off in odd ones; the mean paired difference and its
    standard error."""
    encoder = lm2vec.load(dtype=TRAINING_DTYPE)
    model = embedding_stage(encoder, SimCSEConfig(bf16=True, lora_dropout=0.0, max_length=length), 0.1).train()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    words = " ".join(f"w{i}" for i in range(length))  # at least `length` tokens: every row full
    batch = vars(encoder.with_model(encoder.model, max_length=length).tokenization([""] * rows, [words] * rows))
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(rounds + 2):
        casting = round_ % 2 == 0
        for layer in layers:
            layer.cast_input_dtype_enabled = casting
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            vectors = embed(model, batch, None)
        vectors.float().square().sum().backward()
        model.zero_grad()
        if round_ >= 2:  # the first two warm up
            times[casting].append(time.perf_counter() - start)
    differences = [on - off for on, off in zip(times[True], times[False], strict=False)]
    tokens = rows * length
    print(
        json.dumps(
            {
                "batch": f"{rows} x {length} tokens, forward + backward, bf16 autocast",
                "casting_s": round(statistics.mean(times[True]), 3),
                "no_casting_s": round(statistics.mean(times[False]), 3),
                "paired_difference_s": round(statistics.mean(differences), 3),
                "standard_error_s": round(statistics.stdev(differences) / len(differences) ** 0.5, 3),
                "tokens_per_s": [round(tokens / statistics.mean(times[k])) for k in (True, False)],
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=list(SETTINGS), default=None)
    parser.add_argument("--paired", type=int, default=0, metavar="N", help="time peft's input casting, N rounds")
    parser.add_argument("--rows", type=int, default=64, help="--paired's batch: rows of 32 tokens (SimCSE's: 64)")
    args = parser.parse_args()
    if 0 < args.paired < 4:
        parser.error("--paired needs at least 4 rounds (2 pairs, for a standard error)")
    print(f"Machine: {describe_machine()}")
    if args.paired:
        paired_casting(args.paired, args.rows)
        return
    for stage, settings in SETTINGS.items():
        if args.only and stage != args.only:
            continue
        for setting in settings:
            timer = StepTimer()
            config = CONFIGS[stage](steps=args.steps + 1, save_steps=1000, logging_steps=1000, **setting)
            with tempfile.TemporaryDirectory() as out:
                if stage == "mntp":
                    train_mntp(None, config, Path(out), callbacks=[timer])
                else:
                    train = train_simcse if stage == "simcse" else train_supervised
                    train(lm2vec.load(dtype=TRAINING_DTYPE), config, Path(out), callbacks=[timer])
            steady = timer.times[1:]
            print(
                json.dumps(
                    {
                        "stage": stage,
                        **setting,
                        "seconds_per_step": round(sum(steady) / len(steady), 2),
                        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
