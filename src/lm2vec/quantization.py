"""Linear layers in lower precision, block by block: each block of a model gets one of :data:`KINDS`.

- :class:`Int8Linear` ("int8"): weights quantized once per output channel, activations per token (row) at run
  time, after SmoothQuant's per-channel smoothing where calibration measured the inputs (:func:`smoothing_factors`,
  :func:`lm2vec.calibration.smoothing`), the product done in integers (``torch._int_mm``: VNNI / AMX-int8 kernels
  on CPU) and scaled back to float32. Per-token scales keep LLMs' massive activations from crushing other tokens'
  resolution, and integer products are exact, so a text's embedding is bit-identical in any batch.
- :class:`Bf16Linear` ("bfloat16"): bf16 weights and inputs, float32 out, so the residual stream, norms and
  attention stay float32; the layers that open an MLP (:data:`MLP_INPUTS`) hand their bf16 outputs on, so the
  activation between them and the MLP's output projection runs in bf16 with no cast either way.
- :class:`Int8x2Linear` ("int8x2"): weights and activations as two int8 levels each (a value and its rounding
  error, 254 times finer: ~16 bits), three int8 products, exact int32 sums. For the blocks that neither bf16 nor
  int8 can carry: near float32 (per-text cosine 0.99999 where all-bf16 gives 0.70 on the untrained built-in
  model) at twice the float32 speed on CPUs with VNNI.
- :class:`OneDnnLinear` ("float32-onednn"): the float32 layer computed by oneDNN's kernels instead of torch's
  BLAS (MKL), which takes a slower path on AMD CPUs (Zen 5: 0.19 against 0.43 TFLOP/s); float32 throughout.
- "float32": the layer as it was.

A mixture-of-experts layer's experts, stored as 3D weights, become a layer per expert in their block's kind
(:class:`~lm2vec.experts.ExpertLinears`): they hold most of such a model's weights.

How fast each kind runs on this machine is measured once and cached (:func:`linear_speeds`): ``dtype="auto"`` and
calibration choose by it.

The float products (bf16, float32 on oneDNN) run in blocks of the row counts this machine measures alike for the
kernel and shape (:func:`~lm2vec.invariance.in_row_blocks`), and the integer ones
are exact, so a token's result never depends on how many rows share its product.

Which blocks may run in which is the model's to say, not a rule's: on the untrained bidirectional SmolLM2, one
bf16 block among the first twelve moves some texts' embeddings to cosine 0.92 from float32, while any of the
later ones stays above 0.998 (docs/performance.md). :mod:`lm2vec.calibration` measures it per model and
:func:`lower_precision` applies its answer, a *plan*: one kind per block.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Generic, TypeVar, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .blocks import block_modules, blocks
from .experts import ExpertLinears, is_fused_experts
from .hardware import fast_int8, measured_once
from .invariance import in_row_blocks

LINEAR = (nn.Linear, Conv1D)  # GPT-2-style models use Conv1D, a linear layer with its weight transposed
LOWER = ("int8", "bfloat16")  # what dtype= may ask for below float32 (int8x2 is for the blocks they cannot carry)
ONEDNN = "float32-onednn"
FLOAT32 = ("float32", ONEDNN)  # float32 kinds: nothing rounded below float32
KINDS = ("float32", ONEDNN, "bfloat16", "int8", "int8x2")  # what a block can run in, see lower_precision()
PRECISE = "int8x2"  # the near-float32 kind for blocks that cannot run in bf16 or int8
HALF = (torch.bfloat16, torch.float16)  # the 16-bit floats checkpoints store weights in; float32 holds each exactly

QMAX = 127
LOW = 254  # the second int8 level's step: the first level's step / LOW (|rounding error| <= step / 2)
SPEED_SHAPE = (256, 576, 1536)  # tokens x in x out: one MLP projection of a small LLM's batch
SPEED_VERSION = 3  # bump when what linear_speeds() measures changes
SCHEME = "lower-v6"  # names the cached layout of lowered models: change it when a layout changes (6: experts)
# The linear layers that open a transformer block's MLP, by transformers' names (Llama and most since; Phi-3 and GLM
# fuse two, as ModernBERT's Wi; Phi; GPT-2 and StarCoder2; GPT-J and CodeGen; GPT-NeoX): their outputs pass only an
# element-wise activation (and a product with each other) into the MLP's output projection. In a bf16 block they keep
# their bf16 outputs: casting them to float32 and the activation's result back to bf16 cost 2-4% of a trained all-bf16
# SmolLM2's encoding time (1000 STS-B sentences, Zen 4, profiled) for no accuracy (cosine to float32 unchanged to 5
# digits); calibration measures blocks so.
MLP_INPUTS = frozenset({"gate_proj", "up_proj", "gate_up_proj", "fc1", "fc_in", "c_fc", "dense_h_to_4h", "Wi"})
Plan = tuple[str, ...]  # one of KINDS per transformer block
Quantized = tuple[torch.Tensor, torch.Tensor]  # int8 values, float32 scale per row
T = TypeVar("T")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, float32 scale per row). No clamp needed: |x / scale| <= 127."""
    x = x.float()
    absmax = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())  # faster than abs().amax()
    scale = absmax.clamp_min_(1e-8).div_(QMAX)
    return (x * scale.reciprocal()).round_().to(torch.int8), scale


def quantize_rows2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two int8 levels per row: ``[high | low]`` of shape (rows, 2 * columns) and the float32 scale per row, with
    ``x ~= scale * (high + low / LOW)`` (about 16 bits: the low level quantizes the high level's rounding error)."""
    x = x.float()
    high, scale = quantize_rows(x)
    low = (x - high * scale).mul_(LOW / scale).round_().to(torch.int8)  # |error / scale| <= 1/2: |low| <= 127
    return torch.cat([high, low], -1), scale


def int_product(q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``q @ weight_t`` of int8 matrices as int32. Without int8 dot-product instructions torch's kernel runs
    ~40x slower than float32 (AVX2-only CPUs), so there the same exact integers come from a float64 product."""
    if q.device.type != "cpu" or fast_int8():
        return torch._int_mm(q, weight_t)
    return torch.mm(q.double(), weight_t.double()).to(torch.int32)  # |sums| < 2^31 << 2^53: exact


def _float_weight(linear: nn.Linear | Conv1D) -> torch.Tensor:
    weight = linear.weight.detach()
    return weight.t() if isinstance(linear, Conv1D) else weight  # Conv1D stores (in, out)


class _LastInput(Generic[T]):
    """The most recent converted input. q/k/v (and gate/up) projections are called on one tensor object, so one
    conversion (quantization, bf16 cast) serves them all; a new tensor (even at a reused address) is converted
    afresh, as is one a layer multiplies by other input scales first (see :class:`Int8Linear`). The input is held
    weakly: keeping it would keep each layer's input alive until the next layer's."""

    def __init__(self, convert: Callable[[torch.Tensor], T]):
        self._convert = convert
        self.key: tuple | None = None
        self.value: T | None = None

    def get(self, x: torch.Tensor, features: int, input_scale: torch.Tensor | None = None) -> T:
        value, key = self.value, self.key
        if (
            value is None
            or key is None
            or key[0]() is not x
            or key[1:3] != (x.data_ptr(), x.shape)
            or not _same(key[3], input_scale)
        ):
            rows = x.reshape(-1, features)
            value = self._convert(rows if input_scale is None else rows * input_scale)
            self.key, self.value = (weakref.ref(x), x.data_ptr(), x.shape, input_scale), value
        return value


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


def _to_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


class _FrozenLinear(nn.Module):
    """What every converted layer keeps of the ``nn.Linear`` (or Conv1D) it replaces: its sizes and its bias (in
    ``bias_dtype``); :meth:`_take` returns the float weight, (out, in), to convert."""

    kind = "float32"
    bias: torch.Tensor | None

    def _take(self, linear: nn.Linear | Conv1D, bias_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        float_weight = _float_weight(linear)
        self.out_features: int = float_weight.shape[0]
        self.in_features: int = float_weight.shape[1]
        self.register_buffer("bias", linear.bias.detach().to(bias_dtype) if linear.bias is not None else None)
        return float_weight

    @property
    def probe(self) -> str:
        """The kernel and shape, as :func:`~lm2vec.invariance.in_row_blocks` probes the layer's float product."""
        return f"{self.kind} {self.in_features}x{self.out_features}"

    def _finish(self, out: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The bias added (float32 outputs), back in ``x``'s shape and in ``dtype`` (default: ``x``'s)."""
        if self.bias is not None and out.dtype == torch.float32:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(dtype or x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class Int8Linear(_FrozenLinear):
    """A frozen ``nn.Linear`` with int8 weights (per output channel) and per-token int8 activations.

    ``smooth``, a factor per input channel (SmoothQuant, Xiao et al. 2023): the weight's columns are multiplied by
    it before quantizing and the input divided by it at run time, the same product, with the activations' outlier
    channels moved into the weights, where per-channel scales absorb them (:func:`smoothing_factors`).
    """

    kind = "int8"
    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor

    def __init__(
        self,
        linear: nn.Linear | Conv1D,
        last_input: _LastInput[Quantized] | None = None,
        smooth: torch.Tensor | None = None,
    ):
        super().__init__()
        self.last_input = last_input or _LastInput(quantize_rows)
        float_weight = self._take(linear).float()
        smooth = torch.ones_like(float_weight[0]) if smooth is None else smooth.float()  # (on the meta device too)
        weight, scale = quantize_rows(float_weight * smooth)
        self.register_buffer("weight_t", weight.t().contiguous())  # (in, out): _int_mm's layout
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        self.register_buffer("input_scale", smooth.reciprocal())

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer stands for, (out, in), from its int8 values: for model code that reads a
        layer's weight rather than calling it (HunYuan-MoE's router checks its dtype; Jamba's Mamba multiplies by
        ``dt_proj.weight``)."""
        return self.weight_t.t().float() * self.weight_scale.t() * self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.last_input.get(x, self.in_features, self.input_scale)
        out = int_product(q, self.weight_t) * scale  # int32 x float32 -> float32, one pass
        return self._finish(out.mul_(self.weight_scale), x)


def smoothing_factors(
    input_absmax: torch.Tensor, layers: Sequence[nn.Linear | Conv1D], alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant's factor per input channel for the layers that share one input: ``max|x_j|^alpha /
    max|W_:,j|^(1 - alpha)`` over the layers' weights, so activations and weights split the outliers; relative to
    the median channel and never below it, so that no channel quiet on the calibration texts is amplified (a text
    that is loud there would otherwise crush the rest of its row)."""
    weight_absmax = torch.stack([_float_weight(layer).float().abs().amax(0) for layer in layers]).amax(0)
    factors = input_absmax.float().clamp_min(1e-5).pow(alpha) / weight_absmax.clamp_min(1e-5).pow(1 - alpha)
    return (factors / factors.median()).clamp_min(1.0)


class Int8x2Linear(_FrozenLinear):
    """A frozen ``nn.Linear`` in two int8 levels (see :func:`quantize_rows2`): ``high @ high`` plus
    ``[high | low] @ [low ; high] / LOW`` (the ``low @ low`` term, 2^-16 of the rest, is left out)."""

    kind = "int8x2"
    weight_t: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear | Conv1D, last_input: _LastInput[Quantized] | None = None):
        super().__init__()
        self.last_input = last_input or _LastInput(quantize_rows2)
        weight, scale = quantize_rows2(self._take(linear))  # (out, 2 * in): [high | low]
        high, low = weight.split(self.in_features, dim=1)
        self.register_buffer("weight_t", torch.cat([low.t(), high.t()]).contiguous())  # (2 * in, out): [low ; high]
        self.register_buffer("weight_scale", scale.reshape(1, -1))

    @property
    def weight(self) -> torch.Tensor:
        """The float weight, (out, in), from its two levels (see :attr:`Int8Linear.weight`)."""
        low, high = self.weight_t.float().split(self.in_features)
        return (high + low / LOW).t() * self.weight_scale.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.last_input.get(x, self.in_features)  # (rows, 2 * in): [high | low]
        high = q[:, : self.in_features].contiguous()
        cross = int_product(q, self.weight_t)  # high @ low + low @ high
        out = int_product(high, self.weight_t[self.in_features :]).float()  # high @ high
        return self._finish(out.add_(cross.float(), alpha=1 / LOW).mul_(scale).mul_(self.weight_scale), x)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnLinear(_FrozenLinear):
    """A frozen ``nn.Linear`` in float32 on oneDNN's kernels (the op torch's own compiler uses for CPU linear
    layers): the same precision, summed in another order, twice as fast where MKL holds back (AMD CPUs)."""

    kind = ONEDNN
    weight: torch.Tensor

    def __init__(self, linear: nn.Linear | Conv1D):
        super().__init__()
        self.register_buffer("weight", self._take(linear).float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        return self._finish(in_row_blocks(_onednn_product, rows, self.weight, self.probe), x)


def _onednn_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")


class Bf16Linear(_FrozenLinear):
    """A frozen ``nn.Linear`` computed in bf16 (bf16 weights, the input cast once for the layers sharing it),
    returning float32: the product runs at the bf16 rate while everything between linear layers stays float32.
    ``bf16_output``: return the product's bf16 (for the layers of :data:`MLP_INPUTS`, whose outputs feed only an
    activation on the way to the next bf16 layer)."""

    kind = "bfloat16"
    weight_bf16: torch.Tensor

    def __init__(
        self, linear: nn.Linear | Conv1D, last_input: _LastInput[torch.Tensor] | None = None, bf16_output: bool = False
    ):
        super().__init__()
        self.last_input = last_input or _LastInput(_to_bf16)
        self.bf16_output = bf16_output
        self.register_buffer("weight_bf16", self._take(linear, torch.bfloat16).to(torch.bfloat16).contiguous())

    @property
    def weight(self) -> torch.Tensor:
        """The weight in float32, the precision the layer takes and returns (see :attr:`Int8Linear.weight`): model
        code that casts its states to a layer's weight dtype keeps them float32 (ERGO's branches)."""
        return self.weight_bf16.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.last_input.get(x, self.in_features)
        out = in_row_blocks(self._product, rows, self.weight_bf16, self.probe)
        # a bf16 input comes from an MLP's opening layers: the MLP's output returns to float32, the residual stream's
        return self._finish(out, x, torch.bfloat16 if self.bf16_output else torch.promote_types(x.dtype, torch.float32))

    def _product(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(rows, weight, self.bias)


def linear_speeds() -> dict[str, float]:
    """Throughput of a model-sized linear layer per precision, relative to float32 (float32 = 1.0).

    Measured on the layers the encoder runs (``nn.Linear`` and this module's layers with their activation
    quantization), best of 20 alternating rounds, once per machine, torch version and thread count
    (~1 s), and cached in ``<cache>/hardware/``.
    """
    return measured_once("linear-speeds", (SPEED_VERSION,), "speeds", _measure_linear_speeds)


def _measure_linear_speeds(rounds: int = 20) -> dict[str, float]:
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


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or Conv1D, or a subclass whose forward computes the same product (Falcon's layers), as run on
    three rows. A subclass that computes anything else keeps its forward, which a lowered or LoRA-wrapped layer would
    not run: Phi-MoE's and Llama 4's routers are ``nn.Linear`` layers that return the experts they pick."""
    if type(module) in LINEAR:
        return True
    if not isinstance(module, LINEAR):
        return False
    weight = _float_weight(module)
    x = torch.linspace(-1, 1, 3 * weight.shape[1], device=weight.device).cos().reshape(1, 3, -1).to(weight.dtype)
    with torch.no_grad():
        try:
            out = module.forward(x)  # without the hooks a call runs
        except (RuntimeError, ValueError, TypeError, IndexError):  # a forward that takes inputs of another shape
            return False
        product = nn.functional.linear(x, weight, module.bias)
    same = isinstance(out, torch.Tensor) and out.shape == product.shape
    return same and (weight.is_meta or torch.allclose(out, product, rtol=1e-3, atol=1e-5))  # meta: the cached load


def linear_layers(model: nn.Module, block: str = "") -> list[str]:
    """Names of the float linear layers (in ``block`` if given), the LM head excepted."""
    return [
        name
        for name, module in model.named_modules()
        if is_linear(module) and f"{name}.".startswith(block) and "lm_head" not in name
    ]


def lower_precision(
    model: nn.Module,
    kind: str | Sequence[str],
    keep: tuple[int, ...] = (),
    smoothing: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put the linear layers in lower precision, in place, the LM head excepted. ``kind``: one of :data:`KINDS`
    for every block but those numbered in ``keep`` (float32), or a plan: one kind per block. ``smoothing``: the
    int8 layers' factors per input channel, by layer name (:class:`Int8Linear`). Returns the model."""
    plan = tuple("float32" if i in keep else k for i, k in enumerate(_plan(model, kind)))
    targets = _targets(model, plan)
    if not plan or not targets and set(plan) != {"float32"}:
        raise ValueError("the model has no transformer blocks with nn.Linear layers to put in lower precision")
    _replace(model, targets, smoothing)
    return model


def _plan(model: nn.Module, kind: str | Sequence[str]) -> Plan:
    """``kind`` as a plan for ``model``: one kind per block; a ValueError where it is none."""
    prefixes = blocks(model)
    if isinstance(kind, str) and kind not in KINDS:
        raise ValueError(f"unknown precision {kind!r}; choose one of {KINDS}")
    plan = (kind,) * len(prefixes) if isinstance(kind, str) else tuple(kind)
    if len(plan) != len(prefixes) or set(plan) - set(KINDS):
        raise ValueError(f"a plan names one of {KINDS} for each of the {len(prefixes)} blocks, got {kind!r}")
    return plan


def _targets(model: nn.Module, plan: Plan) -> dict[str, str]:
    """Each linear layer and fused experts module (:func:`~lm2vec.experts.is_fused_experts`) a plan lowers, by name,
    and its kind."""
    return {  # each block's own modules, walked once
        name: kind
        for kind, prefix in zip(plan, blocks(model), strict=True)
        if kind != "float32"
        for name, module in model.get_submodule(prefix[:-1]).named_modules(prefix=prefix[:-1])
        if is_linear(module) or is_fused_experts(module)
    }


def _replace(model: nn.Module, targets: dict[str, str], smoothing: dict[str, torch.Tensor] | None) -> None:
    """Swap each named linear layer (or fused experts module: a layer per expert) for its converted kind; layers
    converted together share their input's conversion (:class:`_LastInput`)."""
    makers: dict[str, Callable[..., nn.Module]] = {
        "int8": functools.partial(Int8Linear, last_input=_LastInput(quantize_rows)),
        "int8x2": functools.partial(Int8x2Linear, last_input=_LastInput(quantize_rows2)),
        "bfloat16": functools.partial(Bf16Linear, last_input=_LastInput(_to_bf16)),
        ONEDNN: OneDnnLinear,
    }
    smoothing = smoothing or {}
    for name, layer_kind in targets.items():  # by name: each float layer is freed as soon as it is replaced
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        if is_fused_experts(module):  # a layer per expert, in the block's kind
            setattr(parent, child, ExpertLinears(module, makers[layer_kind]))
            continue
        extra: dict = {"smooth": smoothing[name]} if layer_kind == "int8" and name in smoothing else {}
        if layer_kind == "bfloat16":
            extra["bf16_output"] = child in MLP_INPUTS
        setattr(parent, child, makers[layer_kind](module, **extra))


def _put_back(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


@contextlib.contextmanager
def lowered(
    model: nn.Module, kind: str | Sequence[str], smoothing: dict[str, torch.Tensor] | None = None
) -> Iterator[nn.Module]:
    """``model`` run by :func:`lower_precision` (``kind``: a kind or a plan) inside the block, its own linear layers
    put back afterwards: for running a float32 model on faster kernels for a while (scoring during training)."""
    originals = {name: model.get_submodule(name) for name in _targets(model, _plan(model, kind))}
    try:
        yield lower_precision(model, kind, smoothing=smoothing)
    finally:
        _put_back(model, originals)


@contextlib.contextmanager
def lowered_in_turn(model: nn.Module, plan: Plan, smoothing: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """The model's forward passes run by ``plan`` inside the block, as in :func:`lowered`, but each block's layers
    are converted as the block starts and dropped when it ends: measuring a plan then holds one block's converted
    weights besides the float model instead of nearly a model's worth (calibrating a 7B model in bf16: up to 14 GB
    less), for converting each block once a forward pass (the few passes of calibration: negligible)."""
    targets = _targets(model, _plan(model, plan))
    originals: dict[str, nn.Module] = {}

    def convert(prefix: str) -> Callable[..., None]:
        layers = {name: kind for name, kind in targets.items() if name.startswith(prefix)}

        def hook(*_) -> None:
            originals.update((name, model.get_submodule(name)) for name in layers)
            _replace(model, layers, smoothing)

        return hook

    def restore(*_) -> None:
        _put_back(model, originals)
        originals.clear()

    handles = []
    for prefix, block in zip(blocks(model), block_modules(model), strict=True):
        handles += [block.register_forward_pre_hook(convert(prefix)), block.register_forward_hook(restore)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        restore()  # a pass that failed inside a block


# Set (True) on a block whose forward returns recorded outputs instead of computing (calibration's replays): it reads
# no weights, so :func:`float32_in_turn` does not make them float32 for it.
REPLAYED = "lm2vec_replayed"


@contextlib.contextmanager
def float32_in_turn(model: nn.Module) -> Iterator[None]:
    """A model loaded in the 16-bit float its checkpoint stores (:data:`HALF`) runs as its float32 self inside the
    block, holding one block in float32 at a time: what lies outside the blocks is made float32 on entry, each block's
    weights while it runs (copied into the float32 buffers the block before used, its 16-bit weights put back after);
    on exit what is still 16-bit is made float32, but for the lower-precision layers made inside. Exact (float32 holds
    every 16-bit float), so calibration and lowering inside give what they give on the model loaded in float32,
    without it: for a 7B model stored in bf16, 14 GB and a block instead of 28 GB. A float32 model is left as is."""
    modules = block_modules(model)
    _to_float32(model, skip={id(t) for block in modules for t in _tensors(block)})
    kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    spare: dict[tuple, list[torch.Tensor]] = {}  # the float32 buffers of the last block run, by shape and device

    def upcast(block: int) -> Callable[..., None]:
        def hook(*_) -> None:
            if getattr(modules[block], REPLAYED, False):
                return  # its weights are not read
            kept[block] = _to_float32(modules[block], spare=spare.copy())
            spare.clear()  # those not taken: shapes of another kind of block

        return hook

    def put_back(block: int) -> None:
        for tensor, half in kept.pop(block, ()):
            spare.setdefault((tensor.shape, tensor.device), []).append(tensor.data)
            tensor.data = half

    handles = []
    for index, block in enumerate(modules):
        handles.append(block.register_forward_pre_hook(upcast(index)))
        handles.append(block.register_forward_hook(lambda *_, index=index: put_back(index)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for index in list(kept):  # a pass that failed inside a block
            put_back(index)
        spare.clear()
        _to_float32(model)
        for module in [m for m in model.modules() if parametrize.is_parametrized(m)]:  # weights computed on access
            for name in list(cast(nn.ModuleDict, module.parametrizations)):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        if isinstance(config := getattr(model, "config", None), PretrainedConfig):
            config.dtype = torch.float32  # as a float32 load says (transformers set the dtype it loaded in)


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The weights and buffers of ``module`` and its children, the lower-precision layers' excepted."""
    for child in module.modules():
        if not isinstance(child, _FrozenLinear):
            yield from (t for t in [*child._parameters.values(), *child._buffers.values()] if t is not None)


def _to_float32(
    module: nn.Module, skip: Collection[int] = (), spare: dict[tuple, list[torch.Tensor]] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Make the 16-bit float weights and buffers of ``module`` float32 in place (tied ones once), those whose ``id``
    is in ``skip`` excepted, each copied into a ``spare`` float32 buffer of its shape where there is one (a copy
    runs ~8x faster than a new tensor's first touch); each one changed, with its 16-bit data."""
    changed = []
    for tensor in _tensors(module):
        if tensor.dtype in HALF and id(tensor) not in skip:
            buffers = spare.get((tensor.shape, tensor.device)) if spare else None
            changed.append((tensor, tensor.data))
            tensor.data = buffers.pop().copy_(tensor.data) if buffers else tensor.data.float()
    return changed


def block_plan(model: nn.Module) -> Plan:
    """The kind each block runs in (see :func:`lower_precision`); "float32" for blocks without lower layers."""
    plan = []
    for block in block_modules(model):
        kinds = {m.kind for m in block.modules() if isinstance(m, _FrozenLinear)}
        plan.append(kinds.pop() if len(kinds) == 1 else "float32")
    return tuple(plan)


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, the converted layers' weights and biases included: those are buffers, not
    ``nn.Parameter``s, so ``model.parameters()`` alone undercounts a lowered model."""
    frozen = [m for m in model.modules() if isinstance(m, _FrozenLinear)]
    weights = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in frozen)
    return sum(p.numel() for p in model.parameters()) + weights


def lower_kind(model: nn.Module) -> str | None:
    """The model's lower precision: of "int8" and "bfloat16", the one more blocks run in; else "int8x2" or
    "float32-onednn"; None for none (see :func:`block_plan` for each block's)."""
    plan = [kind for kind in block_plan(model) if kind != "float32"]
    fast = [kind for kind in plan if kind in LOWER]
    return max(fast or plan, key=(fast or plan).count) if plan else None
