"""The weight dtype a model is loaded in: names, and the ``"auto"`` policy (the device's fastest dtype)."""

from __future__ import annotations

import warnings

import torch

from ..hardware import bf16_speedup, native_bf16

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# What ``load(dtype=...)`` takes besides torch dtypes and the names above: int8 linear layers over float32
# (:mod:`lm2vec.quantization`), and "auto".
CHOICES = ("float32", "bfloat16", "int8", "auto")

Dtype = str | torch.dtype | None


def auto_dtype(on_cpu: bool) -> str:
    """What ``dtype="auto"`` picks: bf16 on GPUs, and on CPUs where bf16 products measure faster than fp32."""
    if not on_cpu:
        return "bfloat16"
    return "bfloat16" if native_bf16() and bf16_speedup() > 1.2 else "float32"


def resolve_dtype(dtype: Dtype, device: str | torch.device | None) -> Dtype:
    """Turn "auto" into this device's best dtype; warn where bf16 would be emulated on this CPU."""
    on_cpu = torch.device(device or "cpu").type == "cpu"
    if dtype == "auto":
        return auto_dtype(on_cpu)
    if on_cpu and dtype in ("bfloat16", "bf16", torch.bfloat16) and not native_bf16():
        warnings.warn(
            "this CPU has no native bf16 (AMX or AVX512-BF16): bf16 will be slower than float32", stacklevel=3
        )
    return dtype


def torch_dtype(dtype: Dtype) -> torch.dtype:
    """The torch dtype of a float dtype name (None: float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join([*DTYPES, 'int8', 'auto'])}")
    return DTYPES[dtype]
