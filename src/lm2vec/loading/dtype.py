"""The precision a model runs in: names, and the ``"auto"`` policy (the default: the device's fastest path whose
embeddings stay float32-grade).

"bfloat16" and "int8" put the linear layers of the blocks that tolerate it in that precision, the other blocks' in
"int8x2" (near float32, where that is faster than float32) or float32, and keep the residual stream, norms and
attention in float32 (:mod:`lm2vec.calibration` measures which blocks, per model), so every path "auto" may pick
stays within cosine 0.99 of float32 on every text. On a CPU "auto" calibrates each precision this machine runs
fast and keeps the plan with the fastest linear layers (:func:`lm2vec.calibration.best_plan`). On a GPU "auto" is
"bfloat16", the blocks that cannot carry it in float32; "int8" is for CPUs only.
"float16" (and torch dtypes) convert the whole model, as transformers does.
"""

from __future__ import annotations

import warnings

import torch

from ..hardware import fast_int8, native_bf16
from ..quantization import LOWER, linear_speeds

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Leave float32 only for a path measured this much faster per linear layer: the blocks kept in float32, attention
# and the elementwise work do not speed up, so a smaller edge is lost in the whole model.
MIN_SPEEDUP = 1.3

Dtype = str | torch.dtype | None


def auto_candidates() -> tuple[str, ...]:
    """The lower precisions "auto" tries on this CPU: those whose linear layers measure at least
    :data:`MIN_SPEEDUP` times float32's here (:func:`lm2vec.quantization.linear_speeds`, cached)."""
    speeds = linear_speeds()
    return tuple(kind for kind in LOWER if speeds[kind] >= MIN_SPEEDUP)


def resolve_dtype(dtype: Dtype, device: str | torch.device | None) -> str:
    """Turn "auto" (and None) into this device's choice: "bfloat16" on GPUs; on CPUs "float32" where no lower
    precision is fast, else "auto" (decided per model by calibration). Canonical names otherwise; warn where a
    CPU would emulate the precision asked for."""
    on_cpu = torch.device(device or "cpu").type == "cpu"
    if dtype is None or dtype == "auto":
        return ("auto" if auto_candidates() else "float32") if on_cpu else "bfloat16"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype != "int8" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join([*DTYPES, 'int8', 'auto'])}")
    name = "int8" if dtype == "int8" else str(DTYPES[dtype]).removeprefix("torch.")
    if not on_cpu and name == "int8":
        raise ValueError("int8 runs on CPUs (their int8 dot-product instructions); on a GPU use 'auto' or 'bfloat16'")
    if on_cpu and name == "bfloat16" and not native_bf16():
        warnings.warn(
            "this CPU has no native bf16 (AMX or AVX512-BF16): bf16 will be far slower than float32", stacklevel=3
        )
    if on_cpu and name == "int8" and not fast_int8():
        warnings.warn(
            "this CPU has no int8 dot-product instructions (VNNI, AMX): int8 will be slower than float32", stacklevel=3
        )
    return name


def torch_dtype(dtype: str, stored: torch.dtype | None = None) -> torch.dtype:
    """The torch dtype the weights are loaded in, for ``dtype`` (a :func:`resolve_dtype` name): float16 for
    "float16"; for the lower precisions ("auto" too) the 16-bit float the checkpoint stores every weight in
    (``stored``, :meth:`~.source.Source.half_dtype`) where it has one, which calibration and lowering run as float32
    a block at a time (:func:`lm2vec.quantization.float32_in_turn`: half the memory, the same bits); else float32."""
    if dtype == "float16":
        return torch.float16
    return stored if stored is not None and dtype in (*LOWER, "auto") else torch.float32
