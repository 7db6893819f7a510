"""lm2vec: any decoder-only LLM as a verified bidirectional text encoder (the LLM2Vec recipe)."""

from importlib.metadata import PackageNotFoundError, version

from .attention import AttentionError, set_bidirectional, verify_attention
from .encoder import Encoder
from .loading import BUILTIN_MODEL, ModelLoadError, load
from .pooling import PoolingMode

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
