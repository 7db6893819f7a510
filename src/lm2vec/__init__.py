"""lm2vec: any decoder-only LLM as a verified bidirectional text encoder (the LLM2Vec recipe)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from .choices import PoolingMode
from .lazy import lazy_attributes

if TYPE_CHECKING:
    from .attention import AttentionError, set_bidirectional, verify_attention
    from .encoder import Encoder
    from .loading import BUILTIN_MODEL, ModelLoadError, load

# Imported on first use: `import lm2vec` (and so `lm2vec --help`) does not wait for torch and transformers.
__getattr__ = lazy_attributes(
    __name__,
    {
        "AttentionError": "attention",
        "set_bidirectional": "attention",
        "verify_attention": "attention",
        "Encoder": "encoder",
        "BUILTIN_MODEL": "loading",
        "ModelLoadError": "loading",
        "load": "loading",
    },
)

__all__ = [
    "BUILTIN_MODEL",
    "AttentionError",
    "Encoder",
    "ModelLoadError",
    "PoolingMode",
    "load",
    "set_bidirectional",
    "verify_attention",
]
try:
    __version__ = version("lm2vec")  # one source: pyproject.toml, through the installed metadata
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"
