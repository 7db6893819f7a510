"""The MTEB adapter through the real ``mteb.evaluate``, on tasks built from the local data, offline.

The tiny tokenizer knows only the words w4..w127, so the local texts are mapped word by word onto them
(a word always to the same one): pairs that share words still share tokens, and scores are not all ties.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from lm2vec.datafiles import data_dir, read_jsonl
from lm2vec.evaluation import correlations, cosine_rows, load_sts
from lm2vec.evaluation.mteb_adapter import MTEBEncoder
from tests.support import WORDS, needs_data, tiny_encoder

STSB_TEST = data_dir() / "sts" / "stsb" / "test.jsonl"
SCIFACT = data_dir() / "retrieval" / "scifact"
needs_stsb = needs_data("sts/stsb/test.jsonl")
needs_scifact = needs_data("retrieval/scifact/qrels/test.tsv")
STS_TASK = "LocalSTSBenchmark"
RETRIEVAL_TASK = "LocalSciFact"
PAIRS = 100


def tiny_words(text: str) -> str:
    return " ".join(WORDS[zlib.crc32(word.lower().encode()) % len(WORDS)] for word in re.findall(r"\w+", text))


@pytest.fixture(scope="module")
def mteb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """mteb imported offline, its default result cache (created on import) in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTEB_CACHE", str(tmp_path_factory.mktemp("mteb_default_cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield pytest.importorskip("mteb", reason="mteb is not installed (pip install lm2vec[eval])")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Refuse and record every attempt to open an internet connection."""
    attempts: list[tuple] = []
    connect = socket.socket.connect

    def refuse(sock: socket.socket, address: tuple) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test is offline: refused connection to {address}")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def snapshot(*folders: Path) -> set[tuple[str, float]]:
    return {(str(p), p.stat().st_mtime) for folder in folders if folder.exists() for p in [folder, *folder.rglob("*")]}


def metadata(mteb: ModuleType, name: str, task_type: str, main_score: str, path: Path):
    return mteb.TaskMetadata(
        name=name,
        description=f"{task_type} on local files, for tests.",
        dataset={"path": str(path), "revision": "local"},
        type=task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=main_score,
    )


def local_sts_task(mteb: ModuleType):
    """A real mteb STS task whose ``load_data`` reads the first PAIRS pairs of the local STS-B test split."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS

    class LocalSTSBenchmark(AbsTaskSTS):
        metadata = metadata(mteb, STS_TASK, "STS", "cosine_spearman", STSB_TEST)
        min_score, max_score = 0, 5

        def load_data(self, num_proc: int | None = None, **kwargs) -> None:
            pairs = load_sts("stsb", "test", max_samples=PAIRS)
            columns = {
                "sentence1": [tiny_words(s) for s in pairs.sentence1],
                "sentence2": [tiny_words(s) for s in pairs.sentence2],
                "score": pairs.scores.tolist(),
            }
            self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
            self.data_loaded = True

    return LocalSTSBenchmark()


@needs_stsb
def test_mteb_sts_score_equals_lm2vec_sts_and_results_are_written(mteb, tmp_path, no_network):
    encoder = tiny_encoder()
    model = MTEBEncoder(encoder, prompts={"query": "w5 ", STS_TASK: "w6 "})
    home_caches = [Path.home() / ".cache" / "mteb", Path.home() / ".cache" / "huggingface"]
    before = snapshot(*home_caches)

    result = mteb.evaluate(
        model,
        local_sts_task(mteb),
        cache=mteb.ResultCache(tmp_path),
        co2_tracker=False,
        show_progress_bar=False,
        encode_kwargs={"batch_size": 16},
    )

    [task_result] = result.task_results
    mteb_spearman = task_result.get_score()
    pairs = load_sts("stsb", "test", max_samples=PAIRS)
    side1 = encoder.encode([tiny_words(s) for s in pairs.sentence1], instruction="w6 ", batch_size=16)
    side2 = encoder.encode([tiny_words(s) for s in pairs.sentence2], instruction="w6 ", batch_size=16)
    similarities = cosine_rows(side1, side2)
    assert np.unique(similarities.round(6)).size > PAIRS * 0.9  # the random model still tells pairs apart
    spearman, pearson = correlations(similarities, pairs.scores)
    assert mteb_spearman == pytest.approx(spearman / 100, abs=1e-6)  # mteb reports fractions, lm2vec x100
    assert task_result.scores["test"][0]["cosine_pearson"] == pytest.approx(pearson / 100, abs=1e-6)
    # The task-name instruction, not "query" (an STS side has no prompt type) nor none, made these numbers.
    for other in ("w5 ", None):
        o1 = encoder.encode([tiny_words(s) for s in pairs.sentence1], instruction=other, batch_size=16)
        o2 = encoder.encode([tiny_words(s) for s in pairs.sentence2], instruction=other, batch_size=16)
        assert abs(correlations(cosine_rows(o1, o2), pairs.scores)[0] / 100 - mteb_spearman) > 1e-4

    meta = model.mteb_model_meta
    folder = tmp_path / "results" / meta.model_name_as_path() / meta.revision
    saved = json.loads((folder / f"{STS_TASK}.json").read_text())
    assert saved["task_name"] == STS_TASK
    assert saved["scores"]["test"][0]["main_score"] == pytest.approx(mteb_spearman, abs=1e-6)  # saved rounded
    assert json.loads((folder / "model_meta.json").read_text())["embed_dim"] == encoder.dim
    assert snapshot(*home_caches) == before
    assert no_network == []


def local_scifact(queries: int = 20, distractors: int = 80) -> tuple[dict, dict, dict[str, dict[str, int]]]:
    """The first test queries of SciFact, their relevant documents and some others: (queries, corpus, qrels)."""
    qrels: dict[str, dict[str, int]] = {}
    for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        if query_id in qrels or len(qrels) < queries:
            qrels.setdefault(query_id, {})[doc_id] = int(score)
    relevant = {doc_id for docs in qrels.values() for doc_id in docs}
    corpus = [
        doc
        for i, doc in enumerate(read_jsonl(SCIFACT / "corpus.jsonl", ["_id", "title", "text"]))
        if doc["_id"] in relevant or i < distractors
    ]
    texts = {q["_id"]: q["text"] for q in read_jsonl(SCIFACT / "queries.jsonl", ["_id", "text"]) if q["_id"] in qrels}
    return (
        {"id": list(qrels), "text": [tiny_words(texts[q]) for q in qrels]},
        {
            "id": [d["_id"] for d in corpus],
            "title": [tiny_words(d["title"]) for d in corpus],
            "text": [tiny_words(d["text"]) for d in corpus],
        },
        qrels,
    )


def local_retrieval_task(mteb: ModuleType):
    """A real mteb retrieval task whose ``load_data`` reads a slice of the local SciFact files."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    class LocalSciFact(AbsTaskRetrieval):
        metadata = metadata(mteb, RETRIEVAL_TASK, "Retrieval", "ndcg_at_10", SCIFACT)

        def load_data(self, num_proc: int | None = None, **kwargs) -> None:
            queries, corpus, qrels = local_scifact()
            split = RetrievalSplitData(
                queries=Dataset.from_dict(queries),
                corpus=Dataset.from_dict(corpus),
                relevant_docs=qrels,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalSciFact()


def unit_rows(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ndcg_at_10(scores: np.ndarray, query_ids: list[str], doc_ids: list[str], qrels: dict[str, dict[str, int]]) -> float:
    """Mean nDCG@10 with linear gains (as trec_eval): DCG = sum of rel / log2(rank + 1)."""
    values = []
    for row, query_id in zip(scores, query_ids, strict=True):
        ranked = sorted(zip(row, doc_ids, strict=True), reverse=True)[:10]  # ties: higher id first, as trec_eval
        dcg = sum(qrels[query_id].get(doc, 0) / np.log2(rank + 2) for rank, (_, doc) in enumerate(ranked))
        ideal = sorted(qrels[query_id].values(), reverse=True)[:10]
        values.append(dcg / sum(rel / np.log2(rank + 2) for rank, rel in enumerate(ideal)))
    return float(np.mean(values))


@needs_scifact
def test_mteb_retrieval_score_equals_an_independent_ndcg(mteb, tmp_path, no_network):
    encoder = tiny_encoder()
    model = MTEBEncoder(encoder, prompts={"query": "w5 ", "document": "w4 "})
    result = mteb.evaluate(
        model, local_retrieval_task(mteb), cache=mteb.ResultCache(tmp_path), co2_tracker=False, show_progress_bar=False
    )

    queries, corpus, qrels = local_scifact()
    documents = [f"{title} {text}".strip() for title, text in zip(corpus["title"], corpus["text"], strict=True)]
    q, d = (
        unit_rows(encoder.encode(queries["text"], instruction="w5 ")),
        unit_rows(encoder.encode(documents, instruction="w4 ")),
    )
    expected = ndcg_at_10(q @ d.T, queries["id"], corpus["id"], qrels)
    assert 0 < expected < 1
    assert result.task_results[0].get_score() == pytest.approx(expected, abs=1e-6)
    assert no_network == []


def test_mteb_mock_tasks_with_other_query_forms_run(mteb, no_network):
    """mteb's own model checks, for queries with per-query instructions, as conversations and for reranking."""
    names = {"MockInstructionRetrieval", "MockRetrievalDialogTask", "MockRerankingTask"}
    tasks = [task for task in mteb.mocks.ALL_MOCK_TASK_TEST_GRID if task.metadata.name in names]
    result = mteb.evaluate(MTEBEncoder(tiny_encoder()), tasks, cache=None, co2_tracker=False, show_progress_bar=False)
    assert {r.task_name for r in result.task_results} == names and not result.exceptions
    assert no_network == []


def test_prompts_follow_mteb_priority_and_documents_carry_their_title(mteb):
    from datasets import Dataset
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    encoder = tiny_encoder()
    task = metadata(mteb, RETRIEVAL_TASK, "Retrieval", "ndcg_at_10", SCIFACT)
    queries = Dataset.from_dict({"id": ["q1", "q2", "q3"], "text": ["w7 w8", "w9", "w10 w11 w12"]})
    corpus = Dataset.from_dict({"id": ["d1", "d2"], "title": ["w20", ""], "text": ["w21 w22", "w23"]})
    documents = ["w20 w21 w22", "w23"]  # mteb joins a non-empty title to the text

    def embed(prompts: dict[str, str], data: Dataset, prompt_type: PromptType) -> np.ndarray:
        loader = create_dataloader(data, task_metadata=task, prompt_type=prompt_type, batch_size=2)
        return MTEBEncoder(encoder, prompts).encode(
            loader, task_metadata=task, hf_split="test", hf_subset="default", prompt_type=prompt_type, batch_size=2
        )

    def expected(texts: list[str], instruction: str | None) -> np.ndarray:
        return encoder.encode(texts, instruction=instruction, batch_size=2)

    query, document = PromptType.query, PromptType.document
    by_task = {"query": "w5 ", "document": "w4 ", RETRIEVAL_TASK: "w6 "}
    np.testing.assert_array_equal(embed(by_task, queries, query), expected(list(queries["text"]), "w6 "))
    np.testing.assert_array_equal(embed(by_task, corpus, document), expected(documents, "w6 "))
    by_side = {"query": "w5 ", "document": "w4 ", RETRIEVAL_TASK: "w6 ", f"{RETRIEVAL_TASK}-document": "w13 "}
    np.testing.assert_array_equal(embed(by_side, queries, query), expected(list(queries["text"]), "w6 "))
    np.testing.assert_array_equal(embed(by_side, corpus, document), expected(documents, "w13 "))
    by_type = {"query": "w5 "}
    np.testing.assert_array_equal(embed(by_type, queries, query), expected(list(queries["text"]), "w5 "))
    np.testing.assert_array_equal(embed(by_type, corpus, document), expected(documents, None))
    assert embed({}, queries, query).dtype == np.float32


def test_default_prompts_are_the_encoders_own(mteb):
    from mteb.types import PromptType

    task = metadata(mteb, STS_TASK, "STS", "cosine_spearman", STSB_TEST)
    model = MTEBEncoder(tiny_encoder(prompts={"query": "w5 ", "Retrieval": "w7 "}))
    assert model.instruction(task, PromptType.query) == "w5 "
    assert model.instruction(task, None) is None
    assert MTEBEncoder(tiny_encoder(prompts={"query": "w5 "}), prompts={}).instruction(task, PromptType.query) is None
    # As sentence-transformers in mteb: the default prompt applies where no key matches.
    with_default = MTEBEncoder(tiny_encoder(prompts={"query": "w5 ", "document": "w4 "}, default_prompt_name="query"))
    assert with_default.instruction(task, PromptType.document) == "w4 "
    assert with_default.instruction(task, None) == "w5 "


def test_bf16_model_gives_float32_embeddings(mteb):
    from mteb._create_dataloaders import _create_dataloader_from_texts

    encoder = tiny_encoder()
    encoder.model.to(torch.bfloat16)
    task = metadata(mteb, STS_TASK, "STS", "cosine_spearman", STSB_TEST)
    embeddings = MTEBEncoder(encoder).encode(
        _create_dataloader_from_texts(["w4 w5", "w6"]), task_metadata=task, hf_split="test", hf_subset="default"
    )
    assert embeddings.dtype == np.float32 and embeddings.shape == (2, encoder.dim)


def test_model_meta_is_valid_and_its_revision_tracks_weights_and_prompts(mteb):
    encoder = tiny_encoder()
    model = MTEBEncoder(encoder, prompts={"query": "w5 "})
    meta = model.mteb_model_meta
    assert isinstance(model, mteb.EncoderProtocol)
    assert meta.name == "lm2vec/llama-bidirectional-mean"
    assert (meta.embed_dim, meta.max_tokens, meta.n_parameters) == (encoder.dim, 64, encoder.info()["parameters"])
    assert meta.similarity_fn_name.value == "cosine" and meta.use_instructions
    assert MTEBEncoder(encoder, name="me/tuned").mteb_model_meta.name == "me/tuned"
    assert MTEBEncoder(encoder, prompts={"query": "w5 "}).mteb_model_meta.revision == meta.revision
    assert MTEBEncoder(encoder, prompts={"query": "w6 "}).mteb_model_meta.revision != meta.revision
    dot = MTEBEncoder(encoder.with_model(encoder.model, similarity_fn_name="dot"), prompts={"query": "w5 "})
    assert dot.mteb_model_meta.similarity_fn_name.value == "dot" and dot.mteb_model_meta.revision != meta.revision
    a, b = torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(dot.similarity(a, b), torch.tensor([[2.0], [0.0]]))  # scored as the model is
    torch.testing.assert_close(model.similarity_pairwise(a, a), torch.tensor([1.0, 1.0]))
    with torch.no_grad():
        encoder.model.layers[1].mlp.down_proj.weight[5, 7] += 0.01  # one changed weight: a new checkpoint
    assert MTEBEncoder(encoder, prompts={"query": "w5 "}).mteb_model_meta.revision != meta.revision


def test_importing_lm2vec_the_adapter_and_the_sts_scorer_imports_neither_mteb_nor_scikit_learn():
    """mteb loads where the adapter is used; scikit-learn with the task types that need it, not with the STS
    scorer that training's dev evaluation imports."""
    modules = "lm2vec, lm2vec.evaluation, lm2vec.evaluation.mteb_adapter, lm2vec.evaluation.sts"
    code = f"import sys, {modules}; print([m for m in ('mteb', 'sklearn') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
