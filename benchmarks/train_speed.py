"""Seconds per training step of the built-in model on this machine, per stage and setting.

Times a few real steps (after one warm-up step) through the same Trainer code the recipes use, so the
`cpu` recipe can be sized to its time budget. Prints the CPU it ran on.

    python benchmarks/train_speed.py [--steps 3] [--only simcse]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

import lm2vec
from lm2vec.hardware import describe_machine
from lm2vec.training import MNTPConfig, SimCSEConfig, SupervisedConfig, train_mntp, train_simcse, train_supervised
from lm2vec.training.stage import TRAINING_DTYPE

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=list(SETTINGS), default=None)
    args = parser.parse_args()
    print(f"Machine: {describe_machine()}")
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
