"""Validate what users pass to ``encode`` and turn it into model batches.

A text may carry an instruction. The instruction is prepended as plain text (no magic separator), the
whole batch is tokenized in one call, and the instruction's token count marks the tokens that pooling
leaves out, the same convention as sentence-transformers' prompts. Truncation cuts from the right, so
the instruction always survives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .datafiles import check_unicode
from .pooling import exclude_prefix

Item = str | tuple[str, str] | list[str]
Inputs = str | Sequence[Item]


def _describe(value: object) -> str:
    return type(value).__name__


def check_positive(name: str, value: object) -> None:
    """Counts and lengths (``batch_size``, ``max_length``, ...): a positive integer, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_prompts(prompts: object, default_prompt_name: object) -> None:
    """Prompts map names to instructions (strings); a default prompt is one of them."""
    if prompts is not None and not (
        isinstance(prompts, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
    ):
        raise TypeError(f"prompts must map names to instructions (dict of str to str), got {prompts!r:.80}")
    if default_prompt_name is not None and default_prompt_name not in (prompts or {}):
        names = list(prompts or {})
        raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts {names}")


def check_flag(name: str, value: object) -> None:
    """Switches (``bidirectional``, ``trust_remote_code``): a bool, as a truthy string such as "no" or "false"
    would turn them on."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def normalize(inputs: Inputs, instruction: str | None = None) -> tuple[list[str], list[str], bool]:
    """Check ``inputs`` and split them into (instructions, texts, was_single_string).

    Accepted: a string; or a list/tuple/array whose items are strings or (instruction, text) pairs.
    A pair's own instruction wins over the ``instruction`` argument.
    """
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string, got {_describe(instruction)}")
    default = instruction or ""
    check_unicode(default, "the instruction")
    if isinstance(inputs, str):
        check_unicode(inputs, "the input")
        return [default], [inputs], True
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    if isinstance(inputs, bytes | bytearray):
        raise TypeError("inputs are bytes; decode them to str first")
    if not isinstance(inputs, list | tuple):
        raise TypeError(
            f"inputs must be a string or a list of strings / (instruction, text) pairs, got {_describe(inputs)}"
        )
    instructions, texts = [], []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            check_unicode(item, f"input {i}")
            instructions.append(default)
            texts.append(item)
        elif isinstance(item, list | tuple):
            if len(item) != 2:
                raise ValueError(
                    f"input {i} is a {_describe(item)} of length {len(item)}; an (instruction, text) pair "
                    "has exactly 2 strings"
                )
            if not all(isinstance(part, str) for part in item):
                kinds = ", ".join(_describe(part) for part in item)
                raise TypeError(f"input {i} is a pair of ({kinds}); both instruction and text must be str")
            check_unicode(item[0], f"input {i}'s instruction")
            check_unicode(item[1], f"input {i}")
            instructions.append(item[0])
            texts.append(item[1])
        elif isinstance(item, bytes | bytearray):
            raise TypeError(f"input {i} is bytes; decode it to str first")
        else:
            raise TypeError(f"input {i} is {_describe(item)}; expected a str or an (instruction, text) pair")
    return instructions, texts, False


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pool_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.pool_mask)))


class Tokenization:
    """Tokenizes (instruction, text) batches in one call and marks the instruction tokens, which are not pooled
    unless ``include_prompt`` (sentence-transformers' Pooling setting of that name)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, include_prompt: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.include_prompt = include_prompt
        self._instruction_ids: dict[str, list[int]] = {}  # an instruction's ids as it starts a row, specials included

    def instruction_lengths(self, instructions: list[str]) -> list[int]:
        """Tokens an instruction occupies at the start of a text, leading special tokens included."""
        new = sorted({s for s in instructions if s and s not in self._instruction_ids})
        if new:
            with_special = self.tokenizer(new)["input_ids"]
            plain = self.tokenizer(new, add_special_tokens=False)["input_ids"]
            for text, full, bare in zip(new, with_special, plain, strict=True):
                ids = full[: _prefix_special(full, bare) + len(bare)]
                if len(ids) >= self.max_length:
                    raise ValueError(
                        f"instruction {text[:60]!r} is {len(ids)} tokens, which leaves no room for the text "
                        f"within max_length={self.max_length}"
                    )
                self._instruction_ids[text] = ids
        return [len(self._instruction_ids[s]) if s else 0 for s in instructions]

    def tokenize(self, instructions: list[str], texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids (truncated; an empty text gets one EOS token) and instruction lengths, in one call.

        An instruction's length is counted in each joined row: counted alone, an instruction ending in a space
        ("query: ") takes one token more than in the row, where byte-level BPE and SentencePiece tokenizers join that
        space to the text's first word, which would then not be pooled. Where the tokenizer gives character offsets
        (fast tokenizers), the row's leading tokens that cover no character of the text (:func:`instruction_tokens`);
        elsewhere the leading tokens the row shares with the instruction alone (a merged token differs).
        """
        self.instruction_lengths(instructions)  # also refuses an instruction that leaves no room
        by_offsets = self.tokenizer.is_fast and any(instructions) and not self.include_prompt
        encoded = self.tokenizer(
            self.joined(instructions, texts),
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=by_offsets,
        )
        rows = encoded["input_ids"]
        if self.include_prompt:
            lengths = [0] * len(rows)
        elif by_offsets:
            lengths = [
                instruction_tokens(offsets, len(p)) if p else 0
                for offsets, p in zip(encoded["offset_mapping"], instructions, strict=True)
            ]
        else:
            lengths = [
                _shared_prefix(row, self._instruction_ids[p]) if p else 0
                for row, p in zip(rows, instructions, strict=True)
            ]
        return self.filled(rows), lengths

    def joined(self, instructions: list[str], texts: list[str]) -> list[str]:
        """The strings :meth:`tokenize` tokenizes: each text after its instruction."""
        return [p + t for p, t in zip(instructions, texts, strict=True)]

    def cut(self, instructions: list[str], texts: list[str], ids: list[list[int]]) -> list[int]:
        """Positions of the rows of ``ids`` (:meth:`tokenize`'s) that ``max_length`` cut short: the rows at the limit
        whose whole string takes more tokens; only those are tokenized again."""
        full = [i for i, row in enumerate(ids) if len(row) >= self.max_length]
        if not full:
            return []
        whole = self.tokenizer(self.joined([instructions[i] for i in full], [texts[i] for i in full]))["input_ids"]
        return [i for i, row in zip(full, whole, strict=True) if len(row) > self.max_length]

    def filled(self, ids: list[list[int]]) -> list[list[int]]:
        """An empty row (an empty text, no special tokens) becomes one EOS token: every row has a token to pool."""
        eos = self.tokenizer.eos_token_id
        filler = [eos if eos is not None else self.tokenizer.pad_token_id]
        return [row or filler for row in ids]

    def collate(self, ids: list[list[int]], prefix: list[int], width: int | None = None) -> Batch:
        """Pad to ``width`` (default: the longest row) on the right, whatever the tokenizer's padding side; mark the
        tokens to pool. Positions follow the real tokens, so the side only moves where attention meets the masked keys,
        which changes its summation order (embeddings 1e-7 apart on models that run padded): one side gives a text
        the same bits under either tokenizer setting."""
        longest = width or max(len(row) for row in ids)
        input_ids = torch.full((len(ids), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return Batch(input_ids, mask, exclude_prefix(mask, torch.tensor(prefix, dtype=torch.long)))

    def __call__(self, instructions: list[str], texts: list[str]) -> Batch:
        return self.collate(*self.tokenize(instructions, texts))


@dataclass(frozen=True)
class ReferenceStyle:
    """How the reference llm2vec (0.2.3) turns an (instruction, text) pair into tokens, for checkpoints trained
    with it (see :mod:`lm2vec.loading.reference`).

    The instruction (stripped) and the text are joined by a space, the whole wrapped in the base model's chat
    template where the reference wraps it (``template``: prefix and suffix; ``eos``: text appended for EOS
    pooling), and only as many tokens as the text takes alone are pooled, counted from the end: leading special
    tokens (BOS) and the instruction never are. ``doc_max_length``: texts are first cut by whole words to this
    many tokens, as the reference cuts documents. ``skip_instruction=False``: every token is pooled.
    """

    template: tuple[str, str] = ("", "")
    eos: str = ""
    doc_max_length: int | None = 400
    skip_instruction: bool = True

    SEPARATOR = "!@#$%^&*()"  # the reference's marker between instruction and text

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ReferenceStyle:
        return cls(**{**data, "template": tuple(data.get("template") or ("", ""))})

    def marked(self, instruction: str, text: str) -> str:
        """The reference's string: ``instruction SEPARATOR text``, templated (``LLM2Vec.prepare_for_tokenization``)."""
        marked = f"{instruction.strip()} {self.SEPARATOR}{text}" if instruction else f"{self.SEPARATOR}{text}"
        if self.template != ("", ""):
            marked = self.template[0] + marked.strip() + self.template[1]
        return marked.strip() + self.eos if self.eos else marked


class ReferenceTokenization(Tokenization):
    """:class:`Tokenization` in the reference llm2vec's convention (:class:`ReferenceStyle`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, style: ReferenceStyle):
        super().__init__(tokenizer, max_length)
        self.style = style

    def tokenize(self, instructions: list[str], texts: list[str]) -> tuple[list[list[int]], list[int]]:
        texts, bare = self._cut(texts)
        parts = self._parts(instructions, texts)
        joined = ["".join(p) for p in parts]
        ids = self.filled(self.tokenizer(joined, truncation=True, max_length=self.max_length)["input_ids"])
        if not self.style.skip_instruction:
            return ids, [0] * len(ids)
        pooled = [p[1] if len(p) > 1 else "" for p in parts]
        changed = [i for i, (text, part) in enumerate(zip(texts, pooled, strict=True)) if part != text]
        for i, row in zip(changed, self._bare([pooled[i] for i in changed]), strict=True):
            bare[i] = row  # a template or EOS text changed what is pooled: count it as the reference does
        return ids, [len(row) - min(len(row), len(text)) for row, text in zip(ids, bare, strict=True)]

    def joined(self, instructions: list[str], texts: list[str]) -> list[str]:
        """The reference's strings (templated, the marker dropped), before its document cut."""
        return ["".join(p) for p in self._parts(instructions, texts)]

    def _parts(self, instructions: list[str], texts: list[str]) -> list[list[str]]:
        """Each templated string split at the reference's marker: [instruction part, pooled part] (one part where
        there is no marker)."""
        return [
            self.style.marked(p, t).split(ReferenceStyle.SEPARATOR) for p, t in zip(instructions, texts, strict=True)
        ]

    def _bare(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]

    def _cut(self, texts: list[str]) -> tuple[list[str], list[list[int]]]:
        """The reference's document cut (drop words in proportion until a text is at most ``doc_max_length``), and
        the texts' own tokens."""
        texts, bare = list(texts), self._bare(texts)
        limit = self.style.doc_max_length
        for i in range(len(texts)):
            while limit is not None and len(bare[i]) > limit:
                words = texts[i].split()
                texts[i] = " ".join(words[: int(len(words) * limit / len(bare[i]))])
                bare[i] = self._bare([texts[i]])[0]
        return texts, bare


def length_batches(
    lengths: list[int],
    batch_size: int,
    max_tokens: int | None = None,
    same_length: bool = True,
    pass_cost: int | None = None,
) -> list[np.ndarray]:
    """Indices grouped into batches by token count, longest first.

    A batch holds at most ``batch_size`` texts and, with ``max_tokens``, at most that many tokens counted at its
    longest text (but always one text): long texts come in small batches, short ones in large, for an even cost
    per forward pass.

    ``same_length``: only texts of exactly the same token count share a batch. With one padding column added to
    every such batch (see ``Encoder.embed_tokens``), every batch takes the same masked attention kernel over the
    same key length, so a text's embedding is bit-identical alone and in any batch. Mixed lengths change the
    rounding (LLMs' massive activations amplify it to ~4e-4 on SmolLM2) but fill the batches: a few hundred
    texts of many lengths (a server's model call) would otherwise run as batches of a few texts each.

    ``pass_cost`` (mixed lengths only): what one more forward pass costs, in padded tokens. Batches are then cut
    where the padding they would carry costs more than a pass (the fewest padded tokens plus passes, solved
    exactly); without it batches fill up in order. On a CPU padding costs as much as real tokens: 160 STS-B
    sentences cut in full batches of 32 carried 32% padding.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    ordered = np.asarray(lengths, dtype=np.int64)[order]  # numpy ints: the arithmetic below stays in numpy
    rooms = [batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // max(n, 1))) for n in ordered]
    if same_length:
        ends = _fill(rooms, lambda start, end: ordered[end] == ordered[start])
    elif pass_cost is None:
        ends = _fill(rooms, lambda start, end: True)
    else:
        ends = _least_padding(ordered, rooms, pass_cost)
    return [order[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def _fill(rooms: list[int], joins: Callable[[int, int], bool]) -> list[int]:
    """Batch ends when each batch takes texts in order while there is room and ``joins(start, next)``."""
    ends, start = [], 0
    while start < len(rooms):
        end = start + 1
        while end < len(rooms) and end - start < rooms[start] and joins(start, end):
            end += 1
        ends.append(end)
        start = end
    return ends


def _least_padding(ordered: np.ndarray, rooms: list[int], pass_cost: int) -> list[int]:
    """Batch ends minimizing padded tokens + ``pass_cost`` per batch over lengths sorted longest first.

    ``best[i]``: the least cost of texts ``i:``; a batch starting at ``i`` is padded to ``ordered[i]``.
    """
    n = len(ordered)
    best = np.zeros(n + 1, dtype=np.int64)
    step = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        sizes = np.arange(1, min(rooms[i], n - i) + 1)
        costs = pass_cost + sizes * ordered[i] + best[i + sizes]
        step[i] = sizes[np.argmin(costs)]  # the first minimum: the smallest batch of that cost
        best[i] = costs.min()
    ends, i = [], 0
    while i < n:
        i += int(step[i])
        ends.append(i)
    return ends


def instruction_tokens(offsets: list[tuple[int, int]], chars: int) -> int:
    """How many leading tokens of a row cover none of the text that starts at character ``chars`` (special tokens
    before the instruction, the instruction's own): a token straddling the boundary holds text and is pooled."""
    count = 0
    for _, end in offsets:
        if end > chars:
            break
        count += 1
    return count


def _shared_prefix(row: list[int], instruction: list[int]) -> int:
    """How many leading ids ``row`` shares with ``instruction``."""
    count = 0
    for a, b in zip(row, instruction, strict=False):
        if a != b:
            break
        count += 1
    return count


def _prefix_special(full: list[int], bare: list[int]) -> int:
    """How many special tokens the tokenizer put before the text (e.g. BOS)."""
    if not bare:
        return len(full)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return start
    return 0
