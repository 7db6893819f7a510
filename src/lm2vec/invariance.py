"""Batch-invariant linear layers: a text's embedding must not depend on the texts batched with it.

BLAS libraries pick kernels and thread splits by matrix shape, so one token's row of ``x @ W.T`` rounds
differently in an 8-row product than in a 300-row one (measured with MKL: products of fewer than 16 rows
take another path, and with two threads the split changes with the row count). LLMs' massive activations
amplify those one-ulp differences to ~3e-4 in SmolLM2's embeddings. Computing every linear layer in blocks
of a fixed row count (the last block zero-padded) gives every token row the same kernel whatever the
batch: bit-identical results, for 15-35% more matmul time on CPU (28% of SmolLM2 fp32 encoding time).
Where a kernel is measured row-invariant on this machine (:func:`rows_invariant`: oneDNN's bf16 products on an
AMD EPYC Zen 4, not MKL's float32 there), the blocks are skipped: the same bits, 7% faster encoding.

Architecture-agnostic: a torch function mode reroutes ``F.linear`` (every ``nn.Linear``) while it is on. The
lower-precision layers of :mod:`lm2vec.quantization` compute their float products (bf16, oneDNN) in the same
blocks (or in one piece, where probed invariant); their integer products are exact and need none. Attention is
the other half: see :mod:`lm2vec.packing`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

from .hardware import measured_once

ROWS = 128  # the fixed row count of every product; measured invariant with MKL at 1 and 2 threads
# The row counts a probe compares with one large product: kernel choices change at small and power-of-two counts.
PROBE_ROWS = (1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1024)
PROBE_VERSION = 1
Product = Callable[[torch.Tensor], torch.Tensor]
_invariant: dict[tuple[str, int], bool] = {}  # (probe, threads) -> measured here, this process


def in_row_blocks(product: Product, rows: torch.Tensor, probe: str | None = None) -> torch.Tensor:
    """``product(rows)`` for a row-wise product (a linear layer), computed on blocks of exactly :data:`ROWS` rows
    (the last one zero-padded), so every row takes the same kernel whatever the row count. ``probe`` names the
    product's kernel and shape (e.g. ``"bfloat16 576x1536"``): where :func:`rows_invariant` measured it invariant
    up to this many rows (128 included, so blocks would give the same bits), it runs in one piece."""
    count = rows.shape[0]
    if count == 0 or (probe and count <= PROBE_ROWS[-1] and rows_invariant(probe, product, rows)):
        return product(rows)
    full = count - count % ROWS
    parts = [product(rows[start : start + ROWS]) for start in range(0, full, ROWS)]
    if full < count:
        tail = rows.new_zeros(ROWS, rows.shape[1])
        tail[: count - full] = rows[full:]
        parts.append(product(tail)[: count - full])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def rows_invariant(probe: str, product: Product, like: torch.Tensor) -> bool:
    """Whether ``product`` gives every row the same bits in a product of any of :data:`PROBE_ROWS` rows as in one of
    1,027 (rows with massive activations among them, two offsets), measured once per machine and thread count."""
    key = (probe, torch.get_num_threads())
    if key not in _invariant:
        measure = functools.partial(_probe_rows, product, like)
        _invariant[key] = measured_once("rows-invariant", (PROBE_VERSION, probe), "invariant", measure)
    return _invariant[key]


def _probe_rows(product: Product, like: torch.Tensor) -> bool:
    x = torch.randn(PROBE_ROWS[-1] + 3, like.shape[1], generator=torch.Generator().manual_seed(0))
    x[::37] *= 100  # a few rows of an LLM's massive activations
    x = x.to(like.device, like.dtype)
    full = product(x)
    return all(torch.equal(product(x[a : a + n]), full[a : a + n]) for n in PROBE_ROWS for a in (0, 3))


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed in products of exactly :data:`ROWS` rows (or in one, where measured the same)."""
    wt = weight.t()
    probe = f"float32 {weight.shape[1]}x{weight.shape[0]}"
    out = in_row_blocks(lambda block: torch.mm(block, wt), x.reshape(-1, x.shape[-1]), probe)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class BatchInvariant(TorchFunctionMode):
    """Within this context, float32 CPU linear layers use :func:`blocked_linear`, and ``torch.addmm`` (GPT-2's
    Conv1D layers) the same blocks (inference only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and _applies(args[0], args[1]):
            return blocked_linear(*args, **kwargs)
        if func is torch.addmm and not kwargs and len(args) == 3 and _applies(args[1], args[2]):
            bias, rows, weight = args
            return in_row_blocks(lambda block: torch.addmm(bias, block, weight), rows)
        return func(*args, **kwargs)


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )
