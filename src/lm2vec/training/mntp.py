"""Stage 1, masked next token prediction: teach a causal LM to use the future tokens it now sees.

Mask a fraction of tokens (80/10/10 mask/random/keep, or all mask); the token masked at position i is
predicted from the output at i-1, the LM head's usual shift, with the loss on masked positions only. LoRA
on the decoder; the LM head stays frozen (and tied, where the model ties it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel, TrainerCallback
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..attention import verify_attention
from ..encoder import Encoder
from ..inputs import check_flag
from ..loading.model import (
    load_model,
    load_tokenizer,
    model_config,
    read_config,
    text_decoder_class,
    text_lm_class,
)
from ..loading.source import Source, resolve_source
from . import data
from .config import MNTPConfig
from .stage import add_lora, merge_lora, run_stage, save_stage_encoder, stage_length, transformers_model
from .trainer import StageModel, StageTrainer

MASK_TOKEN = "<mask>"
IGNORE = -100  # label of the positions MNTP does not score


def mntp_inputs(
    source: Source, config: MNTPConfig, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, int]:
    """The tokenizer and the mask token's id, with what MNTP needs of the model checked from its files alone,
    before any weights load (``lm2vec convert``: before the baselines are scored): a mask token the vocabulary has,
    and for a multimodal model a causal LM of its text type."""
    architecture = model_config(source, trust_remote_code=trust_remote_code)  # refuses an encoder-decoder first
    if text_decoder_class(architecture):
        text_lm_class(architecture)
    tokenizer = load_tokenizer(source, trust_remote_code)
    return tokenizer, mask_token_id(tokenizer, config.mask_token)


def mask_token_id(tokenizer: PreTrainedTokenizerBase, choice: str) -> int:
    """The id that stands for a masked token: an existing token ("_" by default), EOS, or a new one ("new": <mask>
    added to the tokenizer; the model's embeddings grow to match once it is loaded). Asked of the tokenizer alone, so
    a token the vocabulary lacks fails before any weights load."""
    if choice == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("mask_token 'eos': this tokenizer has no EOS token; use one of its tokens or 'new'")
        return tokenizer.eos_token_id
    if choice == "new":
        if tokenizer.mask_token is None:
            tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
        return tokenizer.mask_token_id
    token = tokenizer.convert_tokens_to_ids(choice)
    if not isinstance(token, int) or token == tokenizer.unk_token_id:
        raise ValueError(f"mask_token {choice!r} is not a single token of this tokenizer; use 'eos' or 'new'")
    return token


class MaskingCollator:
    """Chunks -> masked inputs and labels (the original token at masked positions, IGNORE elsewhere).

    Position 0 is never masked: nothing comes before it to predict it from.
    """

    def __init__(self, mask_id: int, vocab_size: int, probability: float, strategy: str, special_ids: list[int]):
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.probability, self.strategy = probability, strategy
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
        chance = torch.full(ids.shape, self.probability)
        chance[:, 0] = 0.0
        chance[torch.isin(ids, self.special)] = 0.0
        chosen = torch.bernoulli(chance).bool()
        labels = torch.where(chosen, ids, IGNORE)
        inputs = ids.clone()
        if self.strategy == "all":
            inputs[chosen] = self.mask_id
        else:
            masked = chosen & torch.bernoulli(torch.full(ids.shape, 0.8)).bool()
            randomized = chosen & ~masked & torch.bernoulli(torch.full(ids.shape, 0.5)).bool()
            inputs[masked] = self.mask_id
            inputs[randomized] = torch.randint(self.vocab_size, ids.shape)[randomized]
        return {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}


class MNTPModel(StageModel):
    """A (LoRA-wrapped) causal LM made bidirectional; forward returns the masked next token loss of the states
    of its encoder view (the decoder without the LM head).
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.token_states(input_ids, attention_mask)
        return mntp_loss(hidden, labels, transformers_model(self.peft.get_base_model()))


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


class MNTPTrainer(StageTrainer):
    def stage_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs)


def train_mntp(
    source: str | os.PathLike | None,
    config: MNTPConfig,
    output_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    resume: bool = False,
    trust_remote_code: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> Encoder:
    """Train MNTP on ``source`` (any :func:`lm2vec.load` source); return the bidirectional encoder, LoRA merged."""
    check_flag("trust_remote_code", trust_remote_code)
    resolved = resolve_source(source)
    tokenizer, mask_id = mntp_inputs(resolved, config, trust_remote_code)
    length = stage_length(read_config(resolved, trust_remote_code), config.max_length)
    chunks = data.chunks(tokenizer, config.data, length, data_root)  # bad data fails before loading
    lm = load_model(resolved, True, torch.float32, None, trust_remote_code, model_class=AutoModelForCausalLM)
    if mask_id >= lm.config.get_text_config().vocab_size:  # a new mask token: a row for it
        lm.resize_token_embeddings(len(tokenizer))
    decoder = transformers_model(lm.base_model)
    verify_attention(decoder, True, vocab_size=len(tokenizer))
    peft = add_lora(lm, config)
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    collator = MaskingCollator(
        mask_id, len(tokenizer), config.mlm_probability, config.mask_strategy, tokenizer.all_special_ids
    )
    view = Encoder(decoder, tokenizer, batch_invariant=False)
    dataset = [{"input_ids": c} for c in chunks]
    trainer = run_stage(
        MNTPTrainer,
        MNTPModel(peft, view),
        config,
        output_dir,
        dataset,
        collator,
        data_root=data_root,
        resume=resume,
        callbacks=callbacks,
    )
    trained = view.with_model(transformers_model(merge_lora(peft).base_model), batch_invariant=True)
    return save_stage_encoder(trained, output_dir, trainer)
