"""Batch-invariant linear layers: a text's embedding must not depend on the texts batched with it.

BLAS libraries pick kernels and thread splits by matrix shape, so one token's row of ``x @ W.T`` rounds
differently in an 8-row product than in a 300-row one (measured with MKL: products of fewer than 16 rows
take another path, and with two threads the split changes with the row count). LLMs' massive activations
amplify those one-ulp differences to ~3e-4 in SmolLM2's embeddings. Computing every linear layer in blocks
of a fixed row count (the last block zero-padded) gives every token row the same kernel whatever the
batch: bit-identical results, for 15-35% more matmul time on CPU (28% of SmolLM2 fp32 encoding time).
Where a kernel is measured row-invariant on this machine (:func:`block_sizes`), the blocks may take any size of
:data:`LADDER` (a few sizes rather than one piece: each new shape costs oneDNN memory); where it is not, the probe
finds which of those sizes give a row the same bits as a 128-row block (on an Intel Xeon
with AMX, MKL's 576x1536 product: all of 16-1,024 rows) and the fewest, largest blocks are used. The probe's rows
sum huge terms that cancel (:func:`_probe_inputs`), so any change of summation order moves the result by far
more than an ulp, and a bf16 output's rounding no longer hides it: a bf16 576x1536 product summed in reverse
order changed 15 of 98,304 outputs of random rows (massive ones among them), and 93,887 of these rows'.

Architecture-agnostic: a torch function mode reroutes ``F.linear`` (every ``nn.Linear``) and matrix products written
with ``@`` while it is on, and the few element-wise functions whose vectorized and scalar paths round differently
where a tensor's last dimension is not a whole number of the CPU's vectors (:data:`ELEMENTWISE`; e.g. Qwen2-MoE's
one-column expert gate). The encoder has mixture-of-experts layers loop over their experts meanwhile
(:mod:`lm2vec.experts`), each a blocked product.
The lower-precision layers of :mod:`lm2vec.quantization` compute their float products (bf16, oneDNN) in the same
blocks (of the sizes probed alike); their integer products are exact and need none. Attention is the other half:
see :mod:`lm2vec.packing`; products of two activations laid out irregularly (shared key/value heads, strided views)
run text by text here (:func:`_batched_activations`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .hardware import measured_once

ROWS = 128  # the fixed row count of every product; measured invariant with MKL at 1 and 2 threads
# The row counts a probe compares with one large product: kernel choices change at small and power-of-two counts.
PROBE_ROWS = (1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1024)
# Block sizes besides ROWS that a row-count dependent kernel may still compute alike (probed): small ones spare short
# batches ROWS-row padding, large ones run kernels nearer their peak
SIZES = (16, 32, 64, 256, 512, 1024)
LADDER = tuple(sorted((ROWS, *SIZES)))
PROBE_VERSION = 3
BIG = 2.0**24  # the probe's cancelling terms: float32's ulp at BIG is 2, so order changes show in bf16 outputs too
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows, weight) -> rows @ weight.T (a linear layer)
# ATen computes an element-wise function in whole vectors and the tensor's last (numel mod vector width) elements on a
# scalar path that rounds these differently: where the last dimension is not a multiple of the vector width, which
# elements take it depends on how many rows there are.
ELEMENTWISE = frozenset(
    {torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh, torch.exp, torch.Tensor.exp}
    | {nn.functional.silu, nn.functional.gelu, nn.functional.softplus, nn.functional.mish}  # softplus: Laguna's gates
    | {nn.functional.elu, nn.functional.selu, nn.functional.celu}
)
LANES = 64  # elements: a multiple of every CPU vector width (AVX-512: 16 float32, 32 bf16)
# Products written with ``@`` (GPT-OSS's experts: each expert's tokens @ its (in, out) weight; Falcon's linear layers:
# a batch of token rows @ the transposed weight) in row blocks; products of two batched activations laid out
# irregularly (eager attention's over one shared key/value head) one text at a time.
MATMUL = frozenset({torch.matmul, torch.Tensor.matmul})  # `a @ b` arrives as Tensor.matmul
# Batched products by a stack of weights (Inkling's shared experts, Llama 4's and DeepSeek-V4's experts): each
# matrix's rows in blocks; attention's batched products (by other activations, not by weights) are left alone.
BMM = frozenset({torch.bmm, torch.Tensor.bmm})
_sizes: dict[tuple[str, int], tuple[int, ...]] = {}  # (probe, threads) -> measured here, this process


def in_row_blocks(kernel: Kernel, rows: torch.Tensor, weight: torch.Tensor, probe: str | None = None) -> torch.Tensor:
    """``kernel(rows, weight)`` for a linear layer's product, computed on blocks of fixed row counts (the last one
    zero-padded), so every row takes the same kernel whatever the row count. ``probe`` names the kernel and shape
    (e.g. ``"float32 576x1536"``): :func:`block_sizes` measures which counts compute rows alike, and the rows run in
    the largest of them (all of :data:`LADDER` where any count does). Without ``probe``: blocks of :data:`ROWS`
    rows."""
    count = rows.shape[0]
    if count == 0 or rows.device.type != "cpu":  # invariance is a CPU promise (GPU kernels: one product, fast)
        return kernel(rows, weight)
    # Where every count computes alike, still a few sizes: each new shape costs oneDNN a primitive and the allocator
    # fragments (one piece per pass: SciFact 958 against 855 MB peak, no faster).
    sizes = (block_sizes(probe, kernel, rows, weight) or LADDER) if probe else (ROWS,)
    parts, start = [], 0
    while start < count:
        size = _block_size(sizes, count - start)
        block = rows[start : start + size]
        if block.shape[0] < size:
            block = torch.cat([block, block.new_zeros(size - block.shape[0], block.shape[1])])
        parts.append(kernel(block, weight)[: count - start])
        start += size
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _block_size(sizes: tuple[int, ...], left: int) -> int:
    """The block for the ``left`` rows still to compute: the smallest of ``sizes`` that holds them where it pads at
    most a quarter more (or is the smallest), else the largest that fits."""
    holds = next((size for size in sizes if size >= left), None)
    if holds is not None and (4 * holds <= 5 * left or holds == sizes[0]):
        return holds
    return max(size for size in sizes if size <= left)


def block_sizes(probe: str, kernel: Kernel, rows: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    """The row counts (:data:`ROWS` and those of :data:`SIZES`, ascending) in whose products ``kernel`` gives every
    row the bits it gets in a product of :data:`ROWS` rows; ``()`` where any of :data:`PROBE_ROWS` does. Measured
    on :func:`_probe_inputs` shaped like ``rows`` and ``weight``, two offsets; once per machine and thread count,
    cached."""
    key = (probe, torch.get_num_threads())
    if key not in _sizes:
        x, w = _probe_inputs(rows, weight)
        measure = functools.partial(_probe_sizes, lambda block: kernel(block, w), x)
        _sizes[key] = tuple(measured_once("row-blocks", (PROBE_VERSION, probe), "sizes", measure))
    return _sizes[key]


def _probe_inputs(rows: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and an (out, in) weight like the given ones whose products sum huge terms that cancel exactly: the
    weight's input columns come in equal pairs, and each row holds +BIG and -BIG at three pairs. Which small terms
    the huge partial sums round away depends on the summation order, so a kernel's order shows in its results at
    any output precision."""
    generator = torch.Generator().manual_seed(0)
    count, features = PROBE_ROWS[-1] + ROWS, weight.shape[1]
    half = features // 2
    w = torch.randn(weight.shape, generator=generator)
    x = torch.randn(count, features, generator=generator)
    if half:  # a one-input layer has no pairs: random rows then
        order = torch.randperm(features, generator=generator)
        first, second = order[:half], order[half : 2 * half]
        w[:, second] = w[:, first]
        pairs = torch.randint(0, half, (count, 3), generator=generator)
        x.scatter_(1, first[pairs], BIG).scatter_(1, second[pairs], -BIG)
    return x.to(rows.device, rows.dtype), w.to(weight.device, weight.dtype).contiguous()


def _probe_sizes(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[int]:
    def alike(counts: tuple[int, ...], reference: torch.Tensor) -> list[int]:
        return [n for n in counts if all(torch.equal(product(x[a : a + n]), reference[a : a + n]) for a in (0, 3))]

    if len(alike(PROBE_ROWS, product(x))) == len(PROBE_ROWS):
        return []
    blocks = torch.cat([product(x[start : start + ROWS]) for start in range(0, x.shape[0] - ROWS + 1, ROWS)])
    return sorted({ROWS, *alike(SIZES, blocks)})


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed in row blocks of the sizes this machine's float32 kernel computes alike (probed)."""
    probe = f"float32 {weight.shape[1]}x{weight.shape[0]}"
    out = in_row_blocks(_mm_transposed, x.reshape(-1, x.shape[-1]), weight, probe)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _mm_transposed(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mm(rows, weight.t())


class BatchInvariant(TorchFunctionMode):
    """Within this context, float32 CPU linear layers use :func:`blocked_linear`, and ``torch.addmm`` (GPT-2's
    Conv1D layers), ``@`` products by one matrix (:data:`MATMUL`) and batched products by stacked weights
    (:data:`BMM`) blocks of :data:`ROWS` rows; ``@`` products of two batched activations laid out irregularly run
    one text at a time (inference only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and _applies(args[0], args[1]):
            return blocked_linear(*args, **kwargs)
        if func is torch.addmm and not kwargs and len(args) == 3 and _applies(args[1], args[2]):
            bias, rows, weight = args
            return in_row_blocks(functools.partial(torch.addmm, bias), rows, weight)
        if func in MATMUL and not kwargs and len(args) == 2 and _rows_by_matrix(*args):
            rows, matrix = args
            return in_row_blocks(torch.mm, rows.reshape(-1, rows.shape[-1]), matrix).reshape(*rows.shape[:-1], -1)
        if func in MATMUL and not kwargs and len(args) == 2 and _batched_activations(*args):
            return _text_by_text(func, *args)
        if func in BMM and not kwargs and len(args) == 2 and _rows_by_weights(*args):
            return torch.stack([in_row_blocks(torch.mm, rows, weight) for rows, weight in zip(*args, strict=True)])
        if func in ELEMENTWISE and len(args) == 1 and not kwargs.get("inplace") and _narrow(args[0]):
            return _in_whole_vectors(func, args[0], kwargs)
        return func(*args, **kwargs)


def _rows_by_matrix(a: object, b: object) -> bool:
    return (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() == 2 and _applies(a, b)
    )


def _batched_activations(a: object, b: object) -> bool:
    """Batched products of two activations that ``torch.matmul`` computes by another path for one text than for a
    batch: where an operand is broadcast over the other's batch dimensions (a key/value head shared by all query
    heads, a stride-0 view: a text alone is folded into one product of all its heads' rows, a batch is not) or laid
    out otherwise than densely (MiniMax's lightning attention on (batch, tokens, heads) views, Mamba's per-text
    vectors). Moved texts by 1e-7 to 2e-6; contiguous operands (a transposed one too) computed alike in any batch."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dim() == b.dim() >= 3
        and max(a.shape[0], b.shape[0]) > 1
        and (_irregular(a, b) or _irregular(b, a))
        and _applies(a, b)
    )


def _irregular(x: torch.Tensor, other: torch.Tensor) -> bool:
    """``x`` broadcast over a batch dimension of ``other`` (size 1 against more, or a stride-0 view), or neither
    contiguous nor a contiguous matrix transposed."""
    broadcast = any(other.shape[i] > 1 and (x.shape[i] == 1 or x.stride(i) == 0) for i in range(x.dim() - 2))
    return broadcast or not (x.is_contiguous() or x.transpose(-1, -2).is_contiguous())


def _text_by_text(func: Callable, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``func(a, b)`` one index of the leading (batch) dimension at a time: each text's product as if alone."""
    count = max(a.shape[0], b.shape[0])
    return torch.cat([func(a[i : i + 1] if len(a) > 1 else a, b[i : i + 1] if len(b) > 1 else b) for i in range(count)])


def _rows_by_weights(a: object, b: object) -> bool:
    """``b`` a stack of weight matrices: a 3D parameter or a view of one (``weight.transpose(1, 2)``)."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and b.dim() == 3
        and isinstance(b if b._base is None else b._base, nn.Parameter)
        and _applies(a, b)
    )


def _narrow(x: torch.Tensor) -> bool:
    return _applies(x, x) and x.dim() > 0 and x.shape[-1] % LANES != 0


def _in_whole_vectors(func: Callable, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``func(x)`` with the last dimension zero-padded to whole vectors, so every element takes the vector path."""
    width = x.shape[-1]
    return func(nn.functional.pad(x, (0, -width % LANES)), **kwargs)[..., :width]


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )
