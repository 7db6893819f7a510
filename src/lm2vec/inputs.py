"""Validate what users pass to ``encode`` and turn it into model batches.

A text may carry an instruction. The instruction is prepended as plain text (no magic separator), the
whole batch is tokenized in one call, and the instruction's token count marks the tokens that pooling
leaves out, the same convention as sentence-transformers' prompts. Truncation cuts from the right, so
the instruction always survives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .pooling import exclude_prefix

Item = str | tuple[str, str] | list[str]
Inputs = str | Sequence[Item]


def _describe(value: object) -> str:
    return type(value).__name__


def normalize(inputs: Inputs, instruction: str | None = None) -> tuple[list[str], list[str], bool]:
    """Check ``inputs`` and split them into (instructions, texts, was_single_string).

    Accepted: a string; or a list/tuple/array whose items are strings or (instruction, text) pairs.
    A pair's own instruction wins over the ``instruction`` argument.
    """
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string, got {_describe(instruction)}")
    default = instruction or ""
    if isinstance(inputs, str):
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
    """Tokenizes (instruction, text) batches in one call and marks the instruction tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._instruction_lengths: dict[str, int] = {}

    def instruction_lengths(self, instructions: list[str]) -> list[int]:
        """Tokens an instruction occupies at the start of a text, leading special tokens included."""
        new = sorted({s for s in instructions if s and s not in self._instruction_lengths})
        if new:
            with_special = self.tokenizer(new)["input_ids"]
            plain = self.tokenizer(new, add_special_tokens=False)["input_ids"]
            for text, full, bare in zip(new, with_special, plain, strict=True):
                length = _prefix_special(full, bare) + len(bare)
                if length >= self.max_length:
                    raise ValueError(
                        f"instruction {text[:60]!r} is {length} tokens, which leaves no room for the text "
                        f"within max_length={self.max_length}"
                    )
                self._instruction_lengths[text] = length
        return [self._instruction_lengths[s] if s else 0 for s in instructions]

    def __call__(self, instructions: list[str], texts: list[str]) -> Batch:
        encoded = self.tokenizer(
            [p + t for p, t in zip(instructions, texts, strict=True)],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids, mask = _give_empty_rows_a_token(encoded["input_ids"], encoded["attention_mask"], self.tokenizer)
        prefix = torch.tensor(self.instruction_lengths(instructions), dtype=torch.long)
        return Batch(input_ids, mask, exclude_prefix(mask, prefix))


def _prefix_special(full: list[int], bare: list[int]) -> int:
    """How many special tokens the tokenizer put before the text (e.g. BOS)."""
    if not bare:
        return len(full)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return start
    return 0


def _give_empty_rows_a_token(
    input_ids: torch.Tensor, mask: torch.Tensor, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty string tokenizes to nothing; give it one EOS token so attention has something to see."""
    empty = mask.sum(-1) == 0
    if not empty.any():
        return input_ids, mask
    if input_ids.shape[1] == 0:
        input_ids, mask = input_ids.new_zeros(len(input_ids), 1), mask.new_zeros(len(mask), 1)
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    col = -1 if tokenizer.padding_side == "left" else 0
    input_ids[empty, col] = token
    mask[empty, col] = 1
    return input_ids, mask
