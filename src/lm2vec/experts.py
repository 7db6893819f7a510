"""Mixture-of-experts layers: which of transformers' implementations (>= 5) computes them, for a ``with`` block.

transformers' default, one grouped product over all experts (``grouped_mm``), serves speed but neither of lm2vec's
needs: a token's sums depend on how many tokens each expert got (so batch invariance loops over the experts,
``"eager"``, each a linear layer :class:`~lm2vec.invariance.BatchInvariant` blocks), and ``torch.onnx`` cannot
convert it, nor trace the loop's data-dependent experts (so export runs each token through its chosen experts'
weights, gathered: ``"batched_mm"``). Models without experts, and older transformers, are left as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import PreTrainedModel


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
