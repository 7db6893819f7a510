"""What every stage does around its Trainer: LoRA on the model, the module the Trainer trains (an encoder view
of the LoRA-wrapped model), running and resuming the Trainer, merging the adapter and saving the result.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    PretrainedConfig,
    PreTrainedModel,
    TrainerCallback,
    set_seed,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.pytorch_utils import Conv1D

from ..cache import atomic_write
from ..encoder import Encoder, fitted_length
from ..evaluation.sts import STSPairs, load_sts
from ..inputs import Batch, Tokenization
from ..loading import load
from ..loading.source import resolve_source
from ..packing import PACKED
from ..quantization import is_linear
from .config import SimCSEConfig, StageConfig, SupervisedConfig
from .trainer import (
    COMPLETE,
    StageModel,
    StageTrainer,
    float32_attention_pays,
    last_checkpoint,
    training_arguments,
    trains_in_bf16,
)

# Training loads float32 weights (LoRA wraps nn.Linear; bf16 is autocast per stage), not the inference default.
TRAINING_DTYPE = "float32"

ENCODER_DIR = "encoder"
Source = Encoder | str | os.PathLike | None  # an encoder, or anything lm2vec.load takes


# -- LoRA and attention dropout ---------------------------------------------------------------------
def add_lora(model: PreTrainedModel, config: StageConfig) -> PeftModel:
    """A fresh LoRA adapter (trainable) on a frozen model; on the top ``lora_layers`` layers if set.

    LoRA on the upper layers only also shortens the backward pass: autograd stops at the lowest adapter.
    """
    targets = config.lora_targets
    named = config.lora_layers is not None or targets == "all-linear"  # every layer by its full name
    if named:
        targets = _linear_targets(model, config)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        # GPT-2-style layers store their weights (in, out); peft would otherwise warn at each stage and set it itself
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    set_seed(config.seed)  # the adapter's initial weights follow the stage's seed, as the data order does
    with warnings.catch_warnings(), _targets_as_named():
        # peft reads an attribute transformers 5 deprecates: nothing for a user to do
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        peft = get_peft_model(model, lora)
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}  # named as the layer wrapped
    if named and set(adapted) != set(targets):
        raise RuntimeError(f"peft put LoRA on {sorted(set(adapted) ^ set(targets))[:4]} against the targets named")
    if float32_attention_helps(model, config):
        model.set_attn_implementation(FLOAT32_SDPA)
    # peft casts a bf16 input up to its adapter's float32, and autocast casts it back down for the adapter's products:
    # the same values, two copies of the input per layer (4-6% of a step). Left to autocast alone.
    cast = not trains_in_bf16(config)
    cheap_dropout = config.lora_dropout and model.device.type == "cpu"  # CUDA's own dropout is fast
    for layer in adapted.values():
        layer.cast_input_dtype_enabled = cast
        for name, dropout in layer.lora_dropout.items():
            if cheap_dropout and isinstance(dropout, nn.Dropout):
                layer.lora_dropout[name] = Dropout(dropout.p)
    return peft


@contextlib.contextmanager
def _targets_as_named() -> Iterator[None]:
    """peft 0.21 rewrites the targets of mixture-of-experts models from the names transformers 4 gave their experts'
    layers to transformers 5's fused expert weights, matching the end of a name: a shared expert's ``gate_proj``, a
    linear layer of this model, became the routed experts' 3D weights (GLM-4 MoE, ERNIE 4.5 MoE, EXAONE MoE;
    huggingface/peft#3711), which then took LoRA and refused LoRA dropout. lm2vec names this model's own linear
    layers, never transformers 4's: peft's rewrite is skipped while the adapter is made."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a peft from before transformers 5: it rewrites nothing
        yield
        return
    convert = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = convert


class Dropout(nn.Dropout):
    """``nn.Dropout`` with its mask drawn 16 bits an element, four elements to one 64-bit draw.

    The same distribution (p to 1/65,536), at a quarter of the cost on a CPU, where torch's dropout draws a number
    per element one at a time: LoRA dropout's masks were 26-34% of an MNTP step (Zen 4; Intel Xeon with AMX).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0, 1):
            return super().forward(input)
        return torch.where(keep_mask(input.shape, self.p, input.device), input, 0) * (1 / (1 - self.p))


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """True with probability ``1 - p`` (to 1/65,536) per element, from torch's generator (seeded, replayable)."""
    count = shape.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(torch.iinfo(torch.int64).min, None)
    bits = draws.view(torch.int16)[:count].view(shape)  # four uniform 16-bit numbers a draw
    return bits >= -(2**15) + round(p * 2**16)


FLOAT32_SDPA = "lm2vec_float32_sdpa"


def float32_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA in float32 under bf16 autocast, where this CPU runs it faster so (:func:`float32_attention_pays`); with
    attention dropout as autocast runs it (torch's CPU flash attention has no dropout: both go the slower way)."""
    if not kwargs.get("dropout") and torch.is_autocast_enabled(query.device.type):
        with torch.autocast(query.device.type, enabled=False):
            states, _ = sdpa_attention_forward(
                module, query.float(), key.float(), value.float(), attention_mask, **kwargs
            )
        return states.to(query.dtype), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(FLOAT32_SDPA, float32_sdpa)
AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)


def float32_attention_helps(model: PreTrainedModel, config: StageConfig) -> bool:
    """Train an SDPA model's attention in float32 where the stage runs in bf16 autocast on a CPU that measures
    float32 attention faster; :func:`merge_lora` switches it back."""
    sdpa = model.config._attn_implementation in ("sdpa", PACKED)  # packed by scoring: plain SDPA in training
    return trains_in_bf16(config) and sdpa and model.device.type == "cpu" and float32_attention_pays()


def _linear_targets(model: PreTrainedModel, config: StageConfig) -> list[str]:
    """Every linear layer named by ``lora_targets`` ("all-linear": all), in the top ``lora_layers`` layers if set; the
    output head never. Named here rather than by peft's "all-linear", which on mixture-of-experts models (Mixtral,
    Qwen3-MoE in transformers >= 5) also wraps the experts' 3D weight tensors and the router's, where LoRA dropout
    is not supported: those stay frozen, as every weight that is not a linear layer does."""
    keep = None
    if config.lora_layers is not None:
        total = model.config.get_text_config().num_hidden_layers
        keep = set(range(max(total - config.lora_layers, 0), total))
    head = model.get_output_embeddings()
    every = config.lora_targets == "all-linear"
    return [
        name
        for name, module in model.named_modules()
        if is_linear(module)
        and module is not head
        and (keep is None or _layer_index(name) in keep)
        and (_peft_allows(model, name) if every else name.rsplit(".", 1)[-1] in config.lora_targets)
    ]


def _peft_allows(model: PreTrainedModel, name: str) -> bool:
    """Whether peft takes LoRA on this layer, by peft's own (private) check: it refuses a Mamba mixer's ``out_proj``
    (Falcon-H1, Nemotron-H, Mamba 2), whose CUDA kernels read the weight directly. "all-linear" means every layer
    peft allows; a layer named in ``lora_targets`` is left to peft's own error."""
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:  # a peft without the check refuses nothing
        return True
    try:
        check(LoraConfig(), model, name.rsplit(".", 1)[-1])
    except ValueError:
        return False
    return True


def _layer_index(name: str) -> int | None:
    """The decoder layer a module belongs to (the first number in its name), or None."""
    match = re.search(r"(?:^|\.)(\d+)\.", name)
    return int(match.group(1)) if match else None


def attention_dropout(model: PreTrainedModel) -> float:
    return getattr(model.config.get_text_config(), "attention_dropout", 0.0) or 0.0


def set_attention_dropout(model: PreTrainedModel, p: float) -> None:
    """Attention dropout, architecture-agnostic: the config and every module that copied it at build time."""
    model.config.get_text_config().attention_dropout = p
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p  # type: ignore[assignment]  # torch types attributes as Tensor | Module
        dropout = getattr(module, "attn_dropout", None)
        if isinstance(dropout, nn.Dropout):  # gpt2, gpt_neox-style
            dropout.p = p


# -- the module SimCSE and supervised train ---------------------------------------------------------
class EmbeddingModel(StageModel):
    """Pooled embeddings of the LoRA-wrapped bidirectional model, by the encoder's own forward pass."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward(Batch(input_ids, attention_mask, pool_mask))


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


def in_batch_order(vectors: list[torch.Tensor], chunks: list[tuple[torch.Tensor, dict]]) -> torch.Tensor:
    """The chunks' embeddings, concatenated, back in the order of the batch's rows."""
    return torch.cat(vectors)[torch.argsort(torch.cat([index for index, _ in chunks]))]


def embed(model: nn.Module, batch: dict[str, torch.Tensor], size: int | None) -> torch.Tensor:
    """Pooled embeddings of a padded batch, one forward pass per length-sorted chunk, in the batch's order."""
    chunks = length_chunks(batch, size)
    return in_batch_order([model(**part) for _, part in chunks], chunks)


def stage_length(model_config: PretrainedConfig, max_length: int) -> int:
    """A stage's ``max_length``, cut to the positions of a model that has fewer: a recipe is written for any model."""
    length = fitted_length(model_config, max_length)
    if length < max_length:
        warnings.warn(
            f"max_length {max_length} is cut to the {length} positions of this model (max_position_embeddings)",
            stacklevel=2,
        )
    return length


def embedding_stage(encoder: Encoder, config: StageConfig, dropout: float | None = None) -> EmbeddingModel:
    """LoRA on the encoder's model, wrapped for training; its encoder view embeds the dev pairs too."""
    if dropout is not None:
        set_attention_dropout(encoder.model, dropout)
    peft = add_lora(encoder.model, config)
    if config.gradient_checkpointing:
        encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # a PeftModel forwards like the model it wraps (Encoder's annotation names PreTrainedModel only)
    length = stage_length(encoder.model.config, config.max_length)
    view = encoder.with_model(peft, max_length=length, batch_invariant=False)  # type: ignore[arg-type]
    return EmbeddingModel(peft, view)


def merged(encoder: Encoder, stage_model: StageModel, dropout: float) -> Encoder:
    """The trained encoder: adapter merged into the weights, attention dropout back to ``dropout``."""
    model = merge_lora(stage_model.peft)
    set_attention_dropout(model, dropout)
    return encoder.with_model(model)


def merge_lora(peft: PeftModel) -> PreTrainedModel:
    """The wrapped model with the adapter merged into its weights (and its attention as it was before LoRA)."""
    model = transformers_model(peft.merge_and_unload())
    if model.config._attn_implementation == FLOAT32_SDPA:
        model.set_attn_implementation("sdpa")
    return model


def transformers_model(module: nn.Module) -> PreTrainedModel:
    """``module`` as the transformers model it is (peft and transformers type their accessors as any module)."""
    if not isinstance(module, PreTrainedModel):
        raise TypeError(f"expected a transformers model, got a {type(module).__name__}")
    return module


def train_embeddings(
    trainer_class: type[StageTrainer],
    model: Source,
    config: SimCSEConfig | SupervisedConfig,
    output_dir: str | os.PathLike,
    train_dataset: Sequence,
    collator: Callable[[Tokenization], Callable],
    *,
    data_root: str | os.PathLike | None,
    resume: bool,
    callbacks: list[TrainerCallback] | None,
    dropout: float | None = None,
    batch_size: int | None = None,
) -> tuple[Encoder, StageTrainer]:
    """Train LoRA on an encoder for pooled embeddings (SimCSE, supervised), attention ``dropout`` meanwhile if
    given; return the encoder with the adapter merged, and the Trainer.

    ``collator`` builds the stage's collator from the tokenization it trains with.
    """
    encoder = as_encoder(model)
    dropout_before = attention_dropout(encoder.model)
    stage_model = embedding_stage(encoder, config, dropout)
    trainer = run_stage(
        trainer_class,
        stage_model,
        config,
        output_dir,
        train_dataset,
        collator(stage_model.encoder.tokenization),
        data_root=data_root,
        resume=resume,
        callbacks=callbacks,
        batch_size=batch_size,
    )
    trained = merged(encoder, stage_model, dropout_before)
    if config.matryoshka_dims:
        trained.matryoshka_dims = tuple(config.matryoshka_dims)
    return trained, trainer


# -- running, resuming and saving -------------------------------------------------------------------
def run_stage(
    trainer_class: type[StageTrainer],
    stage_model: StageModel,
    config: StageConfig,
    output_dir: str | os.PathLike,
    train_dataset: Sequence,
    data_collator: Callable,
    *,
    data_root: str | os.PathLike | None,
    resume: bool,
    callbacks: list[TrainerCallback] | None,
    batch_size: int | None = None,
) -> StageTrainer:
    """Train ``stage_model`` with the stage's Trainer, from the last checkpoint when resuming."""
    claim_stage_dir(output_dir, config, resume)
    trainer = trainer_class(
        model=stage_model,
        args=training_arguments(config, output_dir, batch_size=batch_size),
        train_dataset=train_dataset,
        data_collator=data_collator,
        eval_dataset=dev_pairs(config, data_root),
        callbacks=callbacks,
        config=config,
    )
    last = last_checkpoint(output_dir) if resume else None  # claim_stage_dir has refused to mix runs
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    return trainer


def save_stage_encoder(encoder: Encoder, output_dir: str | os.PathLike, trainer: StageTrainer) -> Encoder:
    """Save the stage's encoder (adapter merged) under ``output_dir/encoder``, committed by a marker."""
    if trainer.args.should_save:
        path = encoder.save(Path(output_dir) / ENCODER_DIR)
        atomic_write(path / COMPLETE, '{"stage": "done"}')
    encoder.model.eval()
    return encoder


SETTINGS = "stage-settings.json"
MODEL_RECORD = "model.json"  # which model an output folder converts or trains (claim_for_model)


def claim_stage_dir(output_dir: str | os.PathLike, config: StageConfig, resume: bool) -> None:
    """Record the stage's settings in ``output_dir``, refusing to mix runs: a folder holding an earlier run's
    checkpoints or encoder is continued only when resuming, and only with the same settings (an edited recipe never
    silently reuses or continues the old run). A folder with nothing trained in it is taken as it is. Every stage
    run claims its folder; ``convert`` and ``lm2vec train`` also do so before anything loads."""
    folder = Path(output_dir)
    path = folder / SETTINGS
    settings = json.loads(json.dumps(asdict(config)))  # as JSON gives them back: lists, not tuples
    trained = last_checkpoint(folder) is not None or is_finished(folder)
    if trained and not resume:
        raise FileExistsError(
            f"{output_dir} holds an earlier run; pass resume=True (--resume) to continue it, "
            "or choose another output directory"
        )
    if trained and path.is_file():
        earlier = json.loads(path.read_text())
        keys = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
        if keys:
            changed = ", ".join(f"{k}: {earlier.get(k)!r} there, {settings.get(k)!r} now" for k in keys)
            raise ValueError(
                f"{output_dir} was trained with other settings ({changed}); choose another output folder or delete it"
            )
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(settings, indent=2) + "\n")


def claim_for_model(output_dir: str | os.PathLike, source: str | os.PathLike | None, resume: bool) -> None:
    """Record which model ``output_dir`` converts or trains (``model.json``), refusing to resume another model's run
    there: its finished stages would be reused and its checkpoints continued as this model's. A local model (a GGUF
    file's conversion, the built-in model, an earlier stage's encoder) is known by its files' contents, so a moved or
    copied one resumes; a hub model by its id."""
    resolved = resolve_source(source)
    identity: dict[str, object] = (
        {"files": [list(pair) for pair in resolved.contents() or []]} if resolved.local else {"hub": resolved.path}
    )
    path = Path(output_dir) / MODEL_RECORD
    if resume and path.is_file() and (earlier := json.loads(path.read_text()))["identity"] != identity:
        raise ValueError(
            f"{output_dir} holds a run on another model ({earlier['model']}), not on {resolved.path}: "
            "choose another output folder"
        )
    atomic_write(path, json.dumps({"model": resolved.path, "identity": identity}, indent=2) + "\n")


def is_finished(output_dir: str | os.PathLike) -> bool:
    """Whether the stage in ``output_dir`` completed (its encoder saved and committed)."""
    return (Path(output_dir) / ENCODER_DIR / COMPLETE).is_file()


def saved_encoder(output_dir: str | os.PathLike) -> Encoder | None:
    """The encoder a completed stage saved, or None."""
    return load(Path(output_dir) / ENCODER_DIR, dtype=TRAINING_DTYPE) if is_finished(output_dir) else None


def dev_pairs(config: StageConfig, data_root: str | os.PathLike | None) -> STSPairs | None:
    """The STS-B dev pairs scored during training (the first ``eval_pairs``), or None without evaluation."""
    return load_sts("stsb", "dev", data_root, config.eval_pairs) if config.eval_steps else None


def as_encoder(model: Source) -> Encoder:
    return model if isinstance(model, Encoder) else load(model, dtype=TRAINING_DTYPE)
