"""Training stages on tiny random models: MNTP labels, SimCSE padding, loss going down, checkpoints, resume,
NaN handling, GradCache, saved encoders, and bad input refused before any training."""

from __future__ import annotations

import gc
import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForCausalLM, TrainerCallback

import lm2vec
from lm2vec.dense import Dense
from lm2vec.evaluation import evaluate_sts
from lm2vec.evaluation.sts import load_sts
from lm2vec.hardware import describe_machine
from lm2vec.inputs import Tokenization
from lm2vec.loading import ModelLoadError
from lm2vec.training import (
    MNTPConfig,
    NonFiniteLossError,
    SimCSEConfig,
    SupervisedConfig,
    last_checkpoint,
    train_mntp,
    train_simcse,
    train_supervised,
)
from lm2vec.training.conversion import score
from lm2vec.training.losses import info_nce, matryoshka
from lm2vec.training.mntp import IGNORE, MaskingCollator, mntp_loss
from lm2vec.training.stage import add_lora, claim_stage_dir, embedding_stage, length_chunks
from tests.support import (
    ARCHITECTURES,
    HYBRIDS,
    MAMBA2,
    MULTIMODAL,
    VOCAB,
    needs_data,
    random_texts,
    save_multimodal,
    tiny_config,
    tiny_encoder,
    tiny_model,
    tiny_tokenizer,
    word_encoder,
    write_jsonl,
)

FAST = dict(save_steps=2, logging_steps=1, max_length=24, bf16=False)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(random_texts(64, seed=1, max_words=12)) + "\n")
    return path


@pytest.fixture
def triplets(tmp_path: Path) -> Path:
    texts = random_texts(48, seed=2, max_words=10)
    records = [{"query": t, "positive": t + " w5", "negative": texts[(i + 7) % 48]} for i, t in enumerate(texts)]
    return write_jsonl(tmp_path / "nli" / "train.jsonl", records)


def save_causal_lm(path: Path, model_type: str = "llama") -> Path:
    """A tiny random causal LM with its tokenizer, saved as a user's model directory."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, pad_token_id=3, tie_word_embeddings=True))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def causal_lm_dir(tmp_path: Path) -> Path:
    return save_causal_lm(tmp_path / "lm")


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def logged_losses(output: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (output / "log.jsonl").read_text().splitlines()) if "loss" in r]


# -- MNTP -----------------------------------------------------------------------------------------
def test_mntp_loss_scores_the_masked_token_from_the_previous_position():
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config("llama", pad_token_id=3)).eval()
    ids = torch.tensor([[5, 9, 14, 33, 40, 7], [8, 8, 21, 60, 11, 2]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3], labels[1, 1], labels[1, 5] = 33, 8, 2  # masked positions and their original tokens
    with torch.no_grad():
        hidden = lm.model(input_ids=ids).last_hidden_state
        logits = lm(input_ids=ids).logits
        loss = mntp_loss(hidden, labels, lm)
    # by hand: the label at i is scored by the logits at i-1, and nothing else counts
    expected = torch.nn.functional.cross_entropy(logits[[0, 1, 1], [2, 0, 4]], torch.tensor([33, 8, 2]))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    changed = labels.clone()
    changed[0, 4] = IGNORE  # an unmasked position: its label is IGNORE whatever it was
    assert torch.equal(mntp_loss(hidden, changed, lm), loss)


@pytest.mark.parametrize("strategy", ["80/10/10", "all"])
def test_masking_collator(strategy: str):
    torch.manual_seed(0)
    collator = MaskingCollator(mask_id=99, vocab_size=128, probability=0.2, strategy=strategy, special_ids=[2])
    rows = [{"input_ids": [(i * 7 + j) % 90 + 4 for j in range(64)]} for i in range(64)]
    rows[0]["input_ids"][10] = 2  # a special token is never masked
    out = collator(rows)
    original = torch.tensor([r["input_ids"] for r in rows])
    chosen = out["labels"] != IGNORE
    assert not chosen[:, 0].any() and not chosen[0, 10]
    assert 0.17 < chosen.float().mean() < 0.23
    assert torch.equal(out["labels"][chosen], original[chosen])
    assert torch.equal(out["input_ids"][~chosen], original[~chosen])
    masked = (out["input_ids"] == 99) & chosen
    if strategy == "all":
        assert masked.sum() == chosen.sum()
    else:
        assert 0.75 < masked.sum() / chosen.sum() < 0.85


def test_mntp_trains_the_decoder_and_keeps_the_head_frozen(causal_lm_dir: Path, corpus: Path, tmp_path: Path):
    config = MNTPConfig(data=[str(corpus)], steps=4, batch_size=4, mask_token="eos", **dict(FAST, max_length=16))
    encoder = train_mntp(str(causal_lm_dir), config, tmp_path / "mntp")
    assert encoder.bidirectional and not hasattr(encoder.model, "lm_head")  # the decoder, without the LM head
    ids = torch.tensor([[5, 9, 14, 33], [5, 9, 14, 40]])
    with torch.no_grad():
        states = encoder.token_states(ids, torch.ones_like(ids))
    assert (states[0, 0] - states[1, 0]).abs().max() > 1e-4  # the first token sees the last one
    encoder.verify()
    assert len(logged_losses(tmp_path / "mntp")) == 4
    saved = adapter(last_checkpoint(tmp_path / "mntp"))
    assert saved and all("lm_head" not in key and "embed" not in key for key in saved)
    lm2vec.load(tmp_path / "mntp" / "encoder").verify()


def test_mntp_chunks_fit_the_positions_of_a_model_with_fewer(corpus: Path, tmp_path: Path):
    """GPT-2's learned position table ends at n_positions (64 here): 200-token chunks failed at the first step with
    an IndexError. They are cut to the positions, with a warning; the contrastive stages likewise."""
    lm = save_causal_lm(tmp_path / "lm", "gpt2")
    fast = dict(FAST, steps=1, batch_size=2, max_length=200)
    with pytest.warns(UserWarning, match="max_length 200 is cut to the 64 positions of this model"):
        train_mntp(str(lm), MNTPConfig(data=[str(corpus)], mask_token="eos", **fast), tmp_path / "mntp")
    with pytest.warns(UserWarning, match="max_length 200 is cut to the 64 positions"):
        encoder = train_simcse(
            str(tmp_path / "mntp" / "encoder"), SimCSEConfig(data=[str(corpus)], **fast), tmp_path / "simcse"
        )
    assert encoder.max_length == 64
    assert np.isfinite(encoder.encode(" ".join(["w7"] * 300))).all()


def test_mntp_from_an_encoder_without_the_lm_head_is_refused(corpus: Path, tmp_path: Path):
    """An embedding model saved without its untied LM head (a sentence-transformers decoder embedding model, an
    lm2vec encoder): MNTP trained against a head transformers had filled at random."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config("llama", pad_token_id=3, tie_word_embeddings=False))
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    headless = lm2vec.load(tmp_path / "lm", dtype="float32").save(tmp_path / "encoder")
    config = MNTPConfig(data=[str(corpus)], steps=1, batch_size=2, mask_token="eos", **FAST)
    with pytest.raises(ModelLoadError, match=r"has no output head \(lm_head.weight\), which MNTP predicts"):
        train_mntp(str(headless), config, tmp_path / "mntp")
    train_mntp(str(tmp_path / "lm"), config, tmp_path / "mntp")  # the causal LM itself trains


def test_a_new_mask_token_grows_the_vocabulary_and_the_saved_encoder_keeps_it(
    causal_lm_dir: Path, corpus: Path, tmp_path: Path
):
    config = MNTPConfig(data=[str(corpus)], steps=2, batch_size=4, mask_token="new", **dict(FAST, max_length=16))
    train_mntp(str(causal_lm_dir), config, tmp_path / "mntp")
    encoder = lm2vec.load(tmp_path / "mntp" / "encoder", dtype="float32")
    assert encoder.tokenizer.mask_token == "<mask>" and len(encoder.tokenizer) == VOCAB + 1
    assert encoder.model.get_input_embeddings().num_embeddings == VOCAB + 1
    assert np.isfinite(encoder.encode(["w5 <mask> w7"])).all()


def test_a_mask_token_the_vocabulary_lacks_fails_before_the_weights_load(causal_lm_dir: Path, corpus: Path, tmp_path):
    (causal_lm_dir / "model.safetensors").write_bytes(b"not weights")  # loading them would fail otherwise
    config = MNTPConfig(data=[str(corpus)], steps=2, batch_size=4, mask_token="<nothing>", **FAST)
    with pytest.raises(ValueError, match="mask_token '<nothing>' is not a single token of this tokenizer"):
        train_mntp(str(causal_lm_dir), config, tmp_path / "mntp")
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(causal_lm_dir)
    with pytest.raises(ValueError, match="mask_token 'eos': this tokenizer has no EOS token"):  # not a None id
        train_mntp(str(causal_lm_dir), replace(config, mask_token="eos"), tmp_path / "mntp")
    from lm2vec.training import Recipe, convert

    recipe = Recipe("tiny", "test", "test", [("mntp", config)])
    with pytest.raises(ValueError, match="mask_token '<nothing>'"):  # before the baselines are scored
        convert(str(causal_lm_dir), recipe, tmp_path / "out", data_root=tmp_path / "no-sts-b-here")


# -- SimCSE -----------------------------------------------------------------------------------------
def test_simcse_loss_ignores_padding():
    encoder = tiny_encoder()
    model = embedding_stage(encoder, SimCSEConfig()).eval()
    tokenization = Tokenization(encoder.tokenizer, 64)
    texts = random_texts(6, seed=3, max_words=8)
    ids, prefix = tokenization.tokenize([""] * 6, texts)
    losses = []
    for extra in (0, 7):
        batch = tokenization.collate(ids, prefix, width=max(map(len, ids)) + extra)
        with torch.no_grad():
            first = model(batch.input_ids, batch.attention_mask, batch.pool_mask)
            second = model(batch.input_ids.flip(0), batch.attention_mask.flip(0), batch.pool_mask.flip(0)).flip(0)
        losses.append(info_nce(first, second, scale=20.0))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(triplets: Path, tmp_path: Path):
    rows = [json.loads(line) for line in triplets.read_text().splitlines()][:8]
    write_jsonl(tmp_path / "fixed" / "train.jsonl", rows)
    config = SupervisedConfig(
        data=[str(tmp_path / "fixed" / "train.jsonl")],
        steps=12,
        batch_size=8,
        learning_rate=3e-3,
        lora_dropout=0.0,
        **FAST,
    )
    train_supervised(tiny_encoder(), config, tmp_path / "out")
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_mixture_of_experts_models_train_lora_on_their_linear_layers(model_type: str, corpus: Path, tmp_path: Path):
    """peft's "all-linear" would also wrap the experts' 3D weights, where LoRA dropout fails: they stay frozen."""
    encoder = tiny_encoder(model_type)
    experts = {name: p.detach().clone() for name, p in encoder.model.named_parameters() if p.dim() == 3}
    config = SimCSEConfig(data=[str(corpus)], steps=2, batch_size=8, lora_dropout=0.05, **FAST)
    trained = train_simcse(encoder, config, tmp_path / "out")
    saved = adapter(last_checkpoint(tmp_path / "out"))
    assert experts and saved and not any("experts" in key for key in saved)
    assert any("q_proj" in key for key in saved)
    reloaded = dict(lm2vec.load(tmp_path / "out" / "encoder", dtype="float32").model.named_parameters())
    assert all(torch.equal(reloaded[name], weight) for name, weight in experts.items())
    assert trained.encode(["w5 w6", "w7"]).shape == (2, 64)


MAMBA = {"mamba_d_ssm": 64, "mamba_n_heads": 8, **MAMBA2}  # Falcon-H1's sizes, tiny


@pytest.mark.parametrize("model_type, blocks", [("falcon_h1", MAMBA), ("nemotron_h", HYBRIDS["nemotron_h"][0])])
def test_mamba_hybrids_train_causal_with_lora_on_every_layer_peft_allows(
    model_type: str, blocks: dict, corpus: Path, tmp_path: Path
):
    """peft refuses LoRA on a Mamba mixer's ``out_proj`` (its CUDA kernels read the weight): "all-linear" leaves it
    out, where every stage on these models failed; named in ``lora_targets``, peft's own error says why."""
    config = tiny_config(model_type, pad_token_id=3, num_hidden_layers=4, head_dim=16, **blocks)
    encoder = lm2vec.Encoder(tiny_model(lm2vec.set_bidirectional(config, False)), tiny_tokenizer(), bidirectional=False)
    linear = {n for n, m in encoder.model.named_modules() if isinstance(m, torch.nn.Linear)}
    mixers = {n for n in linear if n.endswith(".out_proj")}
    settings = dict(data=[str(corpus)], steps=2, batch_size=8, lora_dropout=0.05, **FAST)
    trained = train_simcse(encoder, SimCSEConfig(**settings), tmp_path / "out")
    wrapped = {
        key.split(".lora_")[0].removeprefix("base_model.model.") for key in adapter(last_checkpoint(tmp_path / "out"))
    }
    assert mixers and wrapped == linear - mixers
    reloaded = lm2vec.load(tmp_path / "out" / "encoder", dtype="float32", bidirectional=False)
    np.testing.assert_allclose(reloaded.encode(["w5 w6", "w7"]), trained.encode(["w5 w6", "w7"]), atol=1e-5)
    with pytest.raises(ValueError, match="'out_proj' is incompatible with Mamba"):
        train_simcse(trained, SimCSEConfig(**settings, lora_targets=["out_proj"]), tmp_path / "named")


def test_a_stage_does_not_pass_on_peft_s_deprecation_warning():
    """peft reads ``is_gradient_checkpointing``, which transformers 5 deprecates: a FutureWarning at every stage."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(AutoModelForCausalLM.from_config(tiny_config("llama")), SimCSEConfig(data=["unused"], **FAST))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]


def test_a_folder_with_nothing_trained_in_it_is_taken_as_it_is(corpus: Path, tmp_path: Path):
    """A run that failed before training left its settings only: a new run, with other settings, may use it."""
    config = SimCSEConfig(data=[str(corpus)], steps=2, batch_size=8, learning_rate=1e-3, **FAST)
    claim_stage_dir(tmp_path / "out", replace(config, steps=5), resume=False)
    train_simcse(tiny_encoder(), config, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "stage-settings.json").read_text())["steps"] == 2


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(corpus: Path, tmp_path: Path):
    config = SimCSEConfig(data=[str(corpus)], steps=6, batch_size=8, learning_rate=1e-3, **FAST)
    train_simcse(tiny_encoder(), config, tmp_path / "straight")

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_simcse(tiny_encoder(), config, tmp_path / "resumed", callbacks=[Interrupt()])
    assert last_checkpoint(tmp_path / "resumed").name == "checkpoint-4"
    with pytest.raises(FileExistsError, match="resume"):
        train_simcse(tiny_encoder(), config, tmp_path / "resumed")
    with pytest.raises(ValueError, match=r"other settings \(steps: 6 there, 7 now\)"):  # the library checks too
        train_simcse(tiny_encoder(), replace(config, steps=7), tmp_path / "resumed", resume=True)
    saved = tmp_path / "resumed" / "checkpoint-4" / "adapter_model.safetensors"
    weights = load_file(saved)
    first, *rest = weights
    kept = {k: weights[k] for k in rest}
    for changed, error in ((kept, "lacks"), ({f"{first}.x": weights[first], **kept}, "has not")):
        save_file(changed, saved)  # not resumed from a model that is not the checkpoint's
        with pytest.raises(ValueError, match=f"{error}.*another run's"):
            train_simcse(tiny_encoder(), config, tmp_path / "resumed", resume=True)
    save_file(weights, saved)
    train_simcse(tiny_encoder(), config, tmp_path / "resumed", resume=True)
    straight, resumed = adapter(tmp_path / "straight" / "checkpoint-6"), adapter(tmp_path / "resumed" / "checkpoint-6")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    assert any(straight[k].abs().sum() > 0 for k in straight if "lora_B" in k)  # it did train


def test_a_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(corpus: Path, tmp_path: Path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    config = SimCSEConfig(data=[str(corpus)], steps=8, batch_size=8, **FAST)
    with pytest.raises(NonFiniteLossError, match="step 4.*checkpoint-2"):
        train_simcse(tiny_encoder(), config, tmp_path / "out", callbacks=[Poison()])
    good = last_checkpoint(tmp_path / "out")
    assert good.name == "checkpoint-2" and not (tmp_path / "out" / "checkpoint-4").exists()
    assert all(torch.isfinite(t).all() for t in adapter(good).values())


@pytest.mark.parametrize("mini, cache, kept", [(5, False, 0), (3, True, 0), (3, True, 4)])
def test_length_sorted_passes_and_gradcache_give_the_gradients_of_the_full_batch(
    triplets: Path, tmp_path: Path, mini: int, cache: bool, kept: int
):
    results = []
    split = {"mini_batch_size": mini, "grad_cache": cache, "kept_graphs": kept}
    for run, settings in (("full", {}), ("split", split)):
        config = SupervisedConfig(
            data=[str(triplets)], steps=2, batch_size=12, learning_rate=1e-3, lora_dropout=0.0, **settings, **FAST
        )
        train_supervised(tiny_encoder(), config, tmp_path / run)
        results.append(adapter(tmp_path / run / "checkpoint-2"))
    # Adam moves every weight by ~lr (1e-3) a step; trimmed padding changes fp32 rounding, which Adam turns
    # into ~2e-5 on weights whose gradient is near zero. A wrong gradient would move them by ~1e-3.
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-3, atol=1e-4)


def test_matryoshka_sums_the_loss_over_leading_dims():
    torch.manual_seed(0)
    queries, candidates = torch.randn(6, 32), torch.randn(9, 32)
    expected = info_nce(queries[:, :8], candidates[:, :8], 20.0) + info_nce(queries, candidates, 20.0)
    torch.testing.assert_close(matryoshka(info_nce, [8, 32])(queries, candidates, 20.0), expected)
    assert matryoshka(info_nce, None) is info_nce
    with pytest.raises(ValueError, match="exceed the embedding size 32"):
        matryoshka(info_nce, [64])(queries, candidates, 20.0)
    with pytest.raises(ValueError, match="matryoshka_dims must be a list of positive integers"):
        SupervisedConfig(matryoshka_dims=[0, 64])


def test_matryoshka_training_through_gradcache_and_saved_with_its_dims(triplets: Path, tmp_path: Path):
    results = []
    for run, settings in (("full", {}), ("cached", {"mini_batch_size": 5, "grad_cache": True})):
        config = SupervisedConfig(
            data=[str(triplets)], steps=2, batch_size=12, learning_rate=1e-3, lora_dropout=0.0,
            matryoshka_dims=[16, 64], **settings, **FAST,
        )  # fmt: skip
        encoder = train_supervised(tiny_encoder(), config, tmp_path / run)
        results.append(adapter(tmp_path / run / "checkpoint-2"))
    for key in results[0]:  # GradCache back-propagates the Matryoshka sum as the full batch does
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-3, atol=1e-4)
    plain = SupervisedConfig(data=[str(triplets)], steps=2, batch_size=12, learning_rate=1e-3, lora_dropout=0.0, **FAST)
    train_supervised(tiny_encoder(), plain, tmp_path / "plain")
    assert not torch.allclose(adapter(tmp_path / "plain" / "checkpoint-2")[key], results[0][key])
    saved = lm2vec.load(tmp_path / "cached" / "encoder", dtype="float32")
    assert encoder.matryoshka_dims == saved.matryoshka_dims == (16, 64)
    assert "Matryoshka) to 16, 64 dimensions" in (tmp_path / "cached" / "encoder" / "README.md").read_text()


def test_length_chunks_trim_padding_and_keep_every_row():
    encoder = tiny_encoder(padding_side="left")
    texts = random_texts(9, seed=8, max_words=15)
    batch = encoder.tokenization([""] * 9, texts)
    parts = length_chunks(vars(batch), 4)
    assert sorted(torch.cat([index for index, _ in parts]).tolist()) == list(range(9))
    for index, part in parts:
        assert part["attention_mask"].any(0).all()  # no column of padding only
        assert torch.equal(part["attention_mask"].sum(-1), batch.attention_mask[index].sum(-1))


def _with_dense(encoder: lm2vec.Encoder) -> lm2vec.Encoder:
    torch.manual_seed(1)
    return encoder.with_model(encoder.model, dense=(Dense(64, 48, activation=torch.nn.Tanh()),))


@pytest.mark.parametrize("dense", [False, True])
def test_trained_encoder_reloads_with_its_embeddings(corpus: Path, tmp_path: Path, dense: bool):
    """With a Dense module (EmbeddingGemma's layout) too: it projects in training as in encoding, is kept as loaded,
    and is saved with the trained model."""
    config = SimCSEConfig(data=[str(corpus)], steps=2, batch_size=8, learning_rate=1e-2, **FAST)
    start = _with_dense(tiny_encoder()) if dense else tiny_encoder()
    # copies: the trained encoder shares the Dense modules
    projections = [{name: t.clone() for name, t in layer.state_dict().items()} for layer in start.dense]
    encoder = train_simcse(start, config, tmp_path / "out")
    texts = random_texts(10, seed=4)
    before = encoder.encode(texts)
    assert before.shape == (10, 48 if dense else 64)
    saved = lm2vec.load(tmp_path / "out" / "encoder", dtype="float32").dense
    for layers in (encoder.dense, saved):
        for layer, weights in zip(layers, projections, strict=True):
            torch.testing.assert_close(layer.state_dict(), weights, rtol=0, atol=0)
    untrained = (_with_dense(tiny_encoder()) if dense else tiny_encoder()).encode(texts)
    assert np.abs(before - untrained).max() > 1e-3  # the merged adapter changed the model
    path = tmp_path / "out" / "encoder"
    np.testing.assert_allclose(lm2vec.load(path, dtype="float32").encode(texts), before, atol=1e-5)
    np.testing.assert_allclose(SentenceTransformer(str(path), device="cpu").encode(texts), before, atol=1e-4)
    assert not math.isclose(encoder.model.config.attention_dropout, 0.3)  # training dropout is not saved


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. peft's on GPT-2's Conv1D layers, each stage
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_trains_through_the_recipe_and_reloads_with_its_embeddings(
    model_type: str, corpus: Path, triplets: Path, tmp_path: Path
):
    """MNTP on the causal LM (its own head), SimCSE, supervised: each stage's adapter merged into the next."""
    lm = save_causal_lm(tmp_path / "lm", model_type)  # attention: as the library picks
    fast = dict(FAST, steps=2, batch_size=4, learning_rate=1e-2)
    train_mntp(str(lm), MNTPConfig(data=[str(corpus)], mask_token="eos", **fast), tmp_path / "mntp")
    train_simcse(str(tmp_path / "mntp" / "encoder"), SimCSEConfig(data=[str(corpus)], **fast), tmp_path / "simcse")
    encoder = train_supervised(
        str(tmp_path / "simcse" / "encoder"), SupervisedConfig(data=[str(triplets)], **fast), tmp_path / "supervised"
    )
    texts = random_texts(6, seed=4, max_words=12)
    trained = encoder.encode(texts)
    untrained = lm2vec.load(lm, dtype="float32").encode(texts)
    assert np.isfinite(trained).all() and np.abs(trained - untrained).max() > 1e-3  # the stages changed the model
    reloaded = lm2vec.load(tmp_path / "supervised" / "encoder", dtype="float32")  # verifies bidirectional attention
    np.testing.assert_allclose(reloaded.encode(texts), trained, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma3", "llava"])
def test_a_multimodal_models_text_decoder_trains_with_its_lm_head_and_lora_on_its_text_layers(
    model_type: str, corpus: Path, tmp_path: Path
):
    """MNTP predicts with the multimodal model's own LM head (Gemma 3's causal LM class, Llava's multimodal one),
    LoRA on the text decoder alone; the stages save an encoder of the text type."""
    path = save_multimodal(tmp_path / model_type, model_type)
    fast = dict(FAST, steps=2, batch_size=4, learning_rate=1e-2)
    train_mntp(str(path), MNTPConfig(data=[str(corpus)], mask_token="eos", **fast), tmp_path / "mntp")
    trained = adapter(last_checkpoint(tmp_path / "mntp"))
    assert trained and not [name for name in trained if "vision" in name or "lm_head" in name]
    encoder = train_simcse(str(tmp_path / "mntp" / "encoder"), SimCSEConfig(data=[str(corpus)], **fast), tmp_path / "s")
    texts = random_texts(6, seed=4, max_words=12)
    vectors = encoder.encode(texts)
    assert np.abs(vectors - lm2vec.load(path, dtype="float32").encode(texts)).max() > 1e-3  # the stages trained it
    reloaded = lm2vec.load(tmp_path / "s" / "encoder", dtype="float32")  # verifies bidirectional attention
    assert reloaded.model.config.model_type == MULTIMODAL[model_type][0]
    np.testing.assert_allclose(reloaded.encode(texts), vectors, atol=1e-5)


def test_mntp_needs_a_causal_lm_of_a_multimodal_models_text_type_and_simcse_does_not(corpus: Path, tmp_path: Path):
    """Refused from the config, before the weights load and, in ``convert``, before the baselines are scored."""
    path = save_multimodal(tmp_path / "qwen2_vl", "qwen2_vl")  # transformers has no Qwen2-VL text causal LM
    fast = dict(FAST, steps=2, batch_size=4)
    weights = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(b"not weights")  # loading them would fail otherwise
    config = MNTPConfig(data=[str(corpus)], mask_token="eos", **fast)
    refused = "no causal LM of qwen2_vl_text, the text model of qwen2_vl.*cpu-no-mntp"
    with pytest.raises(ModelLoadError, match=refused):
        train_mntp(str(path), config, tmp_path / "mntp")
    from lm2vec.training import Recipe, convert

    with pytest.raises(ModelLoadError, match=refused):
        convert(str(path), Recipe("tiny", "test", "test", [("mntp", config)]), tmp_path / "out", data_root=tmp_path)
    (path / "model.safetensors").write_bytes(weights)
    encoder = train_simcse(str(path), SimCSEConfig(data=[str(corpus)], **fast), tmp_path / "simcse")
    assert encoder.model.config.model_type == "qwen2_vl_text"


def test_pairs_without_negatives_and_sentence_transformers_column_names(tmp_path: Path, monkeypatch):
    """sentence-transformers' datasets name the query "anchor", and many are (anchor, positive) pairs: they were
    refused for a missing "query" / "negative" field. Pairs train on in-batch negatives only; a run does not mix
    pairs with triplets (under DDP each device's candidates must number the same). A hub dataset without the columns
    a stage reads is a ValueError naming them, not a KeyError."""
    from lm2vec.training import data
    from lm2vec.training.data import Triplet, triplets
    from lm2vec.training.supervised import TripletCollator

    texts = random_texts(24, seed=5, max_words=8)
    pairs = write_jsonl(tmp_path / "pairs" / "train.jsonl", [{"anchor": t, "positive": t + " w5"} for t in texts])
    records = [{"anchor": t, "positive": t + " w5", "negative": texts[(i + 3) % 24]} for i, t in enumerate(texts)]
    st_triplets = write_jsonl(tmp_path / "st.jsonl", records)
    read = triplets([str(pairs)])
    assert read[0] == Triplet("pairs", texts[0], texts[0] + " w5", None) and len(read) == 24
    assert triplets([str(st_triplets)])[1] == Triplet("st", texts[1], texts[1] + " w5", texts[4])
    encoder = tiny_encoder()
    batch = TripletCollator(encoder.tokenization, {}, "")([read[:8]])
    assert batch["query_input_ids"].shape[0] == batch["document_input_ids"].shape[0] == 8  # positives only
    with pytest.raises(ValueError, match=r"mixes \(query, positive\) pairs \(pairs\) with triplets"):
        triplets([str(pairs), str(st_triplets)])
    with pytest.raises(ValueError, match=r"train.jsonl:1: missing field\(s\) 'query'"):
        triplets([str(write_jsonl(tmp_path / "q" / "train.jsonl", [{"question": "w4", "positive": "w5"}]))])
    monkeypatch.chdir(tmp_path)  # a name that is no file is a hub dataset; `datasets` finds a folder of that name
    write_jsonl(tmp_path / "hub_pairs" / "train.jsonl", [{"anchor": t, "positive": t + " w5"} for t in texts])
    assert triplets(["hub_pairs"])[2] == Triplet("hub_pairs", texts[2], texts[2] + " w5", None)
    write_jsonl(tmp_path / "hub_other" / "train.jsonl", [{"question": t, "answer": t} for t in texts])
    with pytest.raises(ValueError, match=r"hub_other: supervised data needs the columns query \(or anchor\)"):
        triplets(["hub_other"])
    with pytest.raises(ValueError, match=r"hub_other: MNTP and SimCSE data needs a 'text' column; it has \['questi"):
        data.texts(["hub_other"])  # not a KeyError
    config = SupervisedConfig(data=[str(pairs)], steps=2, batch_size=8, learning_rate=1e-2, **FAST)
    trained = train_supervised(encoder, config, tmp_path / "out")
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert np.abs(trained.encode(texts[:4]) - tiny_encoder().encode(texts[:4])).max() > 1e-4


def test_queries_pool_their_instruction_where_the_encoder_includes_the_prompt():
    """A sentence-transformers model whose Pooling includes the prompt trains as it encodes: its instruction tokens
    pooled with the query's (they were left out in training, pooled at inference)."""
    from lm2vec.training.data import Triplet
    from lm2vec.training.supervised import TripletCollator

    encoder = tiny_encoder()
    rows = [[Triplet("nli", "w4 w5", "w6", None)]]
    pooled = {}
    for include in (False, True):
        encoder.include_prompt = include
        batch = TripletCollator(encoder.tokenization, {}, "w9 w10 w11 ")(rows)
        pooled[include] = int(batch["query_pool_mask"].sum())
        assert int(batch["query_attention_mask"].sum()) == 5
    assert pooled == {False: 2, True: 5}


# -- bad input ---------------------------------------------------------------------------------------
def test_malformed_training_line_names_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad" / "train.jsonl"
    write_jsonl(bad, [{"query": "w4", "positive": "w5", "negative": "w6"}])
    with bad.open("a") as f:
        f.write('{"query": "w4", "positive": "w5"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2: missing field\(s\) 'negative'"):
        train_supervised(tiny_encoder(), SupervisedConfig(data=[str(bad)], **FAST), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_or_missing_data_fails_before_training(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        train_simcse(tiny_encoder(), SimCSEConfig(data=[str(empty)], **FAST), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        train_simcse(tiny_encoder(), SimCSEConfig(data=["nowhere.txt"], **FAST), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- recipes -----------------------------------------------------------------------------------------
def test_packaged_recipes_load_and_say_how_they_were_chosen():
    from lm2vec.training import load_recipe
    from lm2vec.training.config import builtin_recipes

    assert builtin_recipes() == ["cpu", "cpu-no-mntp", "reference", "small"]
    for name in builtin_recipes():
        recipe = load_recipe(name)
        stages = ["simcse", "supervised"] if name.endswith("no-mntp") else ["mntp", "simcse", "supervised"]
        assert recipe.how_chosen and [stage for stage, _ in recipe.stages] == stages
        # bf16 by measurement on every machine (a GPU without bf16, a CPU that runs it slower than float32)
        assert all(config.bf16 is None for _, config in recipe.stages), name


def test_the_equal_budget_ablation_is_the_cpu_recipe_with_mntp_steps_given_to_simcse():
    from dataclasses import replace

    from lm2vec.training import load_recipe

    cpu, ablation = dict(load_recipe("cpu").stages), dict(load_recipe("cpu-no-mntp").stages)
    assert ablation["supervised"] == cpu["supervised"]
    steps = cpu["simcse"].steps + cpu["mntp"].steps
    assert ablation["simcse"] == replace(cpu["simcse"], steps=steps)
    reference = dict(load_recipe("reference").stages)
    assert reference["simcse"].learning_rate == 3e-5 and reference["simcse"].batch_size == 128


def test_recipe_errors(tmp_path: Path):
    from lm2vec.training import load_recipe, stage_config

    with pytest.raises(ValueError, match="unknown recipe 'nope'.*cpu, cpu-no-mntp, reference, small"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="unknown stage 'mtnp'"):
        stage_config("mtnp", {})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"description": "", "how_chosen": "", "stages": [{"stage": "mntp", "lr": 1}]}))
    with pytest.raises(ValueError, match="stage 1: unknown mntp setting.*'lr'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="save_steps"):
        stage_config("simcse", {"save_steps": 5, "eval_steps": 2})
    with pytest.raises(ValueError, match="kept_graphs needs grad_cache"):
        stage_config("supervised", {"mini_batch_size": 8, "kept_graphs": 3})
    # JSON of the wrong type: a string switch was read by truthiness ("no" turned it on), true counted as 1 step
    for settings, refused in (
        ({"gradient_checkpointing": "no"}, "gradient_checkpointing must be bool, got 'no'"),
        ({"bf16": "false"}, "bf16 must be bool or None, got 'false'"),
        ({"steps": True}, "steps must be int, got True"),
        ({"learning_rate": "3e-4"}, "learning_rate must be float, got '3e-4'"),
        ({"data": ["a.txt", 3]}, r"data must be list\[str\], got \['a.txt', 3\]"),
        ({"instructions": {"nli": None}}, r"instructions must be dict\[str, str\]"),
        ({"matryoshka_dims": 64}, r"matryoshka_dims must be list\[int\] or None, got 64"),
    ):
        with pytest.raises(ValueError, match=refused):
            stage_config("supervised", settings)
    config = stage_config("supervised", {"learning_rate": 1, "bf16": None, "lora_targets": ["q_proj"]})
    assert config.learning_rate == 1 and config.lora_targets == ["q_proj"]  # an integer is a float, a list or a str


def test_convert_runs_the_stages_in_order_and_resumes_finished_ones(
    causal_lm_dir: Path, corpus: Path, triplets: Path, tmp_path: Path
):
    from lm2vec.training import Recipe, convert

    tiny = dict(FAST, steps=2, batch_size=4, max_length=16)
    recipe = Recipe(
        "tiny",
        "test",
        "test",
        [
            ("mntp", MNTPConfig(data=[str(corpus)], mask_token="eos", **tiny)),
            ("simcse", SimCSEConfig(data=[str(corpus)], **tiny)),
            ("supervised", SupervisedConfig(data=[str(triplets)], **tiny)),
        ],
    )
    lines: list[str] = []
    encoder, rows = convert(str(causal_lm_dir), recipe, tmp_path / "out", evaluate=False, log=lines.append)
    assert [p.name for p in sorted((tmp_path / "out").glob("[0-9]-*"))] == ["1-mntp", "2-simcse", "3-supervised"]
    assert [r.model for r in rows] == [
        "bidirectional + mntp",
        "bidirectional + mntp + simcse",
        "bidirectional + mntp + simcse + supervised",
    ]
    texts = random_texts(6, seed=7)
    np.testing.assert_allclose(
        lm2vec.load(tmp_path / "out" / "encoder", dtype="float32").encode(texts), encoder.encode(texts), atol=1e-5
    )
    again, resumed = convert(
        str(causal_lm_dir), recipe, tmp_path / "out", evaluate=False, resume=True, log=lines.append
    )
    assert sum("already finished" in line for line in lines) == 3
    assert resumed == rows  # the rows of the run that trained them: its wall times, not the time to reload
    np.testing.assert_allclose(again.encode(texts), encoder.encode(texts), atol=1e-5)
    edited = replace(recipe, stages=[*recipe.stages[:2], ("supervised", replace(recipe.stages[2][1], steps=3))])
    with pytest.raises(ValueError, match=r"3-supervised was trained with other settings \(steps: 2 there, 3 now\)"):
        convert(str(causal_lm_dir), edited, tmp_path / "out", evaluate=False, resume=True, log=lines.append)
    with pytest.raises(FileExistsError, match="1-mntp holds an earlier run; pass resume=True"):
        convert(str(causal_lm_dir), recipe, tmp_path / "out", evaluate=False, log=lines.append)
    other = save_causal_lm(tmp_path / "mistral", "mistral")  # the same layers' names and shapes: nothing else tells
    with pytest.raises(ValueError, match=f"holds a run on another model \\({causal_lm_dir}\\)"):
        convert(str(other), recipe, tmp_path / "out", evaluate=False, resume=True, log=lines.append)
    moved = shutil.copytree(causal_lm_dir, tmp_path / "moved")  # the same model elsewhere: its run resumes
    convert(str(moved), recipe, tmp_path / "out", evaluate=False, resume=True, log=lines.append)
    assert sum("already finished" in line for line in lines) == 6
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["stages"][2]["steps"] == 2  # left as it was
    card = (tmp_path / "out" / "encoder" / "README.md").read_text()
    assert "Recipe `tiny`" in card and "| mntp | 2 | 4 |" in card and "| supervised | 2 | 4 |" in card
    assert "| bidirectional + mntp + simcse + supervised | - | - |" in card  # not evaluated here
    causal, rows = convert(str(causal_lm_dir), recipe, tmp_path / "causal", evaluate=False, causal=True, log=print)
    assert not causal.bidirectional and causal.pooling == "weighted_mean"
    assert [r.model for r in rows] == [
        "causal (weighted mean) + simcse",
        "causal (weighted mean) + simcse + supervised",
    ]
    with pytest.raises(ValueError, match="no stage but MNTP, which the causal ablation skips"):
        convert(str(causal_lm_dir), replace(recipe, stages=recipe.stages[:1]), tmp_path / "c", causal=True, log=print)


@needs_data("sts/stsb/dev.jsonl", "sts/stsb/test.jsonl")
def test_the_bidirectional_chain_starts_bidirectional_from_a_causal_directory(
    causal_lm_dir: Path, corpus: Path, tmp_path: Path
):
    """A saved causal encoder, or a sentence-transformers decoder model (causal as saved), as convert's source: a
    SimCSE first stage trained it causal under the row name "bidirectional + simcse"."""
    from lm2vec.training import Recipe, convert

    source = lm2vec.load(causal_lm_dir, bidirectional=False, dtype="float32").save(tmp_path / "causal")
    recipe = Recipe(
        "tiny", "test", "test", [("simcse", SimCSEConfig(data=[str(corpus)], steps=1, batch_size=4, **FAST))]
    )
    encoder, rows = convert(str(source), recipe, tmp_path / "out", evaluate=False, log=print)
    assert encoder.bidirectional and [r.model for r in rows] == ["bidirectional + simcse"]
    assert lm2vec.load(tmp_path / "out" / "encoder").bidirectional  # and saved so


def test_rows_are_scored_in_float32_on_the_fastest_kernels_and_the_encoder_is_left_as_it_was():
    splits = {split: load_sts("stsb", split, max_samples=300) for split in ("dev", "test")}
    encoder = word_encoder([s for pairs in splits.values() for s in pairs.sentence1 + pairs.sentence2])
    plain = {split: evaluate_sts(encoder, split, max_samples=300).scores["spearman"] for split in splits}
    assert score(encoder, None, max_samples=300) == pytest.approx(plain, abs=0.05)
    assert encoder.dtype == "float32" and encoder.batch_invariant


@needs_data("sts/stsb/dev.jsonl", "sts/stsb/test.jsonl")
def test_a_converted_encoder_carries_a_model_card_with_its_sts_scores(
    causal_lm_dir: Path, corpus: Path, tmp_path: Path
):
    from lm2vec.training import Recipe, convert

    stage = SimCSEConfig(data=[str(corpus)], **dict(FAST, steps=2, batch_size=4, max_length=16))
    recipe = Recipe("card", "A one-stage test recipe.", "test", [("simcse", stage)])
    encoder, rows = convert(str(causal_lm_dir), recipe, tmp_path / "out", baselines=False, log=print)
    card = (tmp_path / "out" / "encoder" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name:") and "A one-stage test recipe." in card
    assert f"Recipe `card` on {describe_machine()}." in card  # the machine the figures come from
    assert f"| bidirectional + simcse | {rows[0].dev:.1f} | {rows[0].test:.1f} |" in card
    assert "Pooling: mean" in card and 'lm2vec.load("encoder")' in card
    assert SentenceTransformer(str(tmp_path / "out" / "encoder"), device="cpu").get_embedding_dimension()


def test_a_row_shows_gpu_memory_where_training_used_a_gpu_and_earlier_results_without_it_still_read(tmp_path: Path):
    from lm2vec.training import Recipe
    from lm2vec.training.conversion import Row, earlier_rows, results_table

    recipe = Recipe("rows", "test", "test", [])
    table = results_table(recipe, [Row("cpu", 70.0, 60.0, 120.0, 5.25), Row("gpu", 70.0, 60.0, 120.0, 2.0, 11.5)])
    assert table[-2].endswith("| 2.0 min | 5.2 GB |") and table[-1].endswith("| 2.0 min | 2.0 GB, GPU 11.5 GB |")
    row = {"model": "cpu", "dev": 70.0, "test": 60.0, "seconds": 120.0, "peak_memory_gb": 5.25}  # before the GPU field
    (tmp_path / "results.json").write_text(json.dumps({"recipe": "rows", "rows": [row]}))
    assert earlier_rows(tmp_path) == {"cpu": Row("cpu", 70.0, 60.0, 120.0, 5.25)}


@needs_data("sts/stsb/dev.jsonl", "sts/stsb/test.jsonl")
def test_convert_with_seeds_reports_mean_and_sd_and_seeds_change_the_run(
    causal_lm_dir: Path, corpus: Path, tmp_path: Path
):
    from lm2vec.training import Recipe, convert_seeds

    stage = SimCSEConfig(data=[str(corpus)], **dict(FAST, steps=2, batch_size=4, max_length=16, learning_rate=1e-2))
    recipe = Recipe("seeds", "test", "test", [("simcse", stage)])
    live: list[int] = []  # Encoders alive as each seed's stage starts: the seed before must not be held any more
    summary = convert_seeds(
        str(causal_lm_dir), recipe, tmp_path / "out", [1, 2], baselines=False, log=counting_live_encoders(live)
    )
    assert len(live) == 2 and live[1] == live[0], live
    runs = [json.loads((tmp_path / "out" / f"seed-{s}" / "results.json").read_text())["rows"] for s in (1, 2)]
    tests = [rows[0]["test"] for rows in runs]
    assert tests[0] != tests[1]  # another seed: another LoRA initialisation and data order
    mean, sd = np.mean(tests), np.std(tests, ddof=1)
    assert [(r.model, r.test, r.seeds) for r in summary] == [("bidirectional + simcse", f"{mean:.1f} +- {sd:.1f}", 2)]
    assert "| bidirectional + simcse | " in (tmp_path / "out" / "results.md").read_text()
    again = convert_seeds(str(causal_lm_dir), recipe, tmp_path / "again", [1], baselines=False, log=print)
    assert again[0].test == f"{tests[0]:.1f} +- 0.0"  # a seed reproduces its run


@needs_data("sts/stsb/dev.jsonl", "sts/stsb/test.jsonl")
def test_an_mntp_first_stage_trains_without_the_untrained_encoder_loaded(
    causal_lm_dir: Path, corpus: Path, tmp_path: Path
):
    """MNTP loads the causal LM itself: the untrained encoder scored as a baseline is gone before it starts."""
    from lm2vec.training import Recipe, convert

    stage = MNTPConfig(data=[str(corpus)], mask_token="eos", **dict(FAST, steps=2, batch_size=4, max_length=16))
    before, live = live_encoders(), []  # (other tests may leave some alive)
    _, rows = convert(
        str(causal_lm_dir),
        Recipe("mntp", "test", "test", [("mntp", stage)]),
        tmp_path / "out",
        log=counting_live_encoders(live),
    )
    assert [r.model for r in rows][1:] == ["bidirectional, untrained", "bidirectional + mntp"]
    assert live == [before]


def live_encoders() -> int:
    gc.collect()
    return sum(issubclass(type(o), lm2vec.Encoder) for o in gc.get_objects())


def counting_live_encoders(live: list[int]) -> Callable[[str], None]:
    """A ``convert`` log that appends to ``live`` how many Encoders are alive as each first stage starts."""

    def log(line: str) -> None:
        if line.startswith("stage 1"):
            live.append(live_encoders())
        print(line)

    return log


@needs_data("sts/stsb/dev.jsonl")
def test_dev_scores_under_bf16_autocast(corpus: Path, tmp_path: Path):
    """bf16 training scores STS-B dev under autocast: packed attention and pooling must still give float32 vectors."""
    settings = dict(FAST, bf16=True, steps=2, batch_size=8, eval_steps=2, eval_pairs=20)
    train_simcse(tiny_encoder(), SimCSEConfig(data=[str(corpus)], **settings), tmp_path / "out")
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert log[0]["bf16_autocast"] == 1.0 and any(math.isfinite(r.get("eval_stsb_dev_spearman", math.nan)) for r in log)
