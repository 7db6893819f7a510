"""Late chunking (Günther et al., 2024): one vector per chunk, pooled from the whole document's token states.

A chunk embedded alone sees only itself; pooled from the document's states, each of its tokens has attended to
the whole document (the encoder is bidirectional), so "it" and "the method" keep their referents. A document
longer than the encoder's ``max_length`` runs in windows of ``max_length`` tokens that overlap by ``overlap``
tokens (an eighth of the window unless told; its leading special tokens, e.g. BOS, and the instruction begin every
window); each token takes its state from the window where it has the most context on both sides. An instruction
(``prompt_name``, ``prompt``, or the encoder's default prompt, as :meth:`lm2vec.Encoder.encode` takes them) precedes the
document and is never pooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .choices import PoolingMode
from .datafiles import check_unicode
from .inputs import ReferenceStyle, Tokenization, check_positive, instruction_tokens
from .pooling import pool

Span = tuple[int, int]


class EncoderLike(Protocol):
    """What late chunking uses of an encoder (:class:`lm2vec.Encoder`, which builds on this module)."""

    tokenizer: PreTrainedTokenizerBase
    tokenization: Tokenization
    max_length: int
    pooling: PoolingMode
    reference_style: ReferenceStyle | None
    normalize: bool

    def resolve_instruction(self, prompt_name: str | None, prompt: str | None, instruction: str | None) -> str | None:
        """The instruction ``encode()`` would use."""
        ...

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled states as the encoder's embeddings (its Dense modules)."""
        ...

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) last-layer states."""
        ...


@dataclass
class Chunks:
    """One document's chunks: ``spans`` (start and end characters in the document) and their ``embeddings``."""

    spans: list[Span]
    embeddings: np.ndarray


@torch.inference_mode()
def late_chunks(
    encoder: EncoderLike,
    documents: list[str],
    spans: list[list[Span]] | None = None,
    chunk_tokens: int | None = None,
    overlap: int | None = None,
    normalize_embeddings: bool = False,
    prompt_name: str | None = None,
    prompt: str | None = None,
    instruction: str | None = None,
) -> list[Chunks]:
    """Chunk vectors of each document: at the character ``spans`` given per document, or in consecutive runs of
    ``chunk_tokens`` tokens (exactly one of the two). A span's tokens are those whose characters overlap it.
    ``overlap``: tokens shared by consecutive windows of a long document (default: an eighth of ``max_length``)."""
    overlap = encoder.max_length // 8 if overlap is None else overlap
    instruction = encoder.resolve_instruction(prompt_name, prompt, instruction) or ""
    style = encoder.reference_style
    if style is not None and style.marked(instruction, "x") != style.SEPARATOR + "x":  # it adds text around "x"
        raise ValueError("late chunking takes no instruction, template or EOS text in the reference llm2vec's format")
    encoder.tokenization.instruction_lengths([instruction])  # refuses one that leaves no room for text
    if (spans is None) == (chunk_tokens is None):
        raise ValueError("give either spans (character offsets per document) or chunk_tokens, not both")
    if spans is not None and len(spans) != len(documents):
        raise ValueError(f"spans has {len(spans)} entries for {len(documents)} documents")
    if chunk_tokens is not None:
        check_positive("chunk_tokens", chunk_tokens)
    if not 0 <= overlap < encoder.max_length // 2:
        raise ValueError(f"overlap must be in [0, {encoder.max_length // 2}) for max_length {encoder.max_length}")
    results = []
    for i, document in enumerate(documents):
        if not isinstance(document, str):
            raise TypeError(f"document {i} is {type(document).__name__}; expected str")
        check_unicode(document, f"document {i}")
        tokens = _tokens(encoder.tokenizer, document, instruction)
        if spans is not None:
            chunk_spans = [_check_span(span, len(document), i, j) for j, span in enumerate(spans[i])]
        else:
            assert chunk_tokens is not None
            chunk_spans = _token_runs(tokens, chunk_tokens)
        members = [_members(tokens, span, i, j) for j, span in enumerate(chunk_spans)]
        states = _document_states(encoder, tokens.ids, tokens.lead, overlap)
        vectors = encoder.project(_pool_chunks(encoder, states, members))
        if normalize_embeddings or encoder.normalize:  # its Normalize module, as encode() runs it
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        results.append(Chunks(chunk_spans, vectors.cpu().numpy()))
    return results


def chunk_spans(tokenizer: PreTrainedTokenizerBase, document: str, chunk_tokens: int) -> list[Span]:
    """Character spans of consecutive runs of ``chunk_tokens`` tokens: the chunks ``chunk_tokens`` makes, e.g. to
    embed each alone for comparison."""
    return _token_runs(_tokens(tokenizer, document), chunk_tokens)


@dataclass
class _Tokens:
    """A whole document's token ids (no truncation), their character offsets in the document and which are special
    (an instruction's tokens count as such: no span pools them); ``lead``: the tokens opening it (e.g. BOS, the
    instruction), pooled with a chunk at the document's start only where there is no instruction (as
    :meth:`lm2vec.Encoder.encode` pools); ``text_end``: the last text character a token covers."""

    ids: list[int]
    offsets: list[Span]
    special: list[bool]
    instructed: bool = False

    def __post_init__(self) -> None:
        self.lead = next((k for k, is_special in enumerate(self.special) if not is_special), len(self.special))
        self.text_end = max((b for (_, b), sp in zip(self.offsets, self.special, strict=True) if not sp), default=0)


def _tokens(tokenizer: PreTrainedTokenizerBase, document: str, instruction: str = "") -> _Tokens:
    """The instruction's tokens counted as :class:`~lm2vec.inputs.Tokenization` counts them (BOS included)."""
    if not tokenizer.is_fast:
        raise ValueError("late chunking needs a fast tokenizer (character offsets)")
    encoded = tokenizer(instruction + document, return_offsets_mapping=True, return_special_tokens_mask=True)
    shift = len(instruction)
    prefix = instruction_tokens(encoded["offset_mapping"], shift) if instruction else 0
    offsets = [(int(a) - shift, int(b) - shift) for a, b in encoded["offset_mapping"]]
    special = [bool(m) or k < prefix for k, m in enumerate(encoded["special_tokens_mask"])]
    return _Tokens(encoded["input_ids"], offsets, special, instructed=bool(instruction))


def _check_span(span: Span, length: int, document: int, chunk: int) -> Span:
    start, end = span
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= length):
        raise ValueError(
            f"chunk {chunk} of document {document}: span {span!r} is not within the text (0 <= start < end <= {length})"
        )
    return start, end


def _token_runs(tokens: _Tokens, size: int) -> list[Span]:
    positions = [k for k, is_special in enumerate(tokens.special) if not is_special]
    runs = [positions[k : k + size] for k in range(0, len(positions), size)]
    return [(tokens.offsets[run[0]][0], tokens.offsets[run[-1]][1]) for run in runs]


def _members(tokens: _Tokens, span: Span, document: int, chunk: int) -> list[int]:
    """The span's tokens; the special tokens that open (close) the document go with a span at its start (end), so
    one chunk covering the document pools what :meth:`lm2vec.Encoder.encode` pools."""
    start, end = span
    inside = [k for k, (a, b) in enumerate(tokens.offsets) if not tokens.special[k] and a < end and b > start]
    if not inside:
        raise ValueError(f"chunk {chunk} of document {document}: span {span!r} covers no token (only whitespace?)")
    lead = tokens.lead if start == 0 and not tokens.instructed else 0
    after = range(inside[-1] + 1, len(tokens.special))
    trail = [k for k in after if tokens.special[k]] if end >= tokens.text_end else []
    return list(range(lead)) + inside + trail


def _document_states(encoder: EncoderLike, ids: list[int], lead: int, overlap: int) -> torch.Tensor:
    """(tokens, dim) last-layer states of the whole document, in overlapping windows if it is too long."""
    if len(ids) <= encoder.max_length:
        return _states(encoder, ids)
    head, body = ids[:lead], ids[lead:]
    width = encoder.max_length - lead  # document tokens per window
    stride = width - overlap
    if stride < 1:
        raise ValueError(
            f"the instruction and leading special tokens take {lead} of max_length={encoder.max_length} tokens, "
            f"leaving {width} per window for the document: overlap={overlap} must be smaller"
        )
    starts = [*range(0, len(body) - width, stride), len(body) - width]
    parts, best = [], torch.full((len(body),), -1)
    owner = torch.zeros(len(body), dtype=torch.long)
    for w, start in enumerate(starts):
        positions = torch.arange(start, start + width)
        complete = torch.full((width,), len(body))  # no text lies beyond the document's ends: full context
        left = positions - start if start > 0 else complete
        right = start + width - 1 - positions if start + width < len(body) else complete
        context = torch.minimum(left, right)
        take = context > best[positions]
        best[positions[take]], owner[positions[take]] = context[take], w
        parts.append(_states(encoder, head + body[start : start + width]))
    rows = [parts[int(owner[k])][lead + k - starts[int(owner[k])]] for k in range(len(body))]
    return torch.cat([parts[0][:lead], torch.stack(rows)]) if rows else parts[0][:lead]


def _states(encoder: EncoderLike, ids: list[int]) -> torch.Tensor:
    return encoder.token_states(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]


def _pool_chunks(encoder: EncoderLike, states: torch.Tensor, members: list[list[int]]) -> torch.Tensor:
    """Each chunk pooled with the encoder's pooling mode, as if the rest of the document were its instruction."""
    length = states.shape[0]
    pool_mask = torch.zeros(len(members), length, dtype=torch.bool)
    for row, tokens in enumerate(members):
        pool_mask[row, tokens] = True
    attention_mask = torch.ones(len(members), length, dtype=torch.long)
    hidden = states.unsqueeze(0).expand(len(members), -1, -1)
    return pool(hidden, attention_mask.to(states.device), pool_mask.to(states.device), encoder.pooling)
