"""What each stage trains: a LoRA-wrapped model whose forward gives the loss (MNTP) or pooled embeddings."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..attention import position_ids_for
from ..pooling import PoolingMode, pool
from .config import StageConfig

IGNORE = -100  # label of the positions MNTP does not score


def add_lora(model: PreTrainedModel, config: StageConfig) -> PeftModel:
    """A fresh LoRA adapter (trainable) on a frozen model; on the top ``lora_layers`` layers if set.

    LoRA on the upper layers only also shortens the backward pass: autograd stops at the lowest adapter.
    """
    targets = config.lora_targets
    if config.lora_layers is not None:  # name every chosen linear layer: architecture-agnostic
        total = model.config.get_text_config().num_hidden_layers
        keep = set(range(max(total - config.lora_layers, 0), total))
        targets = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear | Conv1D)
            and (index := _layer_index(name)) is not None
            and index in keep
            and (config.lora_targets == "all-linear" or name.rsplit(".", 1)[-1] in config.lora_targets)
        ]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    return get_peft_model(model, lora)


def _layer_index(name: str) -> int | None:
    """The decoder layer a module belongs to (the first number in its name), or None."""
    match = re.search(r"(?:^|\.)(\d+)\.", name)
    return int(match.group(1)) if match else None


def set_attention_dropout(model: nn.Module, p: float) -> None:
    """Attention dropout, architecture-agnostic: the config and every module that copied it at build time."""
    model.config.get_text_config().attention_dropout = p
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
        if isinstance(getattr(module, "attn_dropout", None), nn.Dropout):  # gpt2, gpt_neox-style
            module.attn_dropout.p = p


class EmbeddingModel(nn.Module):
    """Pooled embeddings of a (LoRA-wrapped) bidirectional base model: what SimCSE and supervised train."""

    def __init__(self, peft: PeftModel, pooling: PoolingMode):
        super().__init__()
        self.peft, self.pooling = peft, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        out = self.peft(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask)
        )
        return pool(out.last_hidden_state, attention_mask, pool_mask, self.pooling)


def length_chunks(batch: dict[str, torch.Tensor], size: int | None) -> list[tuple[torch.Tensor, dict]]:
    """(row indices, sub-batch) pairs: rows sorted by length in chunks of ``size``, each chunk cut to its own
    longest row. Padding is most of a contrastive batch of mixed lengths; this removes nearly all of it.
    ``size`` None: the whole batch as it is.
    """
    rows = len(batch["attention_mask"])
    size = size or rows
    order = torch.argsort(batch["attention_mask"].sum(-1), descending=True, stable=True)
    chunks = []
    for start in range(0, rows, size):
        index = order[start : start + size]
        part = {key: value[index] for key, value in batch.items()}
        columns = part["attention_mask"].bool().any(0)  # padding sits at one end: a contiguous range remains
        chunks.append((index, {key: value[:, columns] for key, value in part.items()}))
    return chunks


def embed(model: nn.Module, batch: dict[str, torch.Tensor], size: int | None) -> torch.Tensor:
    """Pooled embeddings of a padded batch, one forward pass per length-sorted chunk, in the batch's order."""
    chunks = length_chunks(batch, size)
    vectors = torch.cat([model(**part) for _, part in chunks])
    return vectors[torch.argsort(torch.cat([index for index, _ in chunks]))]


class MNTPModel(nn.Module):
    """A (LoRA-wrapped) causal LM made bidirectional; forward returns the masked next token loss."""

    def __init__(self, peft: PeftModel):
        super().__init__()
        self.peft = peft

    @property
    def lm(self) -> PreTrainedModel:
        return self.peft.get_base_model()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        decoder = self.lm.base_model
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask))
        return mntp_loss(out.last_hidden_state, labels, self.lm)


def mntp_loss(hidden: torch.Tensor, labels: torch.Tensor, lm: PreTrainedModel) -> torch.Tensor:
    """Cross-entropy of the token masked at i, scored by the LM head on the output at i-1; masked positions only.

    The LM head runs on the scored positions alone (a fifth of the tokens), not on the whole sequence.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[:, :-1][scored]).float()
    cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    if not scored.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets[scored])
