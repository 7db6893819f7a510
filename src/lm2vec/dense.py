"""sentence-transformers' Dense module: a linear layer and an activation after the pooling.

Decoder embedding models project their pooled state with one or more of them (EmbeddingGemma: 768 -> 3072 -> 768,
stella: to 1,024 dimensions); the encoder runs them as sentence-transformers does (:meth:`lm2vec.Encoder.project`)
and saves them back in the same layout: ``config.json`` and ``model.safetensors`` (weights named ``linear.weight``,
``linear.bias``, ``residual.weight``); :mod:`lm2vec.loading.saved` reads them (safetensors only, the activation a
``torch.nn`` class).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

WEIGHTS = "model.safetensors"


class Dense(nn.Module):
    """``activation(linear(x))``, plus ``x`` (or its projection) with ``use_residual``: sentence-transformers' Dense."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: nn.Module | None = None,
        use_residual: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features, self.use_residual = in_features, out_features, use_residual
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation = nn.Tanh() if activation is None else activation  # sentence-transformers' default
        projected = use_residual and in_features != out_features
        self.residual = nn.Linear(in_features, out_features, bias=False) if projected else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out

    def save(self, folder: Path) -> None:
        """Write the module as sentence-transformers reads it."""
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.linear.bias is not None,
            "activation_function": f"{type(self.activation).__module__}.{type(self.activation).__qualname__}",
        }
        if self.use_residual:  # omitted at its default, as sentence-transformers does (older releases reject it)
            config["use_residual"] = True
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}, folder / WEIGHTS)
