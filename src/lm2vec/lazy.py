"""Package attributes imported on first use (PEP 562), so that importing a package stays light."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.util import find_spec


def lazy_attributes(package: str, homes: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``: ``homes`` maps each name to its module (relative to the
    package), imported when the name is first asked for. A submodule's name gives the submodule, as it would after
    an eager package's imports (``import lm2vec; lm2vec.loading``)."""

    def __getattr__(name: str) -> object:
        if name in homes:
            return getattr(import_module(f"{package}.{homes[name]}"), name)
        if not name.startswith("_") and find_spec(f"{package}.{name}") is not None:
            return import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
