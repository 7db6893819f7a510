"""Which CPU produced a figure: speed and bf16 behaviour differ a lot between the machines we run on."""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path
from typing import TypedDict

import torch

# The instruction sets that decide bf16 and int8 speed on CPU (see RECIPE.md, section 6).
CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512_vnni")


class CPUInfo(TypedDict):
    model: str
    flags: dict[str, bool]


def cpu_info() -> CPUInfo:
    """CPU model name and whether each of :data:`CPU_FLAGS` is present (Linux ``/proc/cpuinfo``)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"model": model, "flags": {flag: flag in flags for flag in CPU_FLAGS}}


def native_bf16() -> bool:
    """Does this CPU do bf16 matmuls in hardware? Without it, bf16 is emulated: slower than fp32."""
    flags = cpu_info()["flags"]
    return bool(flags["amx_bf16"] or flags["avx512_bf16"])


def describe_cpu() -> str:
    """One line, e.g. ``AMD EPYC (amx_bf16: no, avx512_bf16: yes, avx512_vnni: yes)``."""
    info = cpu_info()
    flags = ", ".join(f"{flag}: {'yes' if present else 'no'}" for flag, present in info["flags"].items())
    return f"{info['model']} ({flags})"


@functools.cache
def bf16_speedup(size: tuple[int, int, int] = (256, 576, 1536), repeats: int = 5) -> float:
    """Measured once per process (~0.1 s): fp32 time / bf16 time of one model-sized matmul on this CPU.

    Flags alone mislead: on one Xeon here that reports avx512_bf16 without AMX, bf16 products ran at half the
    fp32 speed (0.17 against 0.33 TFLOP/s), while AMX machines run them ~6x faster.
    """
    m, k, n = size

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)
