"""What every stage does around its Trainer: where to resume from, and how the result is saved."""

from __future__ import annotations

import os
from pathlib import Path

from ..cache import atomic_write
from ..encoder import Encoder
from ..evaluation.sts import STSPairs, load_sts
from ..loading import load
from .config import StageConfig
from .trainer import COMPLETE, StageTrainer, last_checkpoint

ENCODER_DIR = "encoder"


def resume_point(output_dir: str | os.PathLike, resume: bool) -> str | None:
    """The newest complete checkpoint when resuming; refuse to silently mix a new run into an old one."""
    last = last_checkpoint(output_dir)
    if resume:
        return str(last) if last else None
    if last:
        raise FileExistsError(
            f"{output_dir} already holds checkpoints ({last.name}); pass resume=True (--resume) "
            "to continue that run, or choose another output directory"
        )
    return None


def finish(encoder: Encoder, output_dir: str | os.PathLike, trainer: StageTrainer) -> Encoder:
    """Save the stage's encoder (adapter merged) under ``output_dir/encoder``, committed by a marker."""
    if trainer.args.should_save:
        path = encoder.save(Path(output_dir) / ENCODER_DIR)
        atomic_write(path / COMPLETE, '{"stage": "done"}')
    encoder.model.eval()
    return encoder


def finished(output_dir: str | os.PathLike) -> Encoder | None:
    """The encoder a completed stage saved, or None."""
    path = Path(output_dir) / ENCODER_DIR
    return load(path) if (path / COMPLETE).is_file() else None


def dev_pairs(config: StageConfig, data_root: str | os.PathLike | None) -> STSPairs | None:
    """The STS-B dev pairs scored during training (the first ``eval_pairs``), or None without evaluation."""
    return load_sts("stsb", "dev", data_root, config.eval_pairs) if config.eval_steps else None


def as_encoder(model: Encoder | str | os.PathLike | None) -> Encoder:
    return model if isinstance(model, Encoder) else load(model)
