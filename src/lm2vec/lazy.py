"""Package attributes imported on first use (PEP 562), so that importing a package stays light."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_attributes(package: str, homes: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``: ``homes`` maps each name to its module (relative to the
    package), imported when the name is first asked for."""

    def __getattr__(name: str) -> object:
        if name in homes:
            return getattr(import_module(f"{package}.{homes[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
