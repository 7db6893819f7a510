"""Where a decoder's transformer blocks are: the unit that attention is verified in and precision is planned for."""

from __future__ import annotations

from torch import nn


def blocks(model: nn.Module) -> list[str]:
    """The name prefixes of the model's transformer blocks (``layers.0.``, ``h.0.``, ...): the longest ModuleList not
    inside another (a block's list of experts may be longer than the model's list of blocks)."""
    lists = {name: len(m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)}
    outer = [(size, name) for name, size in lists.items() if not any(name.startswith(f"{o}.") for o in lists)]
    if not outer:
        return []
    size, name = max(outer)
    return [f"{name}.{i}." for i in range(size)]


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks themselves, in the order of :func:`blocks`."""
    return [model.get_submodule(prefix.rstrip(".")) for prefix in blocks(model)]
