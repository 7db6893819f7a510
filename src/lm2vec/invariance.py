"""Batch-invariant linear layers: a text's embedding must not depend on the texts batched with it.

BLAS libraries pick kernels and thread splits by matrix shape, so one token's row of ``x @ W.T`` rounds
differently in an 8-row product than in a 300-row one (measured with MKL: products of fewer than 16 rows
take another path, and with two threads the split changes with the row count). LLMs' massive activations
amplify those one-ulp differences to ~3e-4 in SmolLM2's embeddings. Computing every linear layer in blocks
of a fixed row count (the last block zero-padded) gives every token row the same kernel whatever the
batch: bit-identical results, for 15-35% more matmul time on CPU (28% of SmolLM2 fp32 encoding time).
Where a float32 kernel is measured row-invariant on this machine (:func:`block_sizes`), the blocks are skipped;
where it is not, the probe finds which other block sizes give a row the same bits as a 128-row block (on an Intel
Xeon with AMX, MKL's 576x1536 product: all of 16-1,024 rows) and the fewest, largest blocks are used. Products
with bf16 outputs are not probed: the output rounding hides most order differences from any probe (one passed
16- and 256-row AMX products that differ on real rows), so they keep the fixed blocks.

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
# Block sizes besides ROWS that a row-count dependent kernel may still compute alike (probed): small ones spare short
# batches ROWS-row padding, large ones run kernels nearer their peak
SIZES = (16, 32, 64, 256, 512, 1024)
PROBE_VERSION = 2
Product = Callable[[torch.Tensor], torch.Tensor]
_sizes: dict[tuple[str, int], tuple[int, ...]] = {}  # (probe, threads) -> measured here, this process


def in_row_blocks(product: Product, rows: torch.Tensor, probe: str | None = None) -> torch.Tensor:
    """``product(rows)`` for a row-wise product (a linear layer), computed on blocks of fixed row counts (the last
    one zero-padded), so every row takes the same kernel whatever the row count. ``probe`` names the product's
    kernel and shape (e.g. ``"float32 576x1536"``; float32 outputs only, see above): :func:`block_sizes` measures
    which counts compute rows alike, the largest of them are used, and where any count does (up to 1,024 rows) the
    product runs in one piece. Without ``probe``: blocks of :data:`ROWS` rows."""
    count = rows.shape[0]
    sizes = block_sizes(probe, product, rows) if probe and count else (ROWS,)
    if count == 0 or (not sizes and count <= PROBE_ROWS[-1]):
        return product(rows)
    sizes = sizes or (ROWS,)
    parts, start = [], 0
    while start < count:
        size = next((size for size in sizes if size >= count - start), sizes[-1])
        block = rows[start : start + size]
        if block.shape[0] < size:
            block = torch.cat([block, block.new_zeros(size - block.shape[0], block.shape[1])])
        parts.append(product(block)[: count - start])
        start += size
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def block_sizes(probe: str, product: Product, like: torch.Tensor) -> tuple[int, ...]:
    """The row counts (:data:`ROWS` and those of :data:`SIZES`, ascending) in whose products ``product`` gives every
    row the bits it gets in a product of :data:`ROWS` rows; ``()`` where any of :data:`PROBE_ROWS` does. Rows with
    massive activations among them, two offsets; measured once per machine and thread count, cached."""
    key = (probe, torch.get_num_threads())
    if key not in _sizes:
        measure = functools.partial(_probe_sizes, product, like)
        _sizes[key] = tuple(measured_once("row-blocks", (PROBE_VERSION, probe), "sizes", measure))
    return _sizes[key]


def _probe_sizes(product: Product, like: torch.Tensor) -> list[int]:
    x = torch.randn(PROBE_ROWS[-1] + ROWS, like.shape[1], generator=torch.Generator().manual_seed(0))
    x[::37] *= 100  # a few rows of an LLM's massive activations
    x = x.to(like.device, like.dtype)

    def alike(counts: tuple[int, ...], reference: torch.Tensor) -> list[int]:
        return [n for n in counts if all(torch.equal(product(x[a : a + n]), reference[a : a + n]) for a in (0, 3))]

    if len(alike(PROBE_ROWS, product(x))) == len(PROBE_ROWS):
        return []
    blocks = torch.cat([product(x[start : start + ROWS]) for start in range(0, x.shape[0] - ROWS + 1, ROWS)])
    return sorted({ROWS, *alike(SIZES, blocks)})


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
