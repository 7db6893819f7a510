"""Which transformer blocks a lower-precision encoder must keep in float32, measured on the model itself.

A block's tolerance is the model's, not the architecture's: the untrained bidirectional SmolLM2 turns one bf16
block among its first twelve into texts at cosine 0.92 from float32 (which tokens grow massive activations is
decided there, and small errors tip it), while a trained encoder tolerates far more. So :func:`float_blocks`
measures: each block alone in lower precision, then all tolerant blocks together, on the packaged calibration
sentences (``calibration.txt``, not from any evaluation set), keeping every block whose error would take a
text's embedding below ``min_cosine`` of float32. The answer is cached per model (weights fingerprint).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from importlib.resources import files

import numpy as np
from torch import nn

from .cache import atomic_write, cache_dir, cache_key, fingerprint
from .encoder import Encoder
from .quantization import blocks, linear_layers, lower_precision

MIN_COSINE = 0.999  # per calibration text, against float32; the bar on unseen texts is 0.99 (min), 0.999 (mean)
VERSION = 1  # bump when the procedure changes: cached answers are then measured again


def calibration_texts() -> list[str]:
    return files("lm2vec").joinpath("calibration.txt").read_text(encoding="utf-8").splitlines()


def float_blocks(encoder: Encoder, kind: str, min_cosine: float = MIN_COSINE) -> tuple[int, ...]:
    """The blocks to keep in float32 when the rest run in ``kind`` ("int8", "bfloat16"); cached per model.

    ``encoder`` must be float32; it is left as it was. Costs one encoding of 48 sentences per block and a few
    more, once per model and kind.
    """
    texts = calibration_texts()
    key = cache_key(VERSION, kind, min_cosine, texts, fingerprint(encoder))
    path = cache_dir() / "calibration" / f"{kind}-{key[:20]}.json"
    try:
        return tuple(json.loads(path.read_text())["float_blocks"])
    except (OSError, ValueError, KeyError):
        pass
    keep = _measure(encoder, kind, texts, min_cosine)
    try:
        atomic_write(path, json.dumps({"kind": kind, "min_cosine": min_cosine, "float_blocks": list(keep)}) + "\n")
    except OSError:
        pass  # a read-only cache: measured again next time
    return keep


def _measure(encoder: Encoder, kind: str, texts: list[str], min_cosine: float) -> tuple[int, ...]:
    ids, prefix = encoder.tokenization.tokenize([""] * len(texts), texts)
    reference = _normalized(encoder.embed_tokens(ids, prefix).numpy())
    count = len(blocks(encoder.model))

    def worst(keep: set[int]) -> float:
        """The lowest cosine to float32 with every block but ``keep`` in lower precision."""
        model = encoder.model
        originals = {name: model.get_submodule(name) for name in linear_layers(model)}
        lower_precision(model, kind, tuple(sorted(keep)))
        try:
            embeddings = _normalized(encoder.embed_tokens(ids, prefix).numpy())
        finally:
            _restore(model, originals)
        return float((embeddings * reference).sum(-1).min())

    alone = {block: worst(set(range(count)) - {block}) for block in range(count)}
    keep = {block for block, cosine in alone.items() if cosine < min_cosine}
    tolerant = sorted(set(range(count)) - keep, key=lambda block: alone[block])  # least tolerant first

    def holds(n: int) -> bool:  # with the n least tolerant also kept (all kept: float32, trivially)
        return n == len(tolerant) or worst(keep | set(tolerant[:n])) >= min_cosine

    # Errors add up: also keep the fewest of the least tolerant that make the bar hold; a bisection, as keeping
    # more blocks only brings the embeddings closer to float32.
    extra = bisect_left(range(len(tolerant) + 1), True, key=holds)
    return tuple(sorted(keep | set(tolerant[:extra])))


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
