"""Where a decoder's transformer blocks are: the unit that attention is verified in and precision is planned for."""

from __future__ import annotations

from torch import nn


def blocks(model: nn.Module) -> list[str]:
    """The name prefixes of the model's transformer blocks (``layers.0.``, ``h.0.``, ...): the longest ModuleList."""
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    size, name = max(lists)
    return [f"{name}.{i}." for i in range(size)]


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks themselves, in the order of :func:`blocks`."""
    return [model.get_submodule(prefix.rstrip(".")) for prefix in blocks(model)]
