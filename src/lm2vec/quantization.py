"""int8 inference: linear layers with int8 weights and per-token int8 activations.

Each ``nn.Linear`` becomes an :class:`Int8Linear`: weights quantized once per output channel, activations
quantized per token (row) at run time, the product done in integers by ``torch._int_mm`` (VNNI / AMX-int8
kernels on CPU) and scaled back to float. Per-token scales matter twice over: LLMs' massive activations
sit in a few tokens, so one per-tensor scale (PyTorch's ``quantize_dynamic``) would crush every other
token's precision; and integer products are exact, so a text's embedding is bit-identical in any batch.
"""

from __future__ import annotations

import torch
from torch import nn

QMAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, float32 scale per row)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / QMAX
    return torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights (per output channel) and per-token int8 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", weight.t().contiguous())  # (in, out): _int_mm's layout
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows)
        out = torch._int_mm(q, self.weight_t).float() * scale * self.weight_scale
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` (except names containing one of ``skip``) by an :class:`Int8Linear`, in place."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name for part in skip)
    ]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to quantize")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Int8Linear(module))
    return model
