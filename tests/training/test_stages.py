"""The stage registry (one list of stages for recipes, ``convert`` and the CLI; light to import) and the
GradCache loss (the loss and gradients of the passes it caches, dropout included)."""

from __future__ import annotations

import typing

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch.utils._python_dispatch import TorchDispatchMode

from lm2vec.cli import main
from lm2vec.packing import PACKED
from lm2vec.training import STAGES, SupervisedConfig, load_recipe, stage_config
from lm2vec.training.losses import cached_info_nce, info_nce
from lm2vec.training.stage import FLOAT32_SDPA, Dropout, embed, embedding_stage, float32_sdpa, merge_lora
from lm2vec.training.trainer import float32_attention_pays
from tests.support import random_texts, tiny_encoder


def test_one_registry_names_each_stage_its_settings_and_its_train_function():
    for name, stage in STAGES.items():
        train = stage.train_function()
        assert train.__name__ == f"train_{name}"
        assert typing.get_type_hints(train)["config"] is stage.config
        assert type(stage_config(name, {})) is stage.config
    assert [stage for stage, _ in load_recipe("cpu").stages] == list(STAGES)


def test_the_cli_offers_the_registered_stages(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["train", "nope", "default", "-o", "out"])
    assert "{" + ",".join(STAGES) + "} model" in capsys.readouterr().err  # the usage line lists the choices


def test_lora_dropout_on_a_cpu_drops_as_nn_dropout_does_from_fewer_draws():
    """Four elements share a 64-bit draw: each must still drop alone, at rate p, scaled by 1 / (1 - p)."""
    p, size = 0.05, 4_000_000
    dropout = Dropout(p).train()
    torch.manual_seed(0)
    x = torch.ones(size, requires_grad=True)
    y = dropout(x)
    dropped = (y == 0).reshape(-1, 4).float()
    sigma = (p * (1 - p) / (size / 4)) ** 0.5
    assert all(abs(rate - p) < 5 * sigma for rate in dropped.mean(0).tolist())  # each of a draw's four lanes
    both = (dropped[:, 0] * dropped[:, 1]).mean().item()  # lanes independent: p * p, not p
    assert abs(both - p * p) < 5 * (p * p / (size / 4)) ** 0.5
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, y.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # seeded: GradCache's replays redraw the same masks
    assert dropout.eval()(x) is x
    model = embedding_stage(tiny_encoder(), SupervisedConfig(lora_dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(type(d) is Dropout and d.p == 0.1 for m in layers for d in m.lora_dropout.values())


def test_bf16_training_runs_attention_in_float32_where_this_cpu_runs_it_faster_so():
    encoder = tiny_encoder()
    model = embedding_stage(encoder, SupervisedConfig(bf16=True))
    assert encoder.model.config._attn_implementation == (FLOAT32_SDPA if float32_attention_pays() else "sdpa")
    assert merge_lora(model.peft).config._attn_implementation == "sdpa"  # the trained model attends as it did
    assert embedding_stage(tiny_encoder(), SupervisedConfig(bf16=False)).peft.config._attn_implementation == "sdpa"
    scored = tiny_encoder()
    scored.encode(["w1 w2", "w3"])  # scoring packs it: a stage after scoring still trains with plain SDPA
    assert scored.model.config._attn_implementation == PACKED
    packed_at_start = embedding_stage(scored, SupervisedConfig(bf16=True)).peft.config._attn_implementation
    assert packed_at_start == (FLOAT32_SDPA if float32_attention_pays() else PACKED)

    attention = encoder.model.layers[0].self_attn
    config = encoder.model.config
    heads = (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 6, 8, generator=generator).bfloat16() for n in heads)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states, _ = float32_sdpa(attention, q, k, v, mask, dropout=0.0, scaling=0.125)
        dropped = [float32_sdpa(attention, q, k, v, mask, dropout=0.5, scaling=0.125)[0] for _ in range(2)]
    inputs = (q.float(), k.float(), v.float())
    expected = torch.nn.functional.scaled_dot_product_attention(*inputs, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert states.dtype == torch.bfloat16
    torch.testing.assert_close(states, expected.transpose(1, 2).to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(dropped[0], dropped[1])  # attention dropout still drops


@pytest.mark.parametrize("model_type", ["glm4_moe", "ernie4_5_moe", "exaone_moe"])
def test_lora_goes_on_the_shared_experts_layers_named_not_on_the_routed_experts_weights(model_type: str):
    """peft 0.21 took a shared expert's ``gate_proj`` for transformers 4's name of a routed expert's layer and put
    LoRA on the fused expert weights instead (refusing LoRA dropout there): a stage on these models failed."""
    encoder = tiny_encoder(model_type)
    shared = {n for n, m in encoder.model.named_modules() if ".shared_experts." in n and isinstance(m, torch.nn.Linear)}
    model = embedding_stage(encoder, SupervisedConfig(lora_dropout=0.1))  # LoRA goes on encoder.model in place
    layers = {name: m for name, m in encoder.model.named_modules() if isinstance(m, LoraLayer)}
    assert shared and shared <= set(layers)
    assert not [name for name, _ in model.named_parameters() if "lora_" in name and ".mlp.experts." in name]
    assert all(type(d) is Dropout for m in layers.values() for d in m.lora_dropout.values())
    encoder = tiny_encoder(model_type)  # targets named by the end of a name, as in peft: this model's layers too
    gates = {n for n, m in encoder.model.named_modules() if n.endswith(".gate_proj") and isinstance(m, torch.nn.Linear)}
    embedding_stage(encoder, SupervisedConfig(lora_targets=["gate_proj"]))
    assert {name for name, m in encoder.model.named_modules() if isinstance(m, LoraLayer)} == gates


def test_bf16_stages_leave_adapter_inputs_to_autocast_with_the_same_outputs_and_gradients():
    """peft casts a bf16 input up to its adapter's float32 and autocast casts it back: the same values. A bf16 stage
    skips both copies; its embeddings and adapter gradients stay bit-identical, LoRA dropout included."""
    encoder = tiny_encoder()
    model = embedding_stage(encoder, SupervisedConfig(bf16=True, lora_dropout=0.1)).train()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    float32 = embedding_stage(tiny_encoder(), SupervisedConfig(bf16=False)).modules()
    assert all(m.cast_input_dtype_enabled for m in float32 if isinstance(m, LoraLayer))  # float32 inputs: no copies
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: make every adapter weight get a gradient
                parameter.normal_(std=0.1)
    trained = [p for p in model.parameters() if p.requires_grad]
    batch = vars(encoder.tokenization([""] * 6, random_texts(6, seed=5, max_words=12)))

    def run(casting: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        for layer in layers:
            layer.cast_input_dtype_enabled = casting
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        with CastCount() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
            vectors = embed(model, batch, 3)
        vectors.float().square().sum().backward()
        return vectors.detach(), [p.grad.clone() for p in trained if p.grad is not None], casts.count

    (vectors, gradients, fewer), (expected, expected_gradients, more) = run(False), run(True)
    assert torch.equal(vectors, expected)
    assert len(gradients) == len(trained) and all(map(torch.equal, gradients, expected_gradients))
    assert fewer < more


class CastCount(TorchDispatchMode):
    """Counts the dtype casts a computation runs."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("kept_graphs", "kept"), [(0, 0), (2, 2), (99, 5)])  # of 6 passes; the first always replays
def test_cached_info_nce_has_the_loss_and_gradients_of_its_passes_run_with_a_graph(kept_graphs: int, kept: int):
    encoder = tiny_encoder()
    model = embedding_stage(encoder, SupervisedConfig(lora_dropout=0.3)).train()  # dropout: replays must match
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: make every adapter weight get a gradient
                parameter.normal_(std=0.1)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    texts = random_texts(16, seed=9, max_words=10)
    queries, documents = (vars(encoder.tokenization([""] * 8, half)) for half in (texts[:8], texts[8:]))

    def run(loss_fn, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(seed)
        loss = loss_fn()
        (loss * 0.5).backward()  # the Trainer scales the loss too (gradient accumulation, fp16)
        return loss.detach(), {name: p.grad.clone() for name, p in trained.items()}

    plain = run(lambda: info_nce(embed(model, queries, 3), embed(model, documents, 3), 20.0))
    calls: list[bool] = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    cached = run(lambda: cached_info_nce(model, queries, documents, 20.0, 3, kept_graphs=kept_graphs))
    hook.remove()
    assert calls == [False] * (6 - kept) + [True] * 6  # kept passes run with a graph once, not twice
    torch.testing.assert_close(cached[0], plain[0])
    for name in trained:
        torch.testing.assert_close(cached[1][name], plain[1][name], rtol=1e-4, atol=1e-6)
    other_masks = run(lambda: info_nce(embed(model, queries, 3), embed(model, documents, 3), 20.0), seed=2)
    assert not torch.allclose(other_masks[0], plain[0])  # dropout is on: the replay did restore the masks


def test_cached_info_nce_replays_each_pass_under_the_autocast_it_was_cached_under():
    """The Trainer back-propagates outside autocast: a replay in float32 would not be the pass it caches."""
    encoder = tiny_encoder()
    model = embedding_stage(encoder, SupervisedConfig(lora_dropout=0.0)).train()
    texts = random_texts(8, seed=3, max_words=10)
    queries, documents = (vars(encoder.tokenization([""] * 4, half)) for half in (texts[:4], texts[4:]))
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))

    def gradients(loss_fn) -> list[torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()  # outside autocast, as in the Trainer
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = gradients(lambda: info_nce(embed(model, queries, 2), embed(model, documents, 2), 20.0))
    seen.clear()
    cached = gradients(lambda: cached_info_nce(model, queries, documents, 20.0, 2))
    assert seen == [True] * 8  # 4 cached passes, then their 4 replays
    for ours, theirs in zip(cached, plain, strict=True):  # bf16 rounds at other points in the two graphs
        assert (ours - theirs).norm() <= 1e-2 * theirs.norm()
