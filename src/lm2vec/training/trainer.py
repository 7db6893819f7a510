"""The Hugging Face Trainer, as every stage uses it: adapters-only checkpoints, committed atomically,
resume, a stop on NaN/inf losses, STS-B dev evaluation that keeps the best checkpoint, a JSONL log.

Runs unchanged under ``accelerate launch`` / ``torchrun`` (DDP): the stage's loss calls the wrapped model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..cache import atomic_write
from ..encoder import Encoder
from ..evaluation.sts import STSPairs, score_pairs
from ..hardware import measured_once, native_bf16
from ..loading.dtype import MIN_SPEEDUP
from ..quantization import linear_speeds
from .config import StageConfig

COMPLETE = "lm2vec-complete.json"  # written last, atomically: a checkpoint without it is ignored
ADAPTER = "adapter_model.safetensors"
METRIC = "stsb_dev_spearman"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left as it was."""


def bf16_pays() -> bool:
    """bf16 autocast where it pays, the runtime's policy: a GPU that supports it; a CPU with bf16 instructions whose
    bf16 linear layers measure at least ``MIN_SPEEDUP`` x float32 here (:func:`~lm2vec.quantization.linear_speeds`,
    cached per machine). An Intel Xeon without AMX runs bf16 at half the float32 rate, an AMD Zen 5 at 4.5x."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return native_bf16() and linear_speeds()["bfloat16"] >= MIN_SPEEDUP


def trains_in_bf16(config: StageConfig) -> bool:
    """The stage's ``bf16`` setting, ``None`` decided by :func:`bf16_pays`."""
    return bf16_pays() if config.bf16 is None else config.bf16


def float32_attention_pays() -> bool:
    """Whether attention's forward and backward run faster in float32 than in bf16 on this CPU (measured once per
    machine, cached): torch's CPU flash attention ran 2.8-5.3x slower in bf16 than in float32 on an Intel Xeon with
    AMX, at the shapes the ``cpu`` recipe trains on."""
    return measured_once("attention-speeds", (1,), "float32_faster", _float32_attention_faster)


def _float32_attention_faster(rounds: int = 5) -> bool:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 8, 64, 64, generator=generator) for _ in range(3))
    mask = torch.ones(16, 1, 64, 64, dtype=torch.bool)
    mask[::2, ..., 48:] = False  # padded texts, as training batches have
    seconds = {dtype: float("inf") for dtype in (torch.float32, torch.bfloat16)}
    for _ in range(rounds + 1):  # the first round warms up; rounds alternate, so a busy moment slows both
        for dtype in seconds:
            query, key, value = (t.to(dtype).requires_grad_() for t in (q, k, v))
            start = time.perf_counter()
            nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask).sum().backward()
            seconds[dtype] = min(seconds[dtype], time.perf_counter() - start)
    return seconds[torch.float32] * MIN_SPEEDUP <= seconds[torch.bfloat16]


def training_arguments(
    config: StageConfig, output_dir: str | os.PathLike, batch_size: int | None = None
) -> TrainingArguments:
    """TrainingArguments from a stage config (``batch_size`` overrides the per-device batch: 1 for pre-made batches)."""
    evaluate = config.eval_steps is not None
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=batch_size or config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps,
        load_best_model_at_end=evaluate and config.select_best,
        metric_for_best_model=METRIC if evaluate else None,
        greater_is_better=True,
        bf16=trains_in_bf16(config),
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        save_only_model=False,
    )


class StageModel(nn.Module):
    """What a stage's Trainer trains: the PeftModel, registered (its adapter is what is trained and saved), and
    an encoder view of the model being trained, whose forward pass the stage's forward uses.
    """

    def __init__(self, peft: PeftModel, encoder: Encoder):
        super().__init__()
        self.peft = peft
        self.encoder = encoder  # not a module: its model is (inside) ``peft``


class StageTrainer(Trainer):
    """Trainer over a :class:`StageModel`; ``eval_dataset`` is the STS-B dev pairs, embedded by the stage
    model's encoder view. ``config`` is the stage's settings.
    """

    def __init__(self, *args, config: StageConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self.tokens_seen = 0
        self._last_log = (time.perf_counter(), 0)
        self.add_callback(JsonlLog(Path(self._get_output_dir(None)) / "log.jsonl"))

    def train(self, *args, **kwargs):
        self.log({"bf16_autocast": float(self.args.bf16)})  # the precision chosen, printed and in log.jsonl
        return super().train(*args, **kwargs)

    @property
    def stage_model(self) -> StageModel:
        if not isinstance(self.model, StageModel):
            raise TypeError(f"a stage trains a StageModel, not a {type(self.model).__name__}")
        return self.model

    # -- loss ----------------------------------------------------------------------------------
    def stage_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stage's loss on a batch; ``model`` is the stage model as the Trainer wraps it (DDP)."""
        raise NotImplementedError

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch=None
    ) -> torch.Tensor:
        self.tokens_seen += int(sum(v.sum() for k, v in inputs.items() if k.endswith("attention_mask")))
        loss = self.stage_loss(model, inputs)
        check_finite(loss, self.state.global_step + 1, self._get_output_dir(None))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now, tokens = time.perf_counter(), self.tokens_seen
            logs["tokens_per_second"] = round((tokens - self._last_log[1]) / max(now - self._last_log[0], 1e-9), 1)
            self._last_log = (now, tokens)
        super().log(logs, start_time)

    # -- evaluation: STS-B dev Spearman with the model as it is now ----------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        pairs = eval_dataset or self.eval_dataset
        if not isinstance(pairs, STSPairs):
            raise TypeError(f"a stage evaluates on STS pairs, not on {type(pairs).__name__}")
        start = time.perf_counter()
        with torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            spearman, _ = score_pairs(self.stage_model.encoder, pairs, batch_size=64)
        metrics = {
            f"{metric_key_prefix}_{METRIC}": spearman,
            f"{metric_key_prefix}_seconds": time.perf_counter() - start,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- checkpoints: the adapter only, committed by a marker written last ---------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self.args.should_save:
            self.stage_model.peft.save_pretrained(output_dir or self._get_output_dir(None), safe_serialization=True)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            atomic_write(folder / COMPLETE, json.dumps({"step": self.state.global_step}))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter(self.stage_model.peft, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint is not None:
            load_adapter(self.stage_model.peft, self.state.best_model_checkpoint)


def load_adapter(peft: PeftModel, checkpoint: str | os.PathLike) -> None:
    """Put a checkpoint's adapter weights (safetensors) into a PeftModel, refusing one whose weights are not exactly
    the model's adapter weights: peft's loader skips names it does not know and leaves missing ones as initialised,
    which would resume a run from a model that is not the checkpoint's."""
    path = Path(checkpoint) / ADAPTER
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {ADAPTER}: not an lm2vec checkpoint")
    weights = load_file(path)
    expected = get_peft_model_state_dict(peft).keys()
    if unknown := sorted(weights.keys() - expected):
        raise ValueError(f"{path} holds weights this model's adapter has not, e.g. {unknown[:3]}: another run's")
    if missing := sorted(expected - weights.keys()):
        raise ValueError(f"{path} lacks weights of this model's adapter, e.g. {missing[:3]}: another run's")
    set_peft_model_state_dict(peft, weights)


def check_finite(loss: torch.Tensor, step: int, output_dir: str | os.PathLike) -> None:
    """Stop before a NaN/inf loss reaches the weights; checkpoints already written stay intact."""
    if not torch.isfinite(loss.detach()).all():
        last = last_checkpoint(output_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"the loss is {loss.item()} at step {step}; training stopped before updating the weights; {where} "
            "(lower the learning rate, or check the data)"
        )


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (one whose commit marker was written), or None."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if (p / COMPLETE).is_file()]
    return max(folders, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


class JsonlLog(TrainerCallback):
    """Every logged loss, learning rate, throughput and dev score, one JSON object a line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args: TrainingArguments, state, control, logs=None, **kwargs) -> None:
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
