"""InfoNCE with GradCache: a contrastive batch bounded by the loss's memory, not by the model's activations.

Computes: :func:`~lm2vec.training.losses.info_nce.info_nce` of the model's embeddings of two batches, with the
gradients of one graph for the whole batch, while holding the activations of one pass at a time:

1. every pass (``mini_batch_size`` rows, length-sorted: :func:`~lm2vec.training.stage.length_chunks`) is
   embedded without a graph (but the ``kept_graphs``, below), its RNG state saved;
2. the loss and its gradient with respect to those embeddings are computed;
3. the returned loss carries a backward hook: when the Trainer back-propagates it, each pass runs again with a
   graph (RNG and autocast restored: the same dropout and precision) and back-propagates the cached gradient
   times the incoming one. Under DDP all passes but the last one back-propagated skip the gradient all-reduce
   (``no_sync``).

``kept_graphs`` trades memory for time: the last that many passes (all but the first at most) run with a graph
in step 1 and keep it, so step 3 back-propagates them without running them again (one forward pass saved each,
exactly: the same computation; their activations are held together until then, so the peak is that many passes'
activations instead of one).

Inputs: ``model`` maps a sub-batch (``input_ids``, ``attention_mask``, ``pool_mask``) to pooled embeddings;
``queries`` and ``candidates`` are padded batches of such tensors (candidates: positives first, then hard
negatives, as :func:`info_nce` takes them).

Reference: Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup";
sentence-transformers' CachedMultipleNegativesRankingLoss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from ..stage import in_batch_order, length_chunks
from .info_nce import info_nce

Batch = dict[str, torch.Tensor]


class PassState:
    """What a forward pass ran under, so that its replay matches it: the RNG state (the same dropout masks) and
    the autocast state (the Trainer back-propagates outside autocast; a float32 replay of a bf16 pass would
    compute other embeddings, slower)."""

    def __init__(self, device_type: str) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.device_type = device_type
        self.autocast = torch.is_autocast_enabled(device_type)
        self.autocast_dtype = torch.get_autocast_dtype(device_type)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if self.cuda else []):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast):
                yield


def cached_info_nce(
    model: nn.Module,
    queries: Batch,
    candidates: Batch,
    scale: float,
    mini_batch_size: int,
    gather_across_devices: bool = True,
    loss_function: Callable[..., torch.Tensor] = info_nce,
    kept_graphs: int = 0,
) -> torch.Tensor:
    """InfoNCE (or ``loss_function``, e.g. its :func:`~.matryoshka.matryoshka` sum) of ``model``'s embeddings of
    both batches; back-propagating it trains ``model`` pass by pass."""
    sides = [length_chunks(batch, mini_batch_size) for batch in (queries, candidates)]
    passes = [part for chunks in sides for _, part in chunks]
    # At least the first (longest) pass runs again: under DDP the gradients' all-reduce rides on the last replay.
    first_kept = max(1, len(passes) - kept_graphs) if torch.is_grad_enabled() else len(passes)
    states, cached, graphs = [], [], {}
    for i, part in enumerate(passes):  # step 1: embeddings without a graph (but the kept ones)
        states.append(PassState(part["input_ids"].device.type))
        with torch.set_grad_enabled(i >= first_kept), _no_sync(model):
            vectors = model(**part)
        if vectors.requires_grad:
            graphs[i] = vectors
        cached.append(vectors.detach().requires_grad_())
    count = len(sides[0])
    query_vectors = in_batch_order(cached[:count], sides[0])
    candidate_vectors = in_batch_order(cached[count:], sides[1])
    loss = loss_function(query_vectors, candidate_vectors, scale, gather_across_devices)
    if not torch.is_grad_enabled():
        return loss
    gradients = torch.autograd.grad(loss, cached)  # step 2: with respect to the cached embeddings only
    result = loss.detach().requires_grad_()
    result.register_hook(partial(_replay, model, passes, states, gradients, graphs))
    return result


def _replay(
    model: nn.Module,
    passes: list[Batch],
    states: list[PassState],
    gradients: tuple[torch.Tensor, ...],
    graphs: dict[int, torch.Tensor],
    grad_output: torch.Tensor,
) -> None:
    """Step 3: each pass's cached gradient scaled by ``grad_output`` back-propagated: first through the kept
    graphs (freeing their activations), then through each other pass run again with a graph."""
    order = [*graphs, *(i for i in range(len(passes)) if i not in graphs)]
    with torch.enable_grad():
        for n, i in enumerate(order):
            sync = contextlib.nullcontext() if n == len(order) - 1 else _no_sync(model)
            with sync, states[i].restored():
                vectors = graphs.pop(i) if i in graphs else model(**passes[i])
                (vectors.float() * (gradients[i] * grad_output)).sum().backward()


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (no gradient all-reduce for the passes inside), or nothing for a model on one device."""
    no_sync: Callable[[], contextlib.AbstractContextManager] = getattr(model, "no_sync", contextlib.nullcontext)
    return no_sync()
