"""Stage 3 (optional), supervised contrastive learning on (query, positive, hard negative) triplets.

Queries carry their dataset's instruction (attended to, not pooled); each batch comes from one dataset;
every query scores its positive against all positives and hard negatives of the batch (and of the other
devices). ``mini_batch_size`` runs each side in passes of that many rows sorted by length, so each pass
pads only to its own longest row; with ``grad_cache`` the loss is cached (GradCache, Gao et al. 2021):
embeddings are first computed without a graph, the loss's gradient with respect to them is taken, then
each pass is run again with a graph and back-propagated, so the contrastive batch is not bounded by memory.
"""

from __future__ import annotations

import contextlib
import os
import random

import torch

from ..encoder import Encoder
from ..inputs import Tokenization
from . import data
from .config import SupervisedConfig
from .data import Triplet
from .losses import info_nce
from .models import embed, length_chunks
from .simcse import embedding_stage, merged
from .stage import as_encoder, dev_pairs, finish, resume_point
from .trainer import StageTrainer, check_finite, training_arguments

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
        documents = self.tokenization([""] * 2 * len(rows), [t.positive for t in rows] + [t.negative for t in rows])
        out = {}
        for side, batch in zip(SIDES, (queries, documents), strict=True):
            out |= {f"{side}_{k}": getattr(batch, k) for k in ("input_ids", "attention_mask", "pool_mask")}
        return out


def side(inputs: dict[str, torch.Tensor], name: str, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    return {key.removeprefix(f"{name}_"): value[rows] for key, value in inputs.items() if key.startswith(f"{name}_")}


class RandomState:
    """The RNG state of a forward pass, so that GradCache's second pass draws the same dropout masks."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if self.cuda else []):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class SupervisedTrainer(StageTrainer):
    def __init__(
        self, *args, scale: float, gather_across_devices: bool, mini_batch_size: int | None, grad_cache: bool, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.scale, self.gather = scale, gather_across_devices
        self.mini_batch_size, self.grad_cache = mini_batch_size, grad_cache

    def stage_loss(self, model, inputs):
        queries, documents = (embed(model, side(inputs, name), self.mini_batch_size) for name in SIDES)
        return info_nce(queries, documents, self.scale, self.gather)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if not self.grad_cache:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        self.tokens_seen += int(sum(v.sum() for k, v in inputs.items() if k.endswith("attention_mask")))
        chunks = {name: length_chunks(side(inputs, name), self.mini_batch_size) for name in SIDES}
        passes = [(name, part) for name in SIDES for _, part in chunks[name]]
        states, cached = [], []
        with torch.no_grad():  # pass 1: embeddings without a graph
            for _, part in passes:
                states.append(RandomState())
                cached.append(model(**part).detach().requires_grad_())
        count = len(chunks[SIDES[0]])
        queries, documents = (
            torch.cat(vectors)[torch.argsort(torch.cat([index for index, _ in chunks[name]]))]
            for name, vectors in zip(SIDES, (cached[:count], cached[count:]), strict=True)
        )
        loss = info_nce(queries, documents, self.scale, self.gather)
        check_finite(loss, self.state.global_step + 1, self.args.output_dir)
        loss.backward()  # gradients with respect to the cached embeddings only
        for i, ((_, part), state) in enumerate(zip(passes, states, strict=True)):  # pass 2: one graph at a time
            sync = contextlib.nullcontext() if i == len(passes) - 1 else self.accelerator.no_sync(model)
            with sync, state.restored():
                self.accelerator.backward((model(**part).float() * cached[i].grad).sum())
        return loss.detach()


def train_supervised(
    model: Encoder | str | os.PathLike | None,
    config: SupervisedConfig,
    output_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: list | None = None,
) -> Encoder:
    """Train on triplets; return the encoder with the adapter merged and the instructions as prompts."""
    batches = dataset_batches(data.triplets(config.data, data_root), config.batch_size, config.seed)
    encoder = as_encoder(model)
    stage_model, view = embedding_stage(encoder, config)
    trainer = SupervisedTrainer(
        model=stage_model,
        args=training_arguments(config, output_dir, batch_size=1),
        train_dataset=batches,
        data_collator=TripletCollator(
            Tokenization(encoder.tokenizer, config.max_length), config.instructions, config.default_instruction
        ),
        eval_dataset=dev_pairs(config, data_root),
        encoder=view,
        callbacks=callbacks,
        scale=config.scale,
        gather_across_devices=config.gather_across_devices,
        mini_batch_size=config.mini_batch_size,
        grad_cache=config.grad_cache,
    )
    trainer.train(resume_from_checkpoint=resume_point(output_dir, resume))
    dropout = getattr(encoder.model.config.get_text_config(), "attention_dropout", 0.0) or 0.0
    result = merged(encoder, stage_model, dropout)
    if config.default_instruction:  # the instruction queries were trained with becomes the "query" prompt
        result.prompts = {"query": config.default_instruction} | result.prompts
    return finish(result, output_dir, trainer)
