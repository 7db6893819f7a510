"""lm2vec: any decoder-only LLM as a verified bidirectional text encoder (the LLM2Vec recipe)."""

from .attention import AttentionError, set_bidirectional, verify_attention
from .encoder import Encoder, load
from .loading import BUILTIN_MODEL, ModelLoadError
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
__version__ = "0.1.0"
