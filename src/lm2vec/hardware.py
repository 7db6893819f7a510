"""What this CPU is: its instruction sets, and a place to keep what is measured on it once (:func:`measured_once`).

Speed and bf16/int8 behaviour differ a lot between the machines we run on, and flags alone mislead: one Xeon
that reports avx512_bf16 without AMX multiplies bf16 at half its fp32 rate, while AMX machines do ~6x. So the
``dtype="auto"`` policy (:mod:`lm2vec.loading.dtype`) decides on speeds measured here
(:func:`lm2vec.quantization.linear_speeds`), once per machine, and cached.
"""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, TypeVar

import torch

from .cache import atomic_write, cache_dir, cache_key

# The instruction sets that decide bf16 and int8 speed on CPU (see RECIPE.md, section 6).
CPU_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni")
T = TypeVar("T")


class CPUInfo(TypedDict):
    model: str
    flags: dict[str, bool]


@functools.cache
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
    """Does this CPU do bf16 matmuls in hardware? Without it, bf16 is emulated: far slower than fp32."""
    flags = cpu_info()["flags"]
    return flags["amx_bf16"] or flags["avx512_bf16"]


def fast_int8() -> bool:
    """Does this CPU have int8 dot-product instructions (VNNI, AMX)? Without them ``torch._int_mm`` crawls."""
    flags = cpu_info()["flags"]
    return flags["amx_int8"] or flags["avx512_vnni"] or flags["avx_vnni"]


def describe_cpu() -> str:
    """One line, e.g. ``AMD EPYC (amx_bf16: no, ..., avx512_vnni: yes), 2 threads``."""
    info = cpu_info()
    flags = ", ".join(f"{flag}: {'yes' if present else 'no'}" for flag, present in info["flags"].items())
    return f"{info['model']} ({flags}), {torch.get_num_threads()} threads"


def describe_machine() -> str:
    """:func:`describe_cpu`, and the GPU where torch sees one (training and scoring run there)."""
    gpu = f"; GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return describe_cpu() + gpu


def measured_once(stem: str, parts: tuple, field: str, measure: Callable[[], T]) -> T:
    """``measure()`` once per machine, torch version and thread count (and ``parts``), cached as JSON in
    ``<cache>/hardware/<stem>-<key>.json`` under ``field``; a read-only cache means measuring again next time."""
    key = cache_key(*parts, cpu_info(), torch.__version__, torch.get_num_threads())
    path = cache_dir() / "hardware" / f"{stem}-{key[:16]}.json"
    try:
        return json.loads(path.read_text())[field]
    except (OSError, ValueError, KeyError):
        pass
    value = measure()
    record = {"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(), field: value}
    try:
        atomic_write(path, json.dumps(record, indent=2) + "\n")
    except OSError:
        pass
    return value
