"""Input validation and tokenization with instructions."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast, PythonBackend

from lm2vec.inputs import ReferenceStyle, ReferenceTokenization, Tokenization, length_batches, normalize
from tests.support import tiny_tokenizer


@pytest.mark.parametrize(
    "bad,error,message",
    [
        (None, TypeError, "got NoneType"),
        (42, TypeError, "got int"),
        (b"bytes", TypeError, "decode"),
        (["ok", 3.5], TypeError, "input 1 is float"),
        (["ok", b"x"], TypeError, "input 1 is bytes"),
        ([None], TypeError, "input 0 is NoneType"),
        ([["a"]], ValueError, "length 1"),
        ([["a", "b", "c"]], ValueError, "length 3"),
        ([("instr", 5)], TypeError, r"\(str, int\)"),
        ([[["nested"], "x"]], TypeError, r"\(list, str\)"),
        ({"a": 1}, TypeError, "got dict"),
        ("w4 \ud83d", ValueError, r"the input is not valid Unicode: a lone surrogate U\+D83D at character 3"),
        (["ok", "\udcff"], ValueError, "input 1 is not valid Unicode"),
        ([("\ud800: ", "ok")], ValueError, "input 0's instruction is not valid Unicode"),
    ],
)
def test_bad_inputs_name_the_problem(bad, error, message):
    with pytest.raises(error, match=message):
        normalize(bad)


def test_instruction_must_be_a_string():
    with pytest.raises(TypeError, match="instruction must be a string"):
        normalize(["x"], instruction=3)
    with pytest.raises(ValueError, match="the instruction is not valid Unicode"):
        normalize(["x"], instruction="\udfff")


def test_accepted_shapes():
    assert normalize("one") == ([""], ["one"], True)
    assert normalize(["a", ("do:", "b")], instruction="i: ") == (["i: ", "do:"], ["a", "b"], False)
    assert normalize(np.array(["a", "b"])) == (["", ""], ["a", "b"], False)
    assert normalize([]) == ([], [], False)


@pytest.mark.parametrize("bos", [False, True])
def test_instruction_tokens_are_marked_and_survive_truncation(bos: bool):
    tokenization = Tokenization(tiny_tokenizer(bos=bos), max_length=6)
    batch = tokenization(["w5 w6 ", ""], ["w7 w8 w9 w10 w11 w12", "w7"])
    start = 1 if bos else 0
    ids = batch.input_ids[0].tolist()
    assert ids[start : start + 3] == [5, 6, 7]  # instruction kept, text cut from the right
    assert len(ids) == 6
    # instruction (and BOS) excluded from pooling, the rest pooled
    assert batch.pool_mask[0].tolist() == [False] * (start + 2) + [True] * (4 - start)
    # no instruction: every real token pooled (BOS included, as in sentence-transformers)
    assert batch.pool_mask[1].tolist() == [True] * (start + 1) + [False] * (5 - start)


def words(n: int) -> str:
    return " ".join(f"w{5 + i}" for i in range(n))


@pytest.mark.parametrize("bos", [False, True])
def test_cut_names_the_rows_that_max_length_cut_short(bos: bool):
    tokenization = Tokenization(tiny_tokenizer(bos=bos), max_length=6)
    room = 6 - (1 if bos else 0)
    # exactly the limit: whole; one token over: cut; whole alone but not after its instruction: cut; short: whole
    instructions, texts = ["", "", "w30 w31 ", ""], [words(room), words(room + 1), words(room - 1), words(2)]
    ids, _ = tokenization.tokenize(instructions, texts)
    assert [len(row) for row in ids] == [6, 6, 6, 2 + 6 - room]
    assert tokenization.cut(instructions, texts, ids) == [1, 2]


def test_cut_counts_the_reference_template():
    style = ReferenceStyle(template=("w30 ", " w31"), doc_max_length=None)
    tokenization = ReferenceTokenization(tiny_tokenizer(), max_length=6, style=style)
    texts = [words(4), words(5)]  # 6 and 7 tokens in the template
    ids, _ = tokenization.tokenize(["", ""], texts)
    assert [len(row) for row in ids] == [6, 6]
    assert tokenization.cut(["", ""], texts, ids) == [1]


def test_one_tokenizer_call_per_batch_and_instructions_cached(monkeypatch):
    tokenizer = tiny_tokenizer()
    tokenization = Tokenization(tokenizer, max_length=16)
    calls = []
    original = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    tokenization(["w5 "] * 3, ["w6", "w7", "w8"])
    tokenization(["w5 "] * 3, ["w6", "w7", "w8"])
    # first batch: the texts + the new instruction (two ways); second batch: the texts only
    assert len(calls) == 4


def test_instruction_longer_than_max_length_is_an_error():
    tokenization = Tokenization(tiny_tokenizer(), max_length=3)
    with pytest.raises(ValueError, match="leaves no room"):
        tokenization(["w4 w5 w6 w7 "], ["w8"])


def test_empty_strings_get_a_token():
    batch = Tokenization(tiny_tokenizer(), max_length=8)(["", ""], ["", ""])
    assert batch.attention_mask.sum().item() == 2


def test_batches_hold_one_length_and_respect_both_bounds():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=500).tolist()
    batches = length_batches(lengths, batch_size=32, max_tokens=200)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))  # every text once
    for batch in batches:
        assert len({lengths[i] for i in batch}) == 1
        assert len(batch) <= 32 and (len(batch) * lengths[batch[0]] <= 200 or len(batch) == 1)
    longest_first = [lengths[b[0]] for b in batches]
    assert longest_first == sorted(longest_first, reverse=True)
    unbounded = length_batches(lengths, batch_size=32)
    assert len(unbounded) < len(batches)


def test_a_text_longer_than_max_tokens_still_gets_a_batch():
    assert [b.tolist() for b in length_batches([300, 300], batch_size=8, max_tokens=100)] == [[0], [1]]


def test_mixed_length_batches_fill_up_within_both_bounds():
    """Without same_length (the non-invariant path), a few hundred texts of many lengths make full batches."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 40, size=150).tolist()
    batches = length_batches(lengths, batch_size=32, max_tokens=2048, same_length=False)
    assert sorted(np.concatenate(batches).tolist()) == list(range(150))
    for batch in batches:
        assert len(batch) <= 32 and len(batch) * max(lengths[i] for i in batch) <= 2048
        assert lengths[batch[0]] == max(lengths[i] for i in batch)  # the first is the longest: the padded width
    assert len(batches) == 5 < len(length_batches(lengths, batch_size=32, max_tokens=2048))


def test_pass_cost_cuts_batches_where_padding_costs_more_than_a_pass():
    """One long text among short ones gets a batch of its own instead of padding 31 short texts to its length."""
    lengths = [10] * 20 + [40] + [10] * 11
    batches = length_batches(lengths, batch_size=32, max_tokens=2048, same_length=False, pass_cost=48)
    assert [b.tolist() for b in batches][0] == [20]
    assert sorted(np.concatenate(batches).tolist()) == list(range(32)) and len(batches) == 2


def test_pass_cost_batches_cost_least_within_both_bounds():
    rng = np.random.default_rng(2)
    lengths = rng.integers(5, 40, size=160).tolist()

    def cost(batches: list[np.ndarray]) -> int:
        return sum(48 + len(b) * max(lengths[i] for i in b) for b in batches)

    filled = length_batches(lengths, batch_size=32, max_tokens=512, same_length=False)
    least = length_batches(lengths, batch_size=32, max_tokens=512, same_length=False, pass_cost=48)
    assert sorted(np.concatenate(least).tolist()) == list(range(160))
    for batch in least:
        assert len(batch) <= 32 and len(batch) * max(lengths[i] for i in batch) <= 512
    assert cost(least) < cost(filled)
    exhaustive = length_batches(lengths, batch_size=32, max_tokens=512, same_length=False, pass_cost=0)
    assert sum(len(b) * max(lengths[i] for i in b) for b in exhaustive) == sum(lengths)  # free passes: no padding


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen style): a space joins the word after it ("Ġcat")."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["query: What is a cat? Retrieve similar text: What is it?"] * 20, vocab_size=300)
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=end, pad_token=end)


class SpaceJoiningSlowTokenizer(PythonBackend):
    """A slow (Python) tokenizer, no character offsets, that joins a space to the word after it as byte-level BPE
    does: "query: " alone is ["query", ":", " "], before a text ["query", ":", " What", ...]."""

    def __init__(self, **kwargs):
        words = ["query", ":", "Retrieve", "similar", "text", "What", "is", "a", "cat", "?"]
        tokens = ["<|endoftext|>", " ", *(w for word in words for w in (word, f" {word}"))]
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.inverse = dict(enumerate(tokens))
        super().__init__(eos_token="<|endoftext|>", pad_token="<|endoftext|>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return re.findall(r" ?\w+| ?[^\w\s]+| +", text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self.inverse[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


@pytest.mark.parametrize("make_tokenizer", [byte_level_tokenizer, SpaceJoiningSlowTokenizer])
@pytest.mark.parametrize("instruction", ["query: ", "Retrieve similar text: ", "query:"])
def test_an_instruction_ending_in_a_space_leaves_the_text_whole(make_tokenizer, instruction: str):
    """Alone, "query: " tokenizes as ["query", ":", "Ġ"]; before a text the space joins its first word ("ĠWhat"):
    counting the instruction alone left "What" out of the pool. Fast tokenizers count by character offsets,
    slow ones by the ids the row shares with the instruction alone."""
    tokenizer = make_tokenizer()
    tokenization = Tokenization(tokenizer, max_length=64)
    text = "What is a cat?"
    (ids,), (prefix,) = tokenization.tokenize([instruction], [text])
    assert tokenizer.decode(ids[prefix:]).strip() == text  # every token of the text pooled, none of the instruction
    assert tokenizer.decode(ids[:prefix]).strip() == instruction.strip()
    alone = len(tokenizer(instruction)["input_ids"])
    assert prefix == alone - instruction.endswith(" ")  # the trailing space is the text's now
