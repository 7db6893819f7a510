"""Which precision each transformer block of a model can run in, measured on the model itself.

A block's tolerance is the model's, not the architecture's: the untrained bidirectional SmolLM2 turns one bf16 block
among its first twelve into texts at cosine 0.92 from float32 (which tokens grow massive activations is decided
there, and small errors tip it), while a trained encoder tolerates far more. So :func:`calibrate` measures, on the
packaged calibration sentences (``calibration.txt``, not from any evaluation set), each block alone in the
precisions of a *chain* (the kind asked for, then ``int8x2`` where this machine runs it faster than float32, then
float32, on oneDNN's kernels where those are faster), gives each block the first that keeps every text's embedding
within ``min_cosine`` of float32, then checks all blocks together and moves the least tolerant ones up the chain
until the whole model holds the bar (where int8x2 is much faster than float32, blocks raised to float32 then try it).
The answer, a plan (one kind per block), is cached per model (weights fingerprint) and chain.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm

from .blocks import block_modules, blocks
from .cache import atomic_write, cache_dir, cache_key
from .encoder import Encoder
from .quantization import (
    FLOAT32,
    ONEDNN,
    PRECISE,
    REPLAYED,
    Plan,
    linear_layers,
    linear_speeds,
    lowered_in_turn,
    smoothing_factors,
)

MIN_COSINE = 0.9998  # per calibration text, against float32; the bar on unseen texts is 0.99 (min), 0.999 (mean)
VERSION = 7  # bump when the procedure changes: cached answers are then measured again
# int8x2 this much faster than float32 pays for trying it again in blocks the search raised to float32 (a pass each):
# on an Intel Xeon without AMX, int8 the default's kind, maybe; not on the AMD EPYC Zen 4 (1.06x float32 on oneDNN)
MIDDLE_SPEEDUP = 1.3


def calibration_texts() -> list[str]:
    return files("lm2vec").joinpath("calibration.txt").read_text(encoding="utf-8").splitlines()


def float_kind() -> str:
    """float32 as this machine runs it fastest: on oneDNN's kernels where they beat torch's BLAS (AMD CPUs)."""
    return ONEDNN if linear_speeds().get(ONEDNN, 0.0) > 1.0 else "float32"


def chain(kind: str, device: str = "cpu") -> tuple[str, ...]:
    """The precisions a block may get when a model runs in ``kind`` on ``device`` (a device type), in the order
    tried: ``kind``, then ``int8x2`` where it measures faster than float32 here, then float32 (:func:`float_kind`).
    On a GPU: ``kind``, then float32 (this CPU's speeds and oneDNN's kernels say nothing of it)."""
    if device != "cpu":
        return (kind, "float32")
    speeds, top = linear_speeds(), float_kind()
    precise = (PRECISE,) if kind != PRECISE and speeds.get(PRECISE, 0.0) > speeds.get(top, 1.0) else ()
    return (kind, *precise, top)


def plan_speed(plan: Plan) -> float:
    """The plan's linear layers' speed relative to all-float32, from this machine's :func:`linear_speeds`."""
    speeds = linear_speeds() | {"float32": 1.0}
    return len(plan) / sum(1 / speeds[kind] for kind in plan) if plan else 1.0


def best_plan(encoder: Encoder, kinds: tuple[str, ...]) -> Plan:
    """The fastest (:func:`plan_speed`) of the calibrated plans of each of ``kinds``, all-float32 (:func:`float_kind`)
    if none is faster. Each kind is calibrated on its own (mixing int8 and bf16 blocks adds up their errors: on
    the built-in model, 11 blocks had to stay float32 and unseen texts fell to cosine 0.983), and only where
    running every block in it could beat the best plan found so far."""
    speeds = linear_speeds()
    best: Plan = (float_kind(),) * len(blocks(encoder.model))
    for kind in sorted(kinds, key=speeds.__getitem__, reverse=True):
        if speeds[kind] <= plan_speed(best):
            break
        plan = calibrate(encoder, kind)
        if plan_speed(plan) > plan_speed(best):
            best = plan
    return best


def calibrate(encoder: Encoder, kind: str, min_cosine: float = MIN_COSINE) -> Plan:
    """The precision of each block when the model runs in ``kind`` ("int8", "bfloat16") on its device; cached per
    model and device type.

    ``encoder`` must be float32; it is left as it was. Costs one encoding of 48 sentences per block and
    precision it needs, from that block on (the float32 blocks before it replay the reference pass), and a few
    whole encodings more, once per model and kind.
    """
    device = encoder.device.type
    texts, tried = calibration_texts(), chain(kind, device)
    key = cache_key(VERSION, device, tried, min_cosine, texts, encoder.fingerprint())
    path = cache_dir() / "calibration" / f"{'-'.join(tried)}-{key[:20]}.json"
    try:
        return tuple(json.loads(path.read_text())["plan"])
    except (OSError, ValueError, KeyError):
        pass
    plan = _measure(encoder, tried, texts, min_cosine)
    try:
        atomic_write(path, json.dumps({"chain": tried, "min_cosine": min_cosine, "plan": list(plan)}) + "\n")
    except OSError:
        pass  # a read-only cache: measured again next time
    return plan


def smoothing(encoder: Encoder, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
    """SmoothQuant's factors (:class:`~lm2vec.quantization.Int8Linear`) for every float linear layer of the blocks,
    from their inputs on the calibration texts; layers called on one input tensor (q/k/v, gate/up) share theirs."""
    model, texts = encoder.model, texts or calibration_texts()
    absmax: dict[str, torch.Tensor] = {}
    leader: dict[str, str] = {}  # each layer -> the first layer of the group sharing its input
    last: dict = {"input": lambda: None, "name": ""}

    def record(name: str):
        def hook(_module, args):
            x = args[0].detach()
            peak = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            absmax[name] = torch.maximum(absmax[name], peak) if name in absmax else peak
            if name not in leader:
                leader[name] = leader[last["name"]] if last["input"]() is args[0] else name
            last["input"], last["name"] = weakref.ref(args[0]), name

        return hook

    names = [name for block in blocks(model) for name in linear_layers(model, block)]
    hooks = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        ids, prefix = encoder.tokenization.tokenize([""] * len(texts), texts)
        encoder.embed_tokens(ids, prefix)
    finally:
        for handle in hooks:
            handle.remove()
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(leader.get(name, name), []).append(name)
    factors: dict[str, torch.Tensor] = {}
    for first, members in groups.items():
        if first not in absmax:
            continue
        layers = [cast(nn.Linear, model.get_submodule(name)) for name in members]  # linear_layers: nn.Linear, Conv1D
        shared = smoothing_factors(absmax[first], layers)
        factors |= dict.fromkeys(members, shared)
    return factors


def _measure(encoder: Encoder, kinds: tuple[str, ...], texts: list[str], min_cosine: float) -> Plan:
    description = f"Calibrating {kinds[0]} (once per model and machine)"
    encoder.packs()  # decided (by running the model) before smoothing's pass and the recorded one
    with encoder.batch_variant(), tqdm(desc=description, unit="pass", disable=not sys.stderr.isatty()) as bar:
        smooth = smoothing(encoder, texts) if "int8" in kinds else None
        trials = _Trials(encoder, texts, smooth)

        def worst(plan: Plan) -> float:
            bar.update()
            return trials.worst(plan)

        return _search(worst, len(trials.modules), kinds, min_cosine, linear_speeds())


class _Trials:
    """Calibration's passes over ``texts``: the float32 pass, recorded, then :meth:`worst` for each plan tried."""

    def __init__(self, encoder: Encoder, texts: list[str], smooth: dict[str, torch.Tensor] | None = None):
        self.encoder, self.smooth = encoder, smooth
        self.ids, self.prefix = encoder.tokenization.tokenize([""] * len(texts), texts)
        self.modules = block_modules(encoder.model)
        encoder.packs()  # (see _measure)
        with _recorded(encoder.model, self.modules) as self.recording:
            self.reference = self._embedded()

    def worst(self, plan: Plan) -> float:
        """The lowest cosine to float32 with the model run by ``plan``; the float32 blocks before its first lowered
        one replay their outputs (computed again, they would be the same bits) where the model runs its blocks once
        a pass, in order."""
        first = next((b for b, kind in enumerate(plan) if kind != "float32"), len(plan))
        start = first if self.recording.in_order() else 0
        replies = self.recording.outputs[:start]
        with _replayed(self.modules[:start], replies), lowered_in_turn(self.encoder.model, plan, self.smooth):
            return float((self._embedded() * self.reference).sum(-1).min())

    def _embedded(self) -> np.ndarray:
        return _normalized(self.encoder.embed_tokens(self.ids, self.prefix).numpy())


def _search(
    worst: Callable[[Plan], float], count: int, kinds: tuple[str, ...], min_cosine: float, speeds: dict[str, float]
) -> Plan:
    """The plan of :func:`calibrate`, ``worst(plan)`` giving a plan's lowest cosine to float32 and ``speeds`` each
    kind's speed (:func:`~lm2vec.quantization.linear_speeds`)."""

    def alone(block: int, kind: str) -> float:  # the block in ``kind``, every other in float32
        return 1.0 if kind in FLOAT32 else worst(tuple(kind if b == block else "float32" for b in range(count)))

    # Each block's first precision of the chain that holds alone (a more precise one is measured only if needed).
    cosines: list[list[float]] = [[] for _ in range(count)]
    for block, row in enumerate(cosines):
        while len(row) < len(kinds) and (not row or row[-1] < min_cosine):
            row.append(alone(block, kinds[len(row)]))
    start = [len(row) - 1 for row in cosines]
    # Errors add up: the moves up the chain, least tolerant first (a block's own moves in order), of which the
    # fewest that make the bar hold are made; a bisection, as each move brings the embeddings closer to float32.
    moves = sorted(
        (cosines[block][-1], level, block) for block in range(count) for level in range(start[block], len(kinds) - 1)
    )

    def plan_after(n: int) -> Plan:
        levels = list(start)
        for _, level, block in moves[:n]:
            levels[block] = level + 1
        return tuple(kinds[level] for level in levels)

    def holds(n: int) -> bool:  # all moves made: float32, trivially
        return n == len(moves) or worst(plan_after(n)) >= min_cosine

    plan = list(plan_after(bisect_left(range(len(moves) + 1), True, key=holds)))
    # The moves take a block all the way up before the next, so a block may end in float32 (the chain's top) where
    # its middle (int8x2, near float32) would do once later moves have made room. Where the middle is much faster,
    # each such block tries it (a pass each, most tolerant first) and keeps it if the whole model holds the bar.
    top = len(kinds) - 1
    if top > 1 and speeds.get(kinds[top - 1], 0.0) >= MIDDLE_SPEEDUP * speeds.get(kinds[top], 1.0):
        raised = [b for b in range(count) if plan[b] == kinds[top] and start[b] < top]
        for block in sorted(raised, key=lambda b: -cosines[b][-1]):
            plan[block] = kinds[top - 1]
            if worst(tuple(plan)) < min_cosine:
                plan[block] = kinds[top]
    return tuple(plan)


@dataclass
class _Recording:
    """What :func:`_recorded` saw: each block's outputs (copies) in call order, and the blocks each forward pass of
    the model ran, in order."""

    outputs: list[list[Any]]
    passes: list[list[int]] = field(default_factory=list)

    def in_order(self) -> bool:
        """Whether every pass ran each block at most once and in order, so that a block's outputs depend only on the
        blocks before it: not so in a looped model (Inkling 2 Loop runs its middle blocks again on their own outputs,
        HRM its stack in cycles), whose earlier blocks cannot be replayed while a later one runs lowered."""
        return all(a < b for calls in self.passes for a, b in itertools.pairwise(calls))


@contextlib.contextmanager
def _recorded(model: nn.Module, modules: list[nn.Module]) -> Iterator[_Recording]:
    """What the ``modules`` (the blocks of ``model``) output while inside, pass by pass."""
    recording = _Recording([[] for _ in modules])

    def keep(block: int) -> Callable[..., None]:
        def hook(_module, _args, out) -> None:
            recording.outputs[block].append(_copied(out))
            recording.passes[-1].append(block)

        return hook

    handles = [module.register_forward_hook(keep(block)) for block, module in enumerate(modules)]
    handles.append(model.register_forward_pre_hook(lambda *_: recording.passes.append([])))
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _replayed(modules: list[nn.Module], outputs: list[list[Any]]) -> Iterator[None]:
    """``modules`` return copies of their :func:`_recorded` outputs, in call order, instead of computing: a pass that
    changes nothing before a block need not run the blocks before it (half of calibration's block passes). Hooks
    still run; :data:`~lm2vec.quantization.REPLAYED` tells them no weights are read."""
    for module, kept in zip(modules, outputs, strict=True):
        replies = iter(kept)
        module.forward = lambda *_args, replies=replies, **_kwargs: _copied(next(replies))
        setattr(module, REPLAYED, True)
    try:
        yield
    finally:
        for module in modules:
            del module.forward
            delattr(module, REPLAYED)


def _copied(out: Any) -> Any:
    """``out`` with its tensors copied: a later block may change its input in place."""
    return tree_map_only(torch.Tensor, torch.clone, out)


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
