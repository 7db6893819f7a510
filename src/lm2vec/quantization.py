"""Linear layers in lower precision, block by block: int8 or bf16 where a model tolerates it, float32 elsewhere.

:class:`Int8Linear`: weights quantized once per output channel, activations per token (row) at run time, the
product done in integers (``torch._int_mm``: VNNI / AMX-int8 kernels on CPU) and scaled back to float32.
Per-token scales keep LLMs' massive activations from crushing other tokens' resolution, and integer products
are exact, so a text's embedding is bit-identical in any batch. :class:`Bf16Linear`: bf16 weights and inputs,
float32 out, so the residual stream, norms and attention stay float32.

Which blocks may run in lower precision is the model's to say, not a rule's: on the untrained bidirectional
SmolLM2, one bf16 block among the first twelve moves some texts' embeddings to cosine 0.92 from float32, while
any of the later ones stays above 0.998 (docs/performance.md). :mod:`lm2vec.calibration` measures it per model;
:func:`lower_precision` applies its answer.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .hardware import fast_int8

LINEAR = (nn.Linear, Conv1D)  # GPT-2-style models use Conv1D, a linear layer with its weight transposed
LOWER = ("int8", "bfloat16")  # what lower_precision() makes of a linear layer

QMAX = 127
SCHEME = "int8-rows-v2"  # names the cached int8 layout: change it when the layout changes


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, float32 scale per row). No clamp needed: |x / scale| <= 127."""
    x = x.float()
    absmax = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())  # faster than abs().amax()
    scale = absmax.clamp_min_(1e-8).div_(QMAX)
    return (x * scale.reciprocal()).round_().to(torch.int8), scale


def int_product(q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``q @ weight_t`` of int8 matrices as int32. Without int8 dot-product instructions torch's kernel runs
    ~40x slower than float32 (AVX2-only CPUs), so there the same exact integers come from a float64 product."""
    if q.device.type != "cpu" or fast_int8():
        return torch._int_mm(q, weight_t)
    return torch.mm(q.double(), weight_t.double()).to(torch.int32)  # |sums| < 2^31 << 2^53: exact


def _float_weight(linear: nn.Linear | Conv1D) -> torch.Tensor:
    weight = linear.weight.detach()
    return weight.t() if isinstance(linear, Conv1D) else weight  # Conv1D stores (in, out)


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
        float_weight = _float_weight(linear)
        weight, scale = quantize_rows(float_weight)
        self.out_features: int = float_weight.shape[0]
        self.in_features: int = float_weight.shape[1]
        self.register_buffer("weight_t", weight.t().contiguous())  # (in, out): _int_mm's layout
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        self.register_buffer("bias", linear.bias.detach().float() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.last_input.quantize(x, self.in_features)
        out = int_product(q, self.weight_t) * scale  # int32 x float32 -> float32, one pass
        out.mul_(self.weight_scale)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Bf16Linear(nn.Module):
    """A frozen ``nn.Linear`` computed in bf16 (bf16 weights, the input cast per call), returning the input's
    dtype: the product runs at the bf16 rate while everything between linear layers stays float32."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear | Conv1D):
        super().__init__()
        float_weight = _float_weight(linear)
        self.out_features: int = float_weight.shape[0]
        self.in_features: int = float_weight.shape[1]
        self.register_buffer("weight", float_weight.to(torch.bfloat16).contiguous())
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


def blocks(model: nn.Module) -> list[str]:
    """The name prefixes of the model's transformer blocks (``layers.0.``, ``h.0.``, ...): the longest ModuleList."""
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    size, name = max(lists)
    return [f"{name}.{i}." for i in range(size)]


def linear_layers(model: nn.Module, block: str = "") -> list[str]:
    """Names of the float linear layers (in ``block`` if given), the LM head excepted."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, LINEAR) and f"{name}.".startswith(block) and "lm_head" not in name
    ]


def lower_precision(model: nn.Module, kind: str, keep: tuple[int, ...] = ()) -> nn.Module:
    """Make the linear layers ``kind`` ("int8": :class:`Int8Linear`, "bfloat16": :class:`Bf16Linear`), in place,
    except in the blocks numbered in ``keep`` and the LM head. Returns the model."""
    if kind not in LOWER:
        raise ValueError(f"unknown lower precision {kind!r}; choose one of {LOWER}")
    prefixes = blocks(model)
    kept = tuple(prefixes[i] for i in keep)
    targets = [name for name in linear_layers(model) if not f"{name}.".startswith(kept or ("\0",))]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to put in lower precision")
    shared = _LastInput()
    make = functools.partial(Int8Linear, last_input=shared) if kind == "int8" else Bf16Linear
    for name in targets:  # by name, so each float layer is freed as soon as it is replaced (lower peak memory)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))
    return model


def lower_kind(model: nn.Module) -> str | None:
    """ "int8" or "bfloat16" if the model has such layers (see :func:`lower_precision`), else None."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            return "int8"
        if isinstance(module, Bf16Linear):
            return "bfloat16"
    return None
