"""Stage 2, unsupervised SimCSE: each sentence passes twice with dropout; the two views are positives,
every other sentence in the batch (and on the other devices) a negative. Padding is never pooled.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import TrainerCallback

from ..encoder import Encoder
from ..inputs import Tokenization
from . import data
from .config import SimCSEConfig
from .losses import info_nce, matryoshka
from .stage import Source, embed, save_stage_encoder, train_embeddings
from .trainer import StageTrainer


class SentenceCollator:
    """Sentences -> one padded batch (input ids, attention mask, pool mask), tokenized in one call."""

    def __init__(self, tokenization: Tokenization):
        self.tokenization = tokenization

    def __call__(self, rows: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenization([""] * len(rows), rows)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pool_mask": batch.pool_mask}


class SimCSETrainer(StageTrainer):
    config: SimCSEConfig

    def stage_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        twice = {key: torch.cat([value, value]) for key, value in inputs.items()}  # two dropout views, one pass
        first, second = embed(model, twice, self.config.mini_batch_size).chunk(2)
        loss = matryoshka(info_nce, self.config.matryoshka_dims)
        return loss(first, second, self.config.scale, self.config.gather_across_devices)


def train_simcse(
    model: Source,
    config: SimCSEConfig,
    output_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> Encoder:
    """Train SimCSE on an encoder (or a source to load); return the encoder with the adapter merged."""
    sentences = data.sentences(config.data, data_root)  # bad data fails before the model loads
    encoder, trainer = train_embeddings(
        SimCSETrainer,
        model,
        config,
        output_dir,
        sentences,
        SentenceCollator,
        data_root=data_root,
        resume=resume,
        callbacks=callbacks,
        dropout=config.attention_dropout,
    )
    return save_stage_encoder(encoder, output_dir, trainer)
