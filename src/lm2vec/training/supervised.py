"""Stage 3 (optional), supervised contrastive learning on (query, positive, hard negative) triplets, or on
(query, positive) pairs with in-batch negatives only.

Queries carry their dataset's instruction (attended to, pooled only where the encoder includes the prompt); each
batch comes from one dataset; every query scores its positive against all positives and hard negatives of the batch
(and of the other devices). ``mini_batch_size`` runs each side in passes of that many rows sorted by length, so
each pass pads only to its own longest row; with ``grad_cache`` the loss is cached (:mod:`.losses.cached_info_nce`),
so the contrastive batch is not bounded by activation memory.
"""

from __future__ import annotations

import os
import random
from functools import partial

import torch
from torch import nn
from transformers import TrainerCallback

from ..encoder import Encoder
from ..inputs import Tokenization
from . import data
from .config import SupervisedConfig
from .data import Triplet
from .losses import cached_info_nce, info_nce, matryoshka
from .stage import Source, embed, save_stage_encoder, train_embeddings
from .trainer import StageTrainer

SIDES = ("query", "document")


def dataset_batches(triplets: list[Triplet], batch_size: int, seed: int) -> list[list[Triplet]]:
    """Shuffled batches, each drawn from one dataset (incomplete remainders dropped), in shuffled order."""
    rng = random.Random(seed)
    by_dataset: dict[str, list[Triplet]] = {}
    for t in triplets:
        by_dataset.setdefault(t.dataset, []).append(t)
    batches = []
    for rows in by_dataset.values():
        rows = rows[:]
        rng.shuffle(rows)
        batches += [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"no dataset has a full batch of {batch_size} triplets; lower batch_size")
    rng.shuffle(batches)
    return batches


class TripletCollator:
    """One pre-made batch -> queries (with their dataset's instruction) and documents (positives, negatives)."""

    def __init__(self, tokenization: Tokenization, instructions: dict[str, str], default: str):
        self.tokenization, self.instructions, self.default = tokenization, instructions, default

    def __call__(self, items: list[list[Triplet]]) -> dict[str, torch.Tensor]:
        rows = [t for batch in items for t in batch]
        instruction = [self.instructions.get(t.dataset, self.default) for t in rows]
        queries = self.tokenization(instruction, [t.query for t in rows])
        negatives = [t.negative for t in rows if t.negative is not None]  # a batch is one dataset: all or none
        documents = self.tokenization([""] * (len(rows) + len(negatives)), [t.positive for t in rows] + negatives)
        out: dict[str, torch.Tensor] = {}
        for side, batch in zip(SIDES, (queries, documents), strict=True):
            out |= {f"{side}_{k}": getattr(batch, k) for k in ("input_ids", "attention_mask", "pool_mask")}
        return out


def side(inputs: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """One side's tensors of a collated batch, without the side's prefix."""
    return {key.removeprefix(f"{name}_"): value for key, value in inputs.items() if key.startswith(f"{name}_")}


class SupervisedTrainer(StageTrainer):
    config: SupervisedConfig

    def stage_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        queries, documents = (side(inputs, name) for name in SIDES)
        loss = matryoshka(info_nce, config.matryoshka_dims)
        if config.grad_cache and config.mini_batch_size:
            return cached_info_nce(
                model,
                queries,
                documents,
                scale=config.scale,
                mini_batch_size=config.mini_batch_size,
                gather_across_devices=config.gather_across_devices,
                loss_function=loss,
                kept_graphs=config.kept_graphs,
            )
        query_vectors = embed(model, queries, config.mini_batch_size)
        document_vectors = embed(model, documents, config.mini_batch_size)
        return loss(query_vectors, document_vectors, config.scale, config.gather_across_devices)


def train_supervised(
    model: Source,
    config: SupervisedConfig,
    output_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> Encoder:
    """Train on triplets; return the encoder with the adapter merged and the instructions as prompts."""
    batches = dataset_batches(data.triplets(config.data, data_root), config.batch_size, config.seed)
    encoder, trainer = train_embeddings(
        SupervisedTrainer,
        model,
        config,
        output_dir,
        batches,
        partial(TripletCollator, instructions=config.instructions, default=config.default_instruction),
        data_root=data_root,
        resume=resume,
        callbacks=callbacks,
        batch_size=1,  # the dataset's items are pre-made batches
    )
    if config.default_instruction:  # the instruction queries were trained with becomes the "query" prompt
        encoder.prompts = {"query": config.default_instruction} | encoder.prompts
    return save_stage_encoder(encoder, output_dir, trainer)
