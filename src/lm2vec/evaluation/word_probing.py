"""Word-level probing, the paper's test of what frozen token states know: a linear classifier on each word's state
predicts its part of speech, chunk and named-entity tag on CoNLL-2003.

Sentences are joined with single spaces and tokenized like any text the encoder embeds; token offsets map tokens
back to words. ``is_split_into_words=True`` would be simpler, but byte-level BPE tokenizers (SmolLM2, Llama 3,
Qwen) then tokenize every word without its leading space (``rejects`` -> ``re ject s`` instead of ``Ġrejects``),
text the model never saw in training.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..datafiles import data_file, numbered_lines
from ..inputs import check_positive
from .base import TaskResult, sample_indices

if TYPE_CHECKING:
    from ..encoder import Encoder

Merge = Literal["first", "mean"]
TAGS = ("pos", "chunk", "ner")
# NER accuracy is dominated by the O tag, so NER is ranked by macro F1 over the entity tags.
MAIN_METRIC = {"pos": "accuracy", "chunk": "accuracy", "ner": "f1_macro_entities"}
OUTSIDE = "O"


class Sentence(NamedTuple):
    """One CoNLL-2003 sentence: its words and their tags, column by column."""

    words: tuple[str, ...]
    pos: tuple[str, ...]
    chunk: tuple[str, ...]
    ner: tuple[str, ...]


def read_conll(path: str | os.PathLike) -> list[Sentence]:
    """Read a CoNLL-2003 file (token POS chunk NER); blank and ``-DOCSTART-`` lines end a sentence.

    A line with another number of columns raises ValueError naming the file and line.
    """
    sentences: list[Sentence] = []
    rows: list[list[str]] = []
    previous = 0
    for number, line in numbered_lines(path):  # non-blank lines: a gap in the numbers is a blank line
        columns = line.split()
        if rows and (number > previous + 1 or columns[0] == "-DOCSTART-"):
            sentences.append(Sentence(*map(tuple, zip(*rows, strict=True))))
            rows = []
        previous = number
        if columns[0] == "-DOCSTART-":
            continue
        if len(columns) != 4:
            raise ValueError(
                f"{path}:{number}: expected 4 columns (token POS chunk NER), got {len(columns)}: {line[:80]!r}"
            )
        rows.append(columns)
    if rows:
        sentences.append(Sentence(*map(tuple, zip(*rows, strict=True))))
    if not sentences:
        raise ValueError(f"{path} has no sentences")
    return sentences


@dataclass
class WordBatch:
    """Tokenized sentences; ``token_words[b, t]`` is the word of sentence b that token t belongs to.

    -1 marks special tokens, padding, and the tokens of a word that truncation cut short (so partial words are
    dropped rather than probed on a fragment).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_words: torch.Tensor


def _char_words(words: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """The words joined by spaces, the word owning each character, and each word's end.

    The space before a word belongs to that word: byte-level BPE puts it into the word's first token, and
    sometimes into a token of its own (``Ġ`` before digits).
    """
    lengths = np.array([len(word) for word in words])
    owned = lengths + 1
    owned[0] -= 1
    ends = np.cumsum(owned)
    return " ".join(words), np.repeat(np.arange(len(words)), owned), ends


def tokenize_words(
    tokenizer: PreTrainedTokenizerBase, sentences: Sequence[Sequence[str]], max_length: int
) -> WordBatch:
    """Tokenize pre-split sentences in one call, as the encoder tokenizes the same text, and map tokens to words."""
    if not tokenizer.is_fast:
        raise ValueError(f"word probing needs a fast tokenizer (for token offsets), got {type(tokenizer).__name__}")
    if any(len(words) == 0 for words in sentences):
        raise ValueError("cannot probe an empty sentence")
    texts, owners, ends = zip(*(_char_words(words) for words in sentences), strict=True)
    encoded = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    offsets = encoded["offset_mapping"].numpy()
    real = ((encoded["attention_mask"] == 1) & (encoded["special_tokens_mask"] == 0)).numpy()
    token_words = np.full(real.shape, -1, dtype=np.int64)
    for row, (owner, end) in enumerate(zip(owners, ends, strict=True)):
        starts, stops = offsets[row, real[row], 0], offsets[row, real[row], 1]
        words = owner[np.minimum(starts, len(owner) - 1)]
        reached = np.zeros(len(end), dtype=np.int64)
        np.maximum.at(reached, words, stops)
        token_words[row, real[row]] = np.where(reached[words] >= end[words], words, -1)
    return WordBatch(encoded["input_ids"], encoded["attention_mask"], torch.from_numpy(token_words))


def shift_right(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Put state t-1 at position t, as MNTP trains it (token t is predicted from t-1); a sequence's first real
    token keeps its own state, having nothing before it."""
    shifted = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
    rows = torch.arange(len(hidden), device=hidden.device)
    first = attention_mask.long().argmax(dim=1).to(hidden.device)
    shifted[rows, first] = hidden[rows, first]
    return shifted


def merge_subwords(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    token_words: torch.Tensor,
    words_per_row: Sequence[int],
    merge: Merge = "first",
    shift: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One feature per word (the rows' words one after another) and whether the word had any token to take it from.

    ``merge="first"`` takes the word's first subword, ``"mean"`` averages its subwords; with ``shift`` every
    subword is read one position earlier (see :func:`shift_right`).
    """
    if merge not in ("first", "mean"):
        raise ValueError(f"merge must be 'first' or 'mean', got {merge!r}")
    if shift:
        hidden = shift_right(hidden, attention_mask)
    device = hidden.device
    token_words = token_words.to(device)
    row_starts = torch.tensor(np.concatenate([[0], np.cumsum(words_per_row)[:-1]]), dtype=torch.long, device=device)
    total = int(sum(words_per_row))
    valid = token_words >= 0
    ids = (token_words + row_starts[:, None])[valid]  # row-major, so a word's subwords come in order
    states = hidden[valid].float()
    kept = torch.zeros(total, dtype=torch.bool, device=device)
    kept[ids] = True
    if merge == "first":
        order = torch.arange(len(ids), device=device)
        first = torch.full((total,), len(ids), dtype=torch.long, device=device).scatter_reduce(
            0, ids, order, reduce="amin"
        )
        features = torch.zeros(total, hidden.shape[-1], device=device)
        features[kept] = states[first[kept]]
    else:
        sums = torch.zeros(total, hidden.shape[-1], device=device).index_add_(0, ids, states)
        features = sums / torch.bincount(ids, minlength=total).clamp(min=1)[:, None]
    return features, kept


@torch.inference_mode()
def embed_words(
    encoder: Encoder,
    sentences: Sequence[Sequence[str]],
    merge: Merge = "first",
    shift: bool | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features of all words of all sentences in order (words x dim, float32), and which words were kept.

    Words cut off by ``encoder.max_length`` are not kept (their rows are zero). ``shift`` defaults to the
    encoder's attention: on for bidirectional (MNTP-trained) encoders, off for causal ones.
    """
    check_positive("batch_size", batch_size)
    shift = encoder.bidirectional if shift is None else shift
    counts = [len(words) for words in sentences]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    features = np.zeros((starts[-1], encoder.hidden_size), dtype=np.float32)
    kept = np.zeros(starts[-1], dtype=bool)
    order = np.argsort([-n for n in counts], kind="stable")
    if show_progress_bar is None:
        show_progress_bar = len(sentences) > batch_size and sys.stderr.isatty()
    was_training = encoder.model.training
    encoder.model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Embedding words", disable=not show_progress_bar):
            idx = order[start : start + batch_size]
            batch = tokenize_words(encoder.tokenizer, [sentences[i] for i in idx], encoder.max_length)
            merged, found = merge_subwords(
                encoder.token_states(batch.input_ids, batch.attention_mask).float().cpu(),
                batch.attention_mask,
                batch.token_words,
                [counts[i] for i in idx],
                merge,
                shift,
            )
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
            features[rows], kept[rows] = merged.numpy(), found.numpy()
    finally:
        encoder.model.train(was_training)
    return features, kept


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 42, max_iter: int = 1000
) -> np.ndarray:
    """Test predictions of a multinomial logistic regression fit on standardized train features.

    The scaler is fit on train features only, so nothing about the test set leaks into the probe.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    return probe.fit(train_x, train_y).predict(test_x)


def probe_scores(y_true: np.ndarray, y_pred: np.ndarray, outside: str | None = None) -> dict[str, float]:
    """Word accuracy and macro F1 (x100); with ``outside``, also macro F1 over the other tags.

    ``f1_macro_entities`` is a per-word score over entity tags (``I-PER``, ``B-LOC``, ...), not seqeval's
    entity-span F1: cheaper, and enough to compare encoders on the same probe.
    """
    from sklearn.metrics import accuracy_score, f1_score

    scores = {
        "accuracy": 100 * float(accuracy_score(y_true, y_pred)),
        "f1_macro": 100 * float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    if outside is not None:
        entities = sorted((set(y_true) | set(y_pred)) - {outside})
        scores["f1_macro_entities"] = 100 * float(
            f1_score(y_true, y_pred, labels=entities, average="macro", zero_division=0)
        )
    return scores


def _sample(sentences: list[Sentence], max_samples: int | None, seed: int) -> list[Sentence]:
    """A seeded subset of ``max_samples`` sentences in file order, or all of them."""
    return [sentences[i] for i in sample_indices(len(sentences), max_samples, seed)]


def evaluate_word_probing(
    encoder: Encoder,
    data: str | os.PathLike | None = None,
    tags: Sequence[str] = TAGS,
    merge: Merge = "first",
    shift: bool | None = None,
    max_train_samples: int | None = None,
    max_samples: int | None = None,
    batch_size: int = 32,
    seed: int = 42,
    show_progress_bar: bool | None = None,
) -> list[TaskResult]:
    """Linear probes for the CoNLL-2003 tag sets in ``tags``, trained on train words, scored on test words.

    Reads ``word/conll2003/{train,test}.conll`` under ``data`` (default :func:`lm2vec.datafiles.data_dir`). Each
    sentence is embedded once and its features serve every tag set. ``max_train_samples`` and ``max_samples`` draw
    seeded samples of the train and test sentences for CPU budgets (default: all 14,041 / 3,453). ``seconds``
    splits the embedding time evenly over the results, so they add up to the whole run.
    """
    tags = (tags,) if isinstance(tags, str) else tuple(dict.fromkeys(tags))
    if not tags or any(tag not in TAGS for tag in tags):
        raise ValueError(f"tags must be some of {TAGS}, got {tags}")
    train = _sample(read_conll(data_file(data, "word", "conll2003", "train.conll")), max_train_samples, seed)
    test = _sample(read_conll(data_file(data, "word", "conll2003", "test.conll")), max_samples, seed)
    started = time.perf_counter()

    def features(sentences: list[Sentence]) -> tuple[np.ndarray, np.ndarray]:
        return embed_words(encoder, [s.words for s in sentences], merge, shift, batch_size, show_progress_bar)

    (train_x, train_kept), (test_x, test_kept) = features(train), features(test)
    embed_seconds = (time.perf_counter() - started) / len(tags)
    samples = {
        "train_sentences": len(train),
        "train_words": int(train_kept.sum()),
        "train_words_dropped": int((~train_kept).sum()),
        "test_sentences": len(test),
        "test_words": int(test_kept.sum()),
        "test_words_dropped": int((~test_kept).sum()),
    }
    train_x, test_x = train_x[train_kept], test_x[test_kept]
    results = []
    for tag in tags:
        started = time.perf_counter()
        train_y = np.array([label for s in train for label in getattr(s, tag)])[train_kept]
        test_y = np.array([label for s in test for label in getattr(s, tag)])[test_kept]
        predicted = linear_probe(train_x, train_y, test_x, seed)
        scores = probe_scores(test_y, predicted, outside=OUTSIDE if tag == "ner" else None)
        seconds = embed_seconds + time.perf_counter() - started
        results.append(TaskResult(f"conll2003-{tag}", "word_probing", MAIN_METRIC[tag], scores, dict(samples), seconds))
    return results
