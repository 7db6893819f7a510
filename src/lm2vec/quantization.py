"""int8 inference: linear layers with int8 weights and per-token int8 activations.

Each ``nn.Linear`` becomes an :class:`Int8Linear`: weights quantized once per output channel, activations
quantized per token (row) at run time, the product done in integers by ``torch._int_mm`` (VNNI / AMX-int8
kernels on CPU) and scaled back to float. Per-token scales matter twice over: LLMs' massive activations
sit in a few tokens, so one per-tensor scale (PyTorch's ``quantize_dynamic``) would crush every other
token's resolution; and integer products are exact, so a text's embedding is bit-identical in any batch.

:func:`lm2vec.loading.model.load_int8_model` caches a local model's quantized weights as safetensors, so later
loads read a third of the float bytes and never hold the float model in memory.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR = (nn.Linear, Conv1D)  # GPT-2-style models use Conv1D, a linear layer with its weight transposed

QMAX = 127
SCHEME = "int8-rows-v1"  # names the cached layout and the layers kept in float: change it when either changes


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, float32 scale per row). No clamp needed: |x / scale| <= 127."""
    x = x.float()
    absmax = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())  # faster than abs().amax()
    scale = absmax.clamp_min_(1e-8).div_(QMAX)
    return (x * scale.reciprocal()).round_().to(torch.int8), scale


class _LastInput:
    """The most recent quantized input. q/k/v (and gate/up) projections are called on one tensor object, so one
    quantization serves them all; a new tensor (even at a reused address) is quantized afresh."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def quantize(self, x: torch.Tensor, features: int) -> tuple[torch.Tensor, torch.Tensor]:
        value = self.value
        if value is None or self.key is None or self.key[0] is not x or self.key[1:] != (x.data_ptr(), x.shape):
            self.key, value = (x, x.data_ptr(), x.shape), quantize_rows(x.reshape(-1, features))
            self.value = value
        return value


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights (per output channel) and per-token int8 activations."""

    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear | Conv1D, last_input: _LastInput | None = None):
        super().__init__()
        self.last_input = last_input or _LastInput()
        float_weight = linear.weight.detach()
        float_weight = float_weight.t() if isinstance(linear, Conv1D) else float_weight  # Conv1D: (in, out)
        weight, scale = quantize_rows(float_weight)
        self.out_features: int = float_weight.shape[0]
        self.in_features: int = float_weight.shape[1]
        self.register_buffer("weight_t", weight.t().contiguous())  # (in, out): _int_mm's layout
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.last_input.quantize(x, self.in_features)
        out = torch._int_mm(q, self.weight_t) * scale  # int32 x float32 -> float32, one pass
        out.mul_(self.weight_scale)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def first_block(model: nn.Module) -> str:
    """The name prefix of the model's first transformer block (``layers.0.``, ``h.0.``, ...): the longest ModuleList."""
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    return f"{max(lists)[1]}.0." if lists else ""


def quantize_int8(model: nn.Module, skip: tuple[str, ...] | None = None) -> nn.Module:
    """Make each ``nn.Linear`` (GPT-2: ``Conv1D``) an :class:`Int8Linear`, in place, but names with a ``skip`` part.

    By default the LM head and the first block stay in float, for 3% of the matmul work: chosen on STS-B dev (all
    1,500 pairs, two trained SmolLM2 encoders), where quantizing every layer cost 0.32 / 0.22 points and all but
    the first block +0.06 / -0.18 (docs/performance.md).
    """
    if skip is None:
        skip = ("lm_head", first_block(model)) if first_block(model) else ("lm_head",)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, LINEAR) and not any(part in f"{name}." for part in skip)
    ]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to quantize")
    shared = _LastInput()
    for name in targets:  # by name, so each float layer is freed as soon as it is replaced (lower peak memory)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Int8Linear(getattr(parent, child), shared))
    return model
