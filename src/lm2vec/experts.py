"""Mixture-of-experts layers: which of transformers' implementations (>= 5) computes them, for a ``with`` block; and
their experts as linear layers, for lower precision.

transformers' default, one grouped product over all experts (``grouped_mm``), serves speed but neither of lm2vec's
needs: a token's sums depend on how many tokens each expert got (so batch invariance loops over the experts,
``"eager"``, each a linear layer :class:`~lm2vec.invariance.BatchInvariant` blocks), and ``torch.onnx`` cannot
convert it, nor trace the loop's data-dependent experts (so export runs each token through its chosen experts'
weights, gathered: ``"batched_mm"``). Models without experts, and older transformers, are left as they are.

transformers stores a layer's experts as 3D weights (one module, ``gate_up_proj`` and ``down_proj``), which hold most
of a mixture-of-experts model's weights and which no linear-layer conversion reaches. :class:`ExpertLinears` holds
them as a pair of layers per expert, made from each expert's slice (lower-precision layers, in
:mod:`lm2vec.quantization`), and runs the eager loop over them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

# The 3D weights of transformers' experts modules, and their biases (``NAME_bias``) where the module ``has_bias``:
# (experts, out, in) per expert, or (experts, in, out) where it ``is_transposed``.
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def experts_implementation(model: PreTrainedModel, implementation: str) -> Iterator[None]:
    """Within: the model's experts run as ``implementation``; put back after."""
    current = getattr(model.config, "_experts_implementation", None)
    if current in (None, implementation) or not _switched(model, implementation):
        yield
        return
    try:
        yield
    finally:
        model.set_experts_implementation(current)


def _switched(model: PreTrainedModel, implementation: str) -> bool:
    try:
        model.set_experts_implementation(implementation)
    except (AttributeError, ValueError):  # a model without experts
        return False
    return True


def is_fused_experts(module: nn.Module) -> bool:
    """A layer's experts as transformers (>= 5) stores them: 3D weights, and the settings its experts decorator
    gives the module (``has_gate``, ``is_transposed``, ...), which every experts implementation reads."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3 and hasattr(module, "has_gate")


class ExpertLinears(nn.Module):
    """A fused experts module as a pair of layers per expert, ``make(linear)`` of each expert's slice: ``up[e]`` (the
    gate and up projections, or the up projection where the module has no gate) and ``down[e]``. Runs as transformers'
    eager loop: each expert on its tokens, in expert order, added into each token's sum (a text's bits do not depend
    on its batch); between the products, the module's own gate, activation and norm (``gating``: the module without
    its 3D weights)."""

    def __init__(self, experts: nn.Module, make: Callable[[nn.Linear], nn.Module]):
        super().__init__()
        up = "gate_up_proj" if experts.has_gate else "up_proj"
        self.up = nn.ModuleList(make(linear) for linear in _expert_linears(experts, up))
        self.down = nn.ModuleList(make(linear) for linear in _expert_linears(experts, "down_proj"))
        self.gating = copy.copy(experts)
        self.gating._parameters = {
            name: p for name, p in experts._parameters.items() if not name.startswith(EXPERT_WEIGHTS)
        }

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        gating = cast(Any, self.gating)  # the decorated module's attributes, which nn.Module's stubs do not know
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= len(self.up):  # a sentinel (expert parallelism): no expert here
                continue
            token, k = torch.where(top_k_index == expert)
            states = self.up[expert](hidden_states[token])
            states = gating._apply_gate(states) if gating.has_gate else gating.act_fn(states)
            states = self.down[expert](states)
            if gating.has_post_expert_norm:
                states = gating.post_expert_norm(states)
            out.index_add_(0, token, (states * top_k_weights[token, k, None]).to(out.dtype))
        return out


def _expert_linears(experts: nn.Module, name: str) -> Iterator[nn.Linear]:
    """Each expert's slice of the 3D weight ``name`` (and its bias) as an ``nn.Linear`` viewing it: nothing copied."""
    weights = getattr(experts, name).detach()
    biases = getattr(experts, f"{name}_bias").detach() if experts.has_bias else None
    for expert, weight in enumerate(weights):
        weight = weight.T if experts.is_transposed else weight
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=biases is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if biases is not None:
            linear.bias = nn.Parameter(biases[expert], requires_grad=False)
        yield linear
