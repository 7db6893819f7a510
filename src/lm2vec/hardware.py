"""What this CPU does fast: its instruction sets, and the measured speed of each linear-layer precision.

Speed and bf16/int8 behaviour differ a lot between the machines we run on, and flags alone mislead: one Xeon
that reports avx512_bf16 without AMX multiplies bf16 at half its fp32 rate, while AMX machines do ~6x. So the
``dtype="auto"`` policy (:mod:`lm2vec.loading.dtype`) decides on :func:`linear_speeds`, measured once per
machine and cached.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, TypeVar

import torch

from .cache import atomic_write, cache_dir, cache_key

# The instruction sets that decide bf16 and int8 speed on CPU (see RECIPE.md, section 6).
CPU_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni")
SPEED_SHAPE = (256, 576, 1536)  # tokens x in x out: one MLP projection of a small LLM's batch
SPEED_VERSION = 3  # bump when what linear_speeds() measures changes
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


def linear_speeds() -> dict[str, float]:
    """Throughput of a model-sized linear layer per precision, relative to float32 (float32 = 1.0).

    Measured on the layers the encoder runs (``nn.Linear`` and :mod:`lm2vec.quantization`'s layers with their
    activation quantization), best of 20 alternating rounds, once per machine, torch version and thread count
    (~1 s), and cached in ``<cache>/hardware/``.
    """
    return measured_once("linear-speeds", (SPEED_VERSION,), "speeds", _measure_linear_speeds)


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


def _measure_linear_speeds(rounds: int = 20) -> dict[str, float]:
    from .quantization import Bf16Linear, Int8Linear, Int8x2Linear, OneDnnLinear, onednn_available  # imports us

    tokens, inputs, outputs = SPEED_SHAPE
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(inputs, outputs, bias=False)
    x = torch.randn(tokens, inputs, generator=generator)
    kinds = (Bf16Linear, Int8Linear, Int8x2Linear, *((OneDnnLinear,) if onednn_available() else ()))
    layers = {"float32": linear} | {layer.kind: layer(linear) for layer in kinds}
    seconds = dict.fromkeys(layers, float("inf"))
    with torch.inference_mode():
        for layer in layers.values():
            layer(x.clone())  # warm-up: kernels chosen, buffers allocated
        for _ in range(rounds):  # rounds alternate between precisions: a busy moment slows one round, not one kind
            for name, layer in layers.items():
                fresh = x.clone()  # a new tensor: the int8 layers quantize it, as they would a new batch
                start = time.perf_counter()
                layer(fresh)
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    return {name: seconds["float32"] / value for name, value in seconds.items()}
