"""Word probing: the CoNLL reader, token-to-word alignment, subword merging and MNTP shift, the probe, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import lm2vec
from lm2vec.datafiles import data_dir
from lm2vec.evaluation.word_probing import (
    embed_words,
    evaluate_word_probing,
    linear_probe,
    merge_subwords,
    probe_scores,
    read_conll,
    tokenize_words,
)
from tests.support import needs_data, tiny_encoder, tiny_tokenizer

CONLL = data_dir() / "word" / "conll2003"
needs_conll = needs_data("word/conll2003/train.conll")


def wordpiece_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """'the dogs playing' -> the | dog ##s | play ##ing: words of one and of two subwords."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "the": 2, "dog": 3, "##s": 4, "play": 5, "##ing": 6}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", padding_side=padding_side
    )


# -- reader ----------------------------------------------------------------------------------------


def test_read_conll_splits_sentences_and_skips_docstart(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n\n\nPeter NNP I-NP I-PER\n"
        "-DOCSTART- -X- -X- O\nBRUSSELS NNP I-NP I-LOC\n"
    )
    sentences = read_conll(path)
    assert [s.words for s in sentences] == [("EU", "rejects"), ("Peter",), ("BRUSSELS",)]
    assert sentences[0] == (("EU", "rejects"), ("NNP", "VBZ"), ("I-NP", "I-VP"), ("I-ORG", "O"))
    assert sentences[2].ner == ("I-LOC",)


def test_read_conll_names_file_and_line_of_a_malformed_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("EU NNP I-NP I-ORG\n\nrejects VBZ I-VP\n")
    with pytest.raises(ValueError, match=rf"{path}:3: expected 4 columns .* got 3"):
        read_conll(path)


# -- alignment -------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_word_level_alignment_skips_special_tokens_and_padding(padding_side):
    tokenizer = tiny_tokenizer(padding_side, bos=True)
    sentences = [["w4", "w5", "w6"], ["w7"]]
    batch = tokenize_words(tokenizer, sentences, max_length=16)
    short = [-1, 0, -1, -1] if padding_side == "right" else [-1, -1, -1, 0]  # <s> w7, padded
    assert batch.token_words.tolist() == [[-1, 0, 1, 2], short]
    # Same answer as transformers' own word ids for a tokenizer where splitting into words is harmless.
    split = tokenizer(sentences, is_split_into_words=True, padding=True)
    for row in range(len(sentences)):
        expected = [-1 if w is None else w for w in split.word_ids(row)]
        assert batch.token_words[row].tolist() == expected


def test_subwords_map_to_their_word_and_truncated_words_are_dropped():
    tokenizer = wordpiece_tokenizer()
    batch = tokenize_words(tokenizer, [["the", "dogs", "playing"], ["dogs"]], max_length=16)
    assert tokenizer.convert_ids_to_tokens(batch.input_ids[0]) == ["the", "dog", "##s", "play", "##ing"]
    assert batch.token_words.tolist() == [[0, 1, 1, 2, 2], [0, 0, -1, -1, -1]]
    cut = tokenize_words(tokenizer, [["the", "dogs", "playing"]], max_length=4)
    assert cut.token_words.tolist() == [[0, 1, 1, -1]]  # "playing" lost "##ing": dropped, not probed on "play"


# -- merging and shifting --------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(
    ("merge", "shift", "expected"),
    [
        # (row, position) each word's feature comes from; rows: the|dog ##s|play ##ing and dog ##s.
        ("first", False, [(0, 0), (0, 1), (0, 3), (1, 0)]),
        ("first", True, [(0, 0), (0, 0), (0, 2), (1, 0)]),
        ("mean", False, [(0, 0), (0, 1.5), (0, 3.5), (1, 0.5)]),
        ("mean", True, [(0, 0), (0, 0.5), (0, 2.5), (1, 0)]),
    ],
)
def test_merge_and_shift_read_the_expected_positions(padding_side, merge, shift, expected):
    batch = tokenize_words(wordpiece_tokenizer(padding_side), [["the", "dogs", "playing"], ["dogs"]], max_length=16)
    rows, positions = batch.input_ids.shape
    # Each state holds its own (row, position), so a feature shows where it was read from.
    hidden = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(positions), indexing="ij"), dim=-1).float()
    hidden[batch.attention_mask == 0] = -100  # reading padding would show
    features, kept = merge_subwords(hidden, batch.attention_mask, batch.token_words, [3, 1], merge, shift)
    pad = 3 if padding_side == "left" else 0
    want = torch.tensor(expected)
    want[3, 1] += pad
    assert kept.all()
    assert torch.equal(features, want)


def test_words_without_tokens_are_not_kept():
    batch = tokenize_words(wordpiece_tokenizer(), [["the", "dogs", "playing"]], max_length=3)
    features, kept = merge_subwords(torch.ones(1, 3, 2), batch.attention_mask, batch.token_words, [3])
    assert kept.tolist() == [True, True, False]
    assert features[2].tolist() == [0, 0]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_embed_words_matches_each_sentence_run_alone(padding_side):
    """Batching, padding and sorting by length must not change a word's feature."""
    encoder = tiny_encoder(padding_side=padding_side)
    sentences = [["w4", "w9", "w30", "w11"], ["w5"], ["w60", "w7", "w8"]]
    first, kept = embed_words(encoder, sentences, shift=False, batch_size=2)
    shifted, _ = embed_words(encoder, sentences, batch_size=2)  # bidirectional: shift by default
    assert kept.all()
    row = 0
    with torch.inference_mode():
        for words in sentences:
            ids = torch.tensor([tiny_tokenizer()(" ".join(words))["input_ids"]])
            states = encoder.model(input_ids=ids).last_hidden_state[0].numpy()
            np.testing.assert_allclose(first[row : row + len(words)], states, atol=1e-5)
            np.testing.assert_allclose(shifted[row : row + len(words)], states[[0, *range(len(words) - 1)]], atol=1e-5)
            row += len(words)


def test_causal_encoders_do_not_shift_by_default():
    encoder = tiny_encoder(bidirectional=False)
    sentences = [["w4", "w9", "w30"], ["w5", "w6"]]
    default, _ = embed_words(encoder, sentences)
    unshifted, _ = embed_words(encoder, sentences, shift=False)
    np.testing.assert_array_equal(default, unshifted)


# -- probe and metrics -----------------------------------------------------------------------------


def test_probe_on_separable_features_is_perfect():
    rng = np.random.default_rng(0)
    labels = np.array(["NN", "VB", "JJ", "DT"])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, len(labels), size=n)
        return 10 * np.eye(16)[y] + rng.normal(scale=0.5, size=(n, 16)), labels[y]

    (train_x, train_y), (test_x, test_y) = draw(200), draw(100)
    scores = probe_scores(test_y, linear_probe(train_x, train_y, test_x))
    assert scores == {"accuracy": 100.0, "f1_macro": 100.0}


def test_entity_f1_leaves_out_the_outside_tag():
    y_true = np.array(["O", "O", "I-PER", "I-LOC"])
    y_pred = np.array(["O", "I-PER", "I-PER", "O"])
    scores = probe_scores(y_true, y_pred, outside="O")
    assert scores["accuracy"] == pytest.approx(50)
    assert scores["f1_macro"] == pytest.approx(100 * (0.5 + 2 / 3 + 0) / 3)  # O, I-PER, I-LOC
    assert scores["f1_macro_entities"] == pytest.approx(100 * (2 / 3 + 0) / 2)  # I-PER, I-LOC


# -- end to end ------------------------------------------------------------------------------------


@needs_conll
def test_evaluate_on_conll_with_a_tiny_model():
    # A probe this small gains nothing from BLAS/OpenMP threads, which thrash on a busy machine (40x slower).
    with threadpool_limits(1):
        results = evaluate_word_probing(tiny_encoder(), data_dir(), max_train_samples=200, max_samples=100)
    assert [(r.task, r.type, r.main_metric) for r in results] == [
        ("conll2003-pos", "word_probing", "accuracy"),
        ("conll2003-chunk", "word_probing", "accuracy"),
        ("conll2003-ner", "word_probing", "f1_macro_entities"),
    ]
    samples = results[0].samples
    assert samples["train_sentences"] == 200 and samples["test_sentences"] == 100
    assert samples["train_words"] > 1000 and samples["test_words"] > 500
    assert all(r.samples == samples for r in results)
    for r in results:
        assert all(0 <= score <= 100 for score in r.scores.values())
        assert r.seconds > 0
    assert set(results[2].scores) == {"accuracy", "f1_macro", "f1_macro_entities"}
    # A random model with every word mapped to <unk> still learns something, e.g. from position.
    assert results[0].scores["accuracy"] > 10


@needs_conll
def test_evaluate_rejects_unknown_tags():
    with pytest.raises(ValueError, match="tags must be some of"):
        evaluate_word_probing(tiny_encoder(), data_dir(), tags=("pos", "lemma"))


def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    try:
        return AutoTokenizer.from_pretrained(lm2vec.loading.resolve_source(None).path)
    except lm2vec.ModelLoadError as err:
        pytest.skip(f"built-in model unavailable: {err}")


def assert_words_rebuilt(tokenizer: PreTrainedTokenizerFast, sentences: list[list[str]]) -> None:
    """Each word's tokens decode to the word, and the tokens are those of the sentence as plain text."""
    batch = tokenize_words(tokenizer, sentences, max_length=512)
    for row, words in enumerate(sentences):
        ids, owners = batch.input_ids[row], batch.token_words[row]
        real = batch.attention_mask[row] == 1
        assert ids[real].tolist() == tokenizer(" ".join(words))["input_ids"]
        rebuilt = [tokenizer.decode(ids[owners == i]).strip() for i in range(len(words))]
        assert rebuilt == words


def test_smollm2_tokenizer_alignment_rebuilds_the_words():
    tokenizer = smollm2_tokenizer()
    words = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", ".", "1996-08-22"]
    words += ["Peter", "Blackburn", "'s", "U.S.", "(", "Reuters", ")", "Müller", "--", "3,500"]
    assert_words_rebuilt(tokenizer, [words, ["SOCCER", "-", "JAPAN", "GET", "LUCKY", "WIN", "."]])
    batch = tokenize_words(tokenizer, [words], max_length=512)
    first = batch.token_words[0].tolist().index(1)
    assert tokenizer.convert_ids_to_tokens(int(batch.input_ids[0, first])) == "Ġrejects"  # with its space


@needs_conll
def test_smollm2_tokenizer_alignment_on_conll_sentences():
    tokenizer = smollm2_tokenizer()
    assert_words_rebuilt(tokenizer, [list(s.words) for s in read_conll(CONLL / "test.conll")[:300]])
