"""Stage 2, unsupervised SimCSE: each sentence passes twice with dropout; the two views are positives,
every other sentence in the batch (and on the other devices) a negative. Padding is never pooled.
"""

from __future__ import annotations

import os

import torch

from ..encoder import Encoder
from ..inputs import Tokenization
from . import data
from .config import SimCSEConfig
from .losses import info_nce
from .models import EmbeddingModel, add_lora, embed, set_attention_dropout
from .stage import as_encoder, dev_pairs, finish, resume_point
from .trainer import StageTrainer, training_arguments


class SentenceCollator:
    """Sentences -> one padded batch (input ids, attention mask, pool mask), tokenized in one call."""

    def __init__(self, tokenization: Tokenization):
        self.tokenization = tokenization

    def __call__(self, rows: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenization([""] * len(rows), rows)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pool_mask": batch.pool_mask}


class SimCSETrainer(StageTrainer):
    def __init__(self, *args, scale: float, gather_across_devices: bool, mini_batch_size: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale, self.gather, self.mini_batch_size = scale, gather_across_devices, mini_batch_size

    def stage_loss(self, model, inputs):
        twice = {key: torch.cat([value, value]) for key, value in inputs.items()}  # two dropout views, one pass
        first, second = embed(model, twice, self.mini_batch_size).chunk(2)
        return info_nce(first, second, self.scale, self.gather)


def embedding_stage(encoder: Encoder, config, dropout: float | None = None) -> tuple[EmbeddingModel, Encoder]:
    """LoRA on the encoder's model; the training module and an encoder view of it for dev evaluation."""
    if dropout is not None:
        set_attention_dropout(encoder.model, dropout)
    peft = add_lora(encoder.model, config)
    if config.gradient_checkpointing:
        peft.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    view = Encoder(peft, encoder.tokenizer, encoder.pooling, config.max_length, encoder.prompts, batch_invariant=False)
    return EmbeddingModel(peft, encoder.pooling), view


def merged(encoder: Encoder, stage_model: EmbeddingModel, dropout: float) -> Encoder:
    """The trained encoder: adapter merged into the weights, attention dropout back to ``dropout``."""
    model = stage_model.peft.merge_and_unload()
    set_attention_dropout(model, dropout)
    return Encoder(
        model,
        encoder.tokenizer,
        encoder.pooling,
        encoder.max_length,
        encoder.prompts,
        encoder.default_prompt_name,
        bidirectional=encoder.bidirectional,
    )


def train_simcse(
    model: Encoder | str | os.PathLike | None,
    config: SimCSEConfig,
    output_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: list | None = None,
) -> Encoder:
    """Train SimCSE on an encoder (or a source to load); return the encoder with the adapter merged."""
    sentences = data.sentences(config.data, data_root)  # bad data fails before the model loads
    encoder = as_encoder(model)
    dropout_before = getattr(encoder.model.config.get_text_config(), "attention_dropout", 0.0) or 0.0
    stage_model, view = embedding_stage(encoder, config, config.attention_dropout)
    trainer = SimCSETrainer(
        model=stage_model,
        args=training_arguments(config, output_dir),
        train_dataset=sentences,
        data_collator=SentenceCollator(Tokenization(encoder.tokenizer, config.max_length)),
        eval_dataset=dev_pairs(config, data_root),
        encoder=view,
        callbacks=callbacks,
        scale=config.scale,
        gather_across_devices=config.gather_across_devices,
        mini_batch_size=config.mini_batch_size,
    )
    trainer.train(resume_from_checkpoint=resume_point(output_dir, resume))
    return finish(merged(encoder, stage_model, dropout_before), output_dir, trainer)
