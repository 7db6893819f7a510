"""Packed inference: a batch's texts run as one sequence of their real tokens, each text attending only to itself.

Padding costs a CPU as much as real tokens, and it changes a text's result: attention kernels sum over the padded
key length in another order, and LLMs' massive activations (and bf16 blocks after them) amplify that rounding
(cosine 0.99997 between a text alone and in a left-padded batch, on the fast default). Packed, each text's
attention runs on exactly its own tokens, as when it is alone, and no padding token costs anything: with
row-invariant linear layers (:mod:`lm2vec.invariance`) a text's embedding is bit-identical in any batch, on
either padding side.

The mechanism is transformers' own: an attention implementation registered as :data:`PACKED`. Given ``segments``
(which the model passes through its keyword arguments) it runs SDPA on each group of equal-length texts (views of
the packed sequence where they lie side by side, as in ``encode``'s length-sorted batches); without,
it *is* SDPA, masks included, so padded batches, training and :func:`~lm2vec.attention.verify_attention` work as
before. Models on eager attention (Gemma 2, whose soft-capped scores SDPA cannot compute; any model loaded eager)
run packed alike on their own eager attention (:data:`PACKED_EAGER`). Each group takes the top-left corner of the
mask the model built for the packed sequence: the mask it builds for one unpadded text of that length (causal or
not, as the model was loaded).
:func:`enable_packing` switches a model to it after checking, on that model, that packed states equal the
states of each text alone (an architecture that drops the keyword arguments would mix texts) and that no block
lets one text's inputs move another text's states (a convolution or state-space layer would carry them over).
Packed attention applies no window: models with sliding-window attention are packed only where no text can be
longer than the window (``max_length`` below it: Mistral v0.1's 4,096, Phi-3's 2,047 against lm2vec's 512 tokens),
nor any sparse selection of keys (DeepSeek-V3.2's 2,048 keys a query) or LongRoPE's switch to long factors (Phi-3.5:
past 4,096 tokens), those with chunked attention or on other attention implementations (flash, flex) never (see
:func:`window_applies`). Eager attention's groups are copied here; its products over a shared key/value head are
split text by text in :mod:`lm2vec.invariance`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from .attention import MIXES, block_changes
from .invariance import BatchInvariant

PACKED = "lm2vec_packed"  # SDPA per group of texts
PACKED_EAGER = "lm2vec_packed_eager"  # the model's own eager attention per group
# The implementation a model runs packed, by the one it was loaded with.
PACKED_AS = {"sdpa": PACKED, "eager": PACKED_EAGER}
UNPACKED = {packed: loaded for loaded, packed in PACKED_AS.items()}
Attention = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]  # transformers' attention functions
# Per text length: (length, the positions of those texts' tokens in the packed sequence, text after text): a slice
# where the texts lie side by side, else an index.
Segments = list[tuple[int, slice | torch.Tensor]]


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segments: Segments | None = None,
    *,
    inner: Attention = sdpa_attention_forward,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``inner`` attention per group of equal-length texts of a packed sequence (batch of one), or plain ``inner``
    without ``segments``. Returns (batch, tokens, heads, head_dim), as transformers' attention functions do."""
    if segments is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    heads, dim = query.shape[1], value.shape[-1]
    # A group's views are computed differently by how many texts it holds (short texts: 63 of 100 moved in the last
    # bits) by CPU SDPA where values are narrower than queries (DeepSeek's MLA: 192 against 128), and by eager
    # attention (HY-V4's); copies are computed alike. SDPA with equal sizes was swept alike on views: no copy there.
    contiguous = inner is not sdpa_attention_forward or dim != query.shape[-1]
    out: torch.Tensor | None = None
    for length, positions in segments:
        q, k, v = (_group(states, positions, length, contiguous) for states in (query, key, value))
        # The packed sequence's mask, top-left: one unpadded text's (distances only, no padding); SDPA's is None
        mask = None if attention_mask is None else attention_mask[..., :length, :length]
        states, _ = inner(module, q, k, v, mask, **kwargs)
        if out is None:  # SDPA's dtype, which autocast may set
            out = states.new_empty(query.shape[2], heads, dim)
        out[positions] = states.reshape(-1, heads, dim)
    if out is None:
        raise ValueError("packed attention needs at least one segment")
    return out[None], None


def _group(states: torch.Tensor, positions: slice | torch.Tensor, length: int, contiguous: bool) -> torch.Tensor:
    """(1, heads, tokens, dim) -> (texts, heads, length, dim): the texts of one length, side by side (a view where
    ``positions`` is a slice and not ``contiguous``, else a copy)."""
    group = states[0][:, positions].unflatten(1, (-1, length)).transpose(0, 1)
    return group.contiguous() if contiguous else group


def eager_attention(module: torch.nn.Module, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own eager attention: ``eager_attention_forward`` of the module defining its attention layer, as
    transformers' model files each define it (Gemma 2's soft-caps the scores). A model without one fails the packing
    check and runs padded."""
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, sdpa_mask)  # padded batches get SDPA's masks
AttentionInterface.register(PACKED_EAGER, functools.partial(packed_attention, inner=eager_attention))
AttentionMaskInterface.register(PACKED_EAGER, eager_mask)  # and eager's


def packed_states(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states of a padded batch (either side) computed packed; zeros at the padding."""
    real = attention_mask.bool()
    lengths = real.sum(1)
    starts = lengths.cumsum(0) - lengths
    tokens = int(lengths.sum())
    positions = torch.arange(tokens, device=input_ids.device) - starts.repeat_interleave(lengths)
    segments = [_segment(starts[lengths == length], length) for length in lengths.unique().tolist() if length > 0]
    out = model(
        input_ids=input_ids[real][None],
        attention_mask=torch.ones(1, tokens, dtype=torch.long, device=input_ids.device),  # no packed-mask guessing
        position_ids=positions[None],
        segments=segments,
        use_cache=False,  # no KV cache: it would hold every layer's keys and values for the whole pass
    )
    hidden = out.last_hidden_state
    states = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
    states[real] = hidden[0]
    return states


def _segment(starts: torch.Tensor, length: int) -> tuple[int, slice | torch.Tensor]:
    """The segment of the texts of ``length`` tokens starting at ``starts``: computed once per pass, used in every
    layer; a slice where they lie side by side (gathering them took a third of the attention's time on 1000 STS-B
    sentences, 2% of the whole)."""
    first, count = int(starts[0]), len(starts)
    if int(starts[-1]) - first == (count - 1) * length:  # ascending starts, each text ``length`` long: no gaps
        return length, slice(first, first + count * length)
    return length, (starts[:, None] + torch.arange(length, device=starts.device)).reshape(-1)


@torch.inference_mode()
def enable_packing(model: PreTrainedModel, max_length: int) -> bool:
    """Switch an SDPA or eager model to :data:`PACKED` or :data:`PACKED_EAGER` if packed states match each text's
    states alone (else leave it); ``max_length``: the longest text it will see (see :func:`window_applies`)."""
    loaded = UNPACKED.get(model.config._attn_implementation, model.config._attn_implementation)
    if loaded not in PACKED_AS or window_applies(model.config, max_length):
        return False
    packs = False
    try:
        model.set_attn_implementation(PACKED_AS[loaded])
        packs = _packs_right(model)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        pass  # a wrapper without the switch; a model refusing the kwargs, or whose attention takes another mask
    finally:
        if not packs:  # also where the model fails outright: its error names the implementation it was loaded with
            model.set_attn_implementation(loaded)
    return packs


def window_applies(config: PretrainedConfig, max_length: int) -> bool:
    """Whether a text of up to ``max_length`` tokens can meet a sliding window's edge (a token at distance >= the
    window is masked), chunked attention, sparse attention's selection (DeepSeek-V3.2's DSA and its followers: a
    query attends to the ``index_topk`` keys its indexer picks, which the models apply on SDPA and eager attention
    only), or LongRoPE's long factors (Phi-3.5, Phi-4-mini: taken for a whole sequence once its last position passes
    ``original_max_position_embeddings``, so a packed long text would hand them to the short texts beside it): packed
    attention applies none of them alike, and a short check cannot see them."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    limits = [window - 1 if window else None, getattr(text, "index_topk", None), _longrope_length(text)]
    chunked = bool(getattr(text, "attention_chunk_size", None))
    return chunked or any(max_length > limit for limit in limits if limit is not None)


def _longrope_length(config: PretrainedConfig) -> int | None:
    """The sequence length past which LongRoPE takes its long factors (the shortest over layer types), if any."""
    rope = getattr(config, "rope_parameters", None) or {}
    kinds = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    lengths = [k.get("original_max_position_embeddings") for k in kinds if k.get("rope_type") == "longrope"]
    return min((n for n in lengths if n), default=None)


def _packs_right(model: PreTrainedModel) -> bool:
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    texts = [torch.arange(1, 4), torch.arange(5, 10), torch.arange(2, 5)]  # lengths 3, 5, 3: two groups
    ids = torch.zeros(len(texts), 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, text in enumerate(texts):
        ids[row, : len(text)], mask[row, : len(text)] = text % vocab, 1
    # Float32 products in fixed row blocks: otherwise a text's rows, alone and packed, take kernels of other row
    # counts, whose rounding the model's massive activations and bf16 blocks amplify past the tolerance.
    with BatchInvariant():
        packed = packed_states(model, ids.to(device), mask.to(device))
        for row, text in enumerate(texts):
            n = len(text)
            positions = torch.arange(n, device=device)[None]
            alone = model(
                input_ids=ids[row : row + 1, :n].to(device),
                attention_mask=torch.ones(1, n, dtype=torch.long, device=device),  # the text's ids may hold the pad id
                position_ids=positions,
                use_cache=False,
            )
            hidden = alone.last_hidden_state
            scale = hidden.abs().amax().clamp(min=1e-6)
            if ((packed[row, :n] - hidden[0]).abs().amax() / scale) > 1e-3:
                return False
        # Each block's own mixing, alone: no text's states may move with another text's inputs. A convolution or
        # state-space layer carries state from one packed text into the next; the states above can hide that.
        tokens = int(mask.sum())
        first = (torch.arange(tokens, device=device) < len(texts[0]))[None]
        changes = block_changes(model, lambda: packed_states(model, ids.to(device), mask.to(device)), first, ~first)
    return changes is not None and max(changes, default=0.0) <= MIXES
