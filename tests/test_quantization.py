"""Lower precision: int8, int8x2 and bf16 linear layers, exact integer products, per-block plans, and what
loading with dtype="int8", "bfloat16" and "auto" does."""

from __future__ import annotations

import json
import shutil
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import lm2vec
import lm2vec.loading as loading
from lm2vec.calibration import (
    MIN_COSINE,
    _recorded,
    _replayed,
    _search,
    _Trials,
    best_plan,
    calibrate,
    calibration_texts,
    chain,
    plan_speed,
    smoothing,
)
from lm2vec.evaluation import cosine_rows
from lm2vec.experts import ExpertLinears, is_fused_experts
from lm2vec.loading.dtype import resolve_dtype
from lm2vec.loading.model import lower_cache_path
from lm2vec.loading.source import resolve_source
from lm2vec.quantization import (
    LINEAR,
    MLP_INPUTS,
    Bf16Linear,
    Int8Linear,
    Int8x2Linear,
    OneDnnLinear,
    _LastInput,
    block_modules,
    block_plan,
    blocks,
    float32_in_turn,
    int_product,
    linear_layers,
    lower_kind,
    lower_precision,
    lowered,
    lowered_in_turn,
    onednn_available,
    quantize_rows,
    quantize_rows2,
    smoothing_factors,
)
from lm2vec.training import SupervisedConfig
from lm2vec.training.stage import embedding_stage
from tests.support import ARCHITECTURES, random_texts, tiny_config, tiny_encoder, tiny_model, tiny_tokenizer

TEXTS = random_texts(24, seed=3)
VARIANT = (True, "mean", "cpu")  # bidirectional, mean pooling, a CPU: what the cache of a default load is keyed by


@pytest.mark.parametrize("shape", [(1, 64, 96), (5, 7, 3), (40, 576, 192)])
def test_int8_linear_is_close_to_the_float_layer(shape: tuple[int, int, int]):
    rows, inputs, outputs = shape
    torch.manual_seed(0)
    linear = torch.nn.Linear(inputs, outputs)
    x = torch.randn(rows, inputs)
    x[0, 0] = 50.0  # an outlier channel in one token: per-token scales keep the other rows precise
    exact, approx = linear(x), Int8Linear(linear)(x)
    relative = (approx - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 0.05, relative
    if rows > 1:
        assert relative[1:].max() < 0.02


def test_bf16_linear_is_close_to_the_float_layer_and_returns_float32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(9, 64)
    out = Bf16Linear(linear)(x)
    assert out.dtype == torch.float32
    relative = (out - linear(x)).norm(dim=-1) / linear(x).norm(dim=-1)
    assert 0 < relative.max() < 0.02, relative


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_onednn_linear_is_float32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 192)
    x = torch.randn(3, 7, 576)
    out = OneDnnLinear(linear)(x)
    assert out.dtype == torch.float32 and out.shape == (3, 7, 192)
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-4)  # float32: only the summation order differs


def test_int8x2_linear_is_near_float32_where_int8_and_bf16_are_not():
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 192)
    x = torch.randn(40, 576)
    x[:, 7] *= 300  # a massive activation channel, as LLMs grow: it sets every row's int8 scale
    exact = linear(x.double().float())
    errors = {
        layer: ((out := make(linear)(x)) - exact).norm() / exact.norm()
        for layer, make in (("int8x2", Int8x2Linear), ("int8", Int8Linear), ("bf16", Bf16Linear))
    }
    assert out.dtype == torch.float32
    assert errors["int8x2"] < 1e-3 and errors["int8x2"] * 5 < min(errors["int8"], errors["bf16"]), errors
    rows = torch.cat([Int8x2Linear(linear)(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(rows, Int8x2Linear(linear)(x))  # exact integer sums: a row's result ignores the batch


def test_a_lowered_layer_answers_for_its_weight_with_the_float32_weight_it_stands_for():
    """Some model code reads a layer's weight instead of calling it (HunYuan-MoE's router checks its dtype, Jamba's
    Mamba multiplies by ``dt_proj.weight``, ERGO casts its branches to ``o_proj.weight.dtype``): float32, within half
    a quantization step per row (smoothing undone) or bf16's rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    weight = linear.weight.detach()
    smooth = torch.rand(64) * 3 + 1
    step = (weight * smooth).abs().amax(1, keepdim=True) / 127  # the int8 step of each (smoothed) row
    layers = [(Int8Linear(linear, smooth=smooth), step / smooth / 2), (Int8x2Linear(linear), step / 254 / 2)]
    for layer, bound in [*layers, (Bf16Linear(linear), weight.abs() / 256)]:
        assert layer.weight.shape == weight.shape and layer.weight.dtype == torch.float32
        assert ((layer.weight - weight).abs() <= bound + 1e-7).all()
        assert not torch.equal(layer.weight, weight)


@pytest.mark.parametrize(
    "model_type, sizes, kept",
    [
        ("phimoe", dict(num_local_experts=4, num_experts_per_tok=2), {"PhimoeTopKRouter"}),
        ("hunyuan_v1_moe", dict(head_dim=16, num_experts=4, moe_topk=2, moe_intermediate_size=32), set()),
        ("falcon", {}, set()),
    ],
)
def test_linear_layers_of_a_model_s_own_class_are_lowered_and_adapted_where_they_compute_the_product(
    model_type: str, sizes: dict, kept: set[str], tmp_path: Path
):
    """Phi-MoE's router is an ``nn.Linear`` subclass that returns the experts it picks: it keeps its forward
    (float32, no LoRA). Falcon's ``FalconLinear`` computes the linear product: lowered and adapted as ``nn.Linear``.
    HunYuan-MoE's router reads its layer's weight. Phi-MoE and HunYuan-MoE failed to load in int8."""
    config = lm2vec.set_bidirectional(tiny_config(model_type, pad_token_id=3, **sizes))
    path = lm2vec.Encoder(tiny_model(config), tiny_tokenizer()).save(tmp_path / model_type)
    reference = lm2vec.load(path, dtype="float32")
    encoder = lm2vec.load(path, dtype="int8")
    assert lower_kind(encoder.model) == "int8"
    assert cosine_rows(encoder.encode(TEXTS), reference.encode(TEXTS)).min() > 0.99

    def classes(model: torch.nn.Module, kinds: type | tuple[type, ...]) -> set[str]:
        return {type(m).__name__ for name, m in model.named_modules() if isinstance(m, kinds) and "lm_head" not in name}

    model, called = tiny_model(config), []
    for layer in (m for m in model.modules() if isinstance(m, LINEAR)):
        layer.register_forward_pre_hook(lambda *_: called.append(1))  # calibration's hooks: the check calls none
    assert classes(lower_precision(model, "int8"), LINEAR) == kept and not called
    model = embedding_stage(reference, SupervisedConfig(max_length=64))
    adapted = {type(m.base_layer).__name__ for m in model.modules() if isinstance(m, LoraLayer)}
    assert adapted == classes(tiny_model(config), LINEAR) - kept


def test_quantize_rows2_keeps_the_rounding_error_of_the_first_level():
    x = torch.randn(5, 40) * torch.arange(1, 6)[:, None]
    q, scale = quantize_rows2(x)
    high, low = q.float().split(40, dim=1)
    assert q.dtype == torch.int8 and q.shape == (5, 80)
    assert ((scale * (high + low / 254) - x).abs() <= scale / 254 / 2 + 1e-5).all()


def test_integer_products_are_exact_on_every_cpu():
    torch.manual_seed(2)
    q = torch.randint(-127, 128, (33, 1536), dtype=torch.int8)
    w = torch.randint(-127, 128, (1536, 40), dtype=torch.int8)
    exact = q.long() @ w.long()
    assert torch.equal(int_product(q, w).long(), exact)
    assert torch.equal(torch._int_mm(q, w).long(), exact)


def test_quantize_rows_round_trips_within_half_a_step():
    x = torch.randn(6, 33) * torch.arange(1, 7)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-6).all()


def test_smoothing_moves_an_outlier_channel_into_the_weights_and_keeps_the_product():
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(40, 64)
    x[:, 5] *= 300  # a massive-activation channel: per-token int8 loses the other channels' resolution
    factors = smoothing_factors(x.abs().amax(0), [linear])
    assert factors.shape == (64,) and factors.min() == 1.0 and factors.argmax() == 5 and factors[5] > 10
    exact = linear(x).detach()
    plain = Int8Linear(linear)(x)
    smooth = Int8Linear(linear, smooth=factors)(x)
    assert (smooth - exact).abs().max() < (plain - exact).abs().max() / 3


def test_layers_sharing_an_input_but_not_its_scales_each_get_their_own_product():
    torch.manual_seed(3)
    shared = _LastInput(quantize_rows)
    a, b = torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)
    x = torch.randn(9, 32) * torch.linspace(1, 50, 32)
    factors = smoothing_factors(x.abs().amax(0), [a])
    together = Int8Linear(a, shared, smooth=factors)(x), Int8Linear(b, shared)(x)
    alone = Int8Linear(a, smooth=factors)(x), Int8Linear(b)(x)
    assert all(torch.equal(t, s) for t, s in zip(together, alone, strict=True))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_smoothing_gives_layers_called_on_one_input_one_factor(model_type: str):
    encoder = tiny_encoder(model_type)
    factors = smoothing(encoder, random_texts(12, seed=5))
    first = blocks(encoder.model)[0]
    names = [n for n, m in encoder.model.named_modules() if isinstance(m, LINEAR) and f"{n}.".startswith(first)]
    assert set(names) <= set(factors) and len(factors) == len(names) * len(blocks(encoder.model))
    groups = {id(factors[n]) for n in names}
    expected = {"llama": 4, "gpt2": 4}[model_type]  # q/k/v | o | gate/up | down; c_attn | c_proj | c_fc | c_proj
    assert len(groups) == expected and all(f.min() == 1.0 for f in factors.values())


def test_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    layer = Int8Linear(torch.nn.Linear(64, 48))
    x = torch.randn(37, 64) * 10
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)


def test_quantized_encoder_batch_invariant_and_close_to_float():
    float_encoder = tiny_encoder()
    int8 = tiny_encoder()
    lower_precision(int8.model, "int8", keep=(0,))
    assert int8.dtype == "int8" and float_encoder.dtype == "float32"
    layers = int8.model.config.num_hidden_layers
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 7 * (layers - 1)
    kept = [name for name, m in int8.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(kept) == 7 and all(name.startswith("layers.0.") for name in kept)  # the first block stays float
    together = int8.encode(TEXTS, batch_size=8)
    np.testing.assert_array_equal(together, np.stack([int8.encode(t) for t in TEXTS]))
    cosine = cosine_rows(together, float_encoder.encode(TEXTS))
    assert cosine.min() > 0.99, cosine.min()


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2"])
def test_every_linear_layer_or_all_but_the_kept_blocks_whatever_the_architecture(model_type: str):
    encoder = tiny_encoder(model_type)
    model, texts = encoder.model, random_texts(6, seed=4)
    before = encoder.encode(texts)
    everything = sum(isinstance(m, LINEAR) for m in model.modules())
    first = blocks(model)[0]
    assert first in ("h.0.", "layers.0.") and len(blocks(model)) == model.config.num_hidden_layers
    in_first = sum(isinstance(m, LINEAR) for n, m in model.named_modules() if f"{n}.".startswith(first))
    lower_precision(model, "bfloat16", keep=(0,))
    assert sum(isinstance(m, Bf16Linear) for m in model.modules()) == everything - in_first and in_first > 0
    assert encoder.dtype == "bfloat16" and block_plan(model) == ("float32",) + ("bfloat16",) * (len(blocks(model)) - 1)
    model = tiny_encoder(model_type).model
    lower_precision(model, "int8")
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == everything and in_first > 0
    encoder = encoder.with_model(model)
    assert cosine_rows(encoder.encode(texts), before).min() > 0.98


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2"])
@pytest.mark.parametrize("kind", ["int8x2", "bfloat16"])
def test_a_lowered_model_reports_the_parameters_of_the_float_model(model_type: str, kind: str):
    """The converted layers keep their weights as buffers; `info()` still counts them (and their biases)."""
    encoder = tiny_encoder(model_type)
    before = encoder.info()["parameters"]
    assert before == sum(p.numel() for p in encoder.model.parameters())
    lower_precision(encoder.model, kind, keep=(0,))
    assert sum(p.numel() for p in encoder.model.parameters()) < before
    assert encoder.info()["parameters"] == before


@pytest.mark.parametrize(
    "kind",
    ["bfloat16", pytest.param("float32-onednn", marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN"))],
)
def test_lowered_runs_the_precision_inside_and_gives_the_model_its_own_layers_back(kind: str):
    encoder = tiny_encoder()
    before = encoder.encode(TEXTS)
    own = {name: m for name, m in encoder.model.named_modules() if isinstance(m, LINEAR)}
    with lowered(encoder.model, kind):
        assert encoder.dtype == kind and not any(isinstance(m, LINEAR) for m in encoder.model.layers.modules())
        inside = encoder.encode(TEXTS)
    assert {name: m for name, m in encoder.model.named_modules() if isinstance(m, LINEAR)} == own
    np.testing.assert_array_equal(encoder.encode(TEXTS), before)  # the float32 model, bit for bit
    assert cosine_rows(inside, before).min() > 0.99
    with pytest.raises(KeyError), lowered(encoder.model, kind):
        raise KeyError("a failure inside")
    assert encoder.dtype == "float32"


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2"])
def test_lowered_in_turn_converts_one_block_at_a_time_and_computes_as_the_lowered_model(model_type: str):
    """Calibration measures plans this way: the same embeddings, bit for bit, as the model converted whole, while
    no more than one block's layers are converted at any moment, and the float layers are back afterwards."""
    encoder = tiny_encoder(model_type)
    count = len(blocks(encoder.model))
    plan = tuple(["int8", "int8x2", "bfloat16", "float32"][b % 4] for b in range(count))
    smooth = smoothing(encoder, TEXTS)
    own = {name: m for name, m in encoder.model.named_modules() if isinstance(m, LINEAR)}
    before = encoder.encode(TEXTS)
    converted: list[set[str]] = []  # the blocks holding converted layers, seen as each block runs

    def seen(*_):
        converted.append({block for block, kind in enumerate(block_plan(encoder.model)) if kind != "float32"})

    hooks = [block.register_forward_hook(seen) for block in block_modules(encoder.model)]
    with lowered_in_turn(encoder.model, plan, smooth):
        in_turn = encoder.encode(TEXTS)
    for handle in hooks:
        handle.remove()
    assert converted and max(len(blocks_now) for blocks_now in converted) == 1
    assert {name: m for name, m in encoder.model.named_modules() if isinstance(m, LINEAR)} == own
    np.testing.assert_array_equal(encoder.encode(TEXTS), before)
    with lowered(encoder.model, plan, smooth):
        whole = encoder.encode(TEXTS)
    np.testing.assert_array_equal(in_turn, whole)
    assert not np.array_equal(in_turn, before)
    with pytest.raises(KeyError), lowered_in_turn(encoder.model, plan):
        raise KeyError("a failure inside")
    assert encoder.dtype == "float32"
    with pytest.raises(ValueError, match="a plan names one of"):
        lowered_in_turn(encoder.model, plan[:-1]).__enter__()


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2", "qwen3_moe"])
def test_float32_in_turn_runs_a_16_bit_model_as_its_float32_self_one_block_at_a_time(model_type: str):
    """A model loaded in its checkpoint's bf16 computes inside as the same weights in float32 do, bit for bit, with
    one block's weights in float32 at a time; on exit it is that float32 model, but for layers lowered inside."""
    encoder = tiny_encoder(model_type)
    encoder.model.to(torch.bfloat16).float()  # weights a bf16 checkpoint holds, in float32: the reference
    reference, weights = encoder.encode(TEXTS), {n: t.clone() for n, t in encoder.model.state_dict().items()}
    plan = tuple(["int8", "bfloat16", "float32"][b % 3] for b in range(len(blocks(encoder.model))))
    with lowered(encoder.model, plan):
        lowered_vectors = encoder.encode(TEXTS)
    modules = block_modules(encoder.model)
    in_float32: list[tuple[int, list[int]]] = []  # each block run, with the blocks whose linear layers are float32

    def seen(block: int) -> Callable[..., None]:
        float32 = lambda: [b for b, m in enumerate(modules) if torch.float32 in weight_dtypes(m)]  # noqa: E731
        return lambda *_: in_float32.append((block, float32()))

    encoder.model.to(torch.bfloat16)
    encoder.model.config.dtype = torch.bfloat16  # as transformers says of a model it loaded in bf16
    with float32_in_turn(encoder.model):
        assert encoder.model.get_input_embeddings().weight.dtype == torch.float32  # outside the blocks: at once
        with _recorded(encoder.model, modules) as recording:
            np.testing.assert_array_equal(encoder.encode(TEXTS), reference)
        assert set().union(*map(weight_dtypes, modules)) == {torch.bfloat16}  # between passes
        hooks = [block.register_forward_hook(seen(b), prepend=True) for b, block in enumerate(modules)]
        np.testing.assert_array_equal(encoder.encode(TEXTS), reference)
        assert in_float32 and all(now == [b] for b, now in in_float32)
        in_float32.clear()
        with _replayed(modules[:2], recording.outputs[:2]):  # as calibration replays: their weights are not read
            np.testing.assert_array_equal(encoder.encode(TEXTS), reference)
        assert in_float32 and all(now == ([] if b < 2 else [b]) for b, now in in_float32)
    for handle in hooks:
        handle.remove()
    assert all(torch.equal(t, weights[n]) for n, t in encoder.model.state_dict().items())  # float32 on exit
    assert encoder.model.config.dtype == torch.float32

    encoder.model.to(torch.bfloat16)
    with pytest.raises(KeyError), float32_in_turn(encoder.model):
        lower_precision(encoder.model, plan)  # the lowered layers keep their precision on exit
        raise KeyError("a failure inside")
    assert block_plan(encoder.model) == plan
    np.testing.assert_array_equal(encoder.encode(TEXTS), lowered_vectors)


def weight_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes of the weights of the linear layers in ``module``."""
    return {m.weight.dtype for m in module.modules() if isinstance(m, LINEAR)}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_the_experts_of_a_mixture_of_experts_model_take_their_block_s_precision(model_type: str):
    """transformers stores a layer's experts as 3D weights (GPT-OSS's transposed, with biases and a clamped gate of
    its own), most of such a model's weights: each expert becomes a pair of layers in its block's kind, the eager
    loop's computation in lower precision; the kept block's experts stay as they were, and ``lowered`` gives the
    model its own experts back."""
    encoder = tiny_encoder(model_type)
    model, before, count = encoder.model, encoder.encode(TEXTS), encoder.info()["parameters"]
    prefixes = blocks(model)
    fused = {name: m for name, m in model.named_modules() if is_fused_experts(m)}
    assert len(fused) == len(prefixes)
    with lowered(model, "bfloat16"):
        assert not any(is_fused_experts(m) for m in model.modules())
    assert {name: m for name, m in model.named_modules() if is_fused_experts(m)} == fused
    lower_precision(model, "int8", keep=(0,))
    assert blocks(model) == prefixes  # not a list of experts, as long as the list of blocks here
    experts = model.config.num_local_experts if model_type == "gpt_oss" else model.config.num_experts
    lowered_experts = [m for m in model.modules() if isinstance(m, ExpertLinears)]
    assert len(lowered_experts) == len(prefixes) - 1
    for module in lowered_experts:
        layers = [*module.up, *module.down]
        assert len(layers) == 2 * experts and all(isinstance(layer, Int8Linear) for layer in layers)
    assert [name for name, p in model.named_parameters() if p.dim() == 3] == [
        f"{next(iter(fused))}.{weight}" for weight in ("gate_up_proj", "down_proj")
    ]  # the kept block's
    assert encoder.info()["parameters"] == count
    together = encoder.encode(TEXTS, batch_size=8)
    np.testing.assert_array_equal(together, np.stack([encoder.encode(t) for t in TEXTS]))
    assert cosine_rows(together, before).min() > 0.99


@pytest.mark.parametrize("kind", ["int8", "bfloat16"])
def test_lower_precision_encoder_refuses_to_save(tmp_path: Path, kind: str):
    enc = tiny_encoder()
    lower_precision(enc.model, kind)
    with pytest.raises(ValueError, match=f"{kind} encoders are converted when loaded"):
        enc.save(tmp_path / "q")


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_a_float32_model_on_onednn_saves_and_reloads(tmp_path: Path):
    encoder = tiny_encoder()
    before = encoder.encode(TEXTS)
    lower_precision(encoder.model, "float32-onednn")
    assert encoder.dtype == "float32-onednn"
    again = lm2vec.load(encoder.save(tmp_path / "saved"), dtype="float32")
    assert again.dtype == "float32"
    np.testing.assert_allclose(again.encode(TEXTS), before, atol=1e-4)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_load_in_lower_precision_keeps_what_calibration_says(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    lower = lm2vec.load(tiny_dir, dtype=dtype)
    reference = lm2vec.load(tiny_dir, dtype="float32")
    plan = calibrate(reference, dtype)
    assert lower.dtype == dtype and lower.info()["dtype"] == dtype and block_plan(lower.model) == plan
    assert dtype in plan and set(plan) <= set(chain(dtype))  # the tiny model tolerates some blocks
    texts = calibration_texts()
    assert cosine_rows(lower.encode(texts), reference.encode(texts)).min() >= MIN_COSINE
    assert list((tmp_path / "cache" / "calibration").glob(f"{dtype}-*.json"))  # measured once per model
    with pytest.raises(ValueError, match="int8, auto"):
        lm2vec.load(tiny_dir, dtype="int4")


def test_a_gpu_plan_falls_back_to_plain_float32():
    """This CPU's measured speeds and oneDNN's CPU kernels say nothing of a GPU: there a block that cannot run in the
    precision asked for runs in float32 (nn.Linear), and int8 (a CPU path) is refused up front."""
    assert chain("bfloat16", "cuda") == ("bfloat16", "float32")
    assert chain("int8", "cuda") == ("int8", "float32")  # as asked of calibrate(); load() refuses it:
    with pytest.raises(ValueError, match="int8 runs on CPUs"):
        resolve_dtype("int8", "cuda")  # load() checks the device first: a CPU-only torch refuses "cuda" itself


def test_calibration_moves_every_block_that_does_not_hold_the_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    encoder = tiny_encoder()
    before = encoder.encode(TEXTS)
    count = len(blocks(encoder.model))
    top = chain("int8")[-1]  # float32, on oneDNN where that is faster here
    assert top in ("float32", "float32-onednn")
    assert calibrate(encoder, "int8", min_cosine=1.0) == (top,) * count  # int8 and int8x2 are never exact
    assert calibrate(encoder, "int8", min_cosine=-1.0) == ("int8",) * count
    np.testing.assert_array_equal(encoder.encode(TEXTS), before)  # measuring left the float model as it was
    assert encoder.batch_invariant
    assert encoder.dtype == "float32"
    assert chain("int8")[0] == "int8"
    plan = calibrate(encoder, "int8", min_cosine=0.99999)  # a bar between: some blocks move up the chain
    assert set(plan) <= set(chain("int8"))
    lower_precision(encoder.model, plan)
    assert cosine_rows(encoder.encode(calibration_texts()), tiny_encoder().encode(calibration_texts())).min() >= 0.99999


def test_a_block_raised_to_float32_takes_int8x2_where_that_pays_and_the_model_holds_the_bar():
    """The search moves the least tolerant block all the way up first; once later moves have made room, that block
    goes back to the chain's middle, where the middle is fast enough to pay for the trial. Errors here add up per
    block (a model of what calibration measures)."""
    kinds = ("int8", "int8x2", "float32")
    errors = [  # block -> its error in each kind; the bar allows 0.01 in all
        {"int8": 0.0085, "int8x2": 0.0015, "float32": 0.0},  # least tolerant: moved first, to float32
        {"int8": 0.008, "int8x2": 0.0005, "float32": 0.0},
        {"int8": 0.0025, "int8x2": 0.0, "float32": 0.0},
    ]
    trials: list[tuple[str, ...]] = []

    def worst(plan: tuple[str, ...]) -> float:
        trials.append(plan)
        return 1.0 - sum(error[kind] for error, kind in zip(errors, plan, strict=True))

    assert worst(("float32", "int8x2", "int8")) >= 0.99 > worst(("float32", "int8", "int8"))  # what the moves find
    fast = {"int8": 4.0, "int8x2": 1.5, "float32": 1.0}  # an Intel Xeon without AMX, say
    assert _search(worst, 3, kinds, 0.99, fast) == ("int8x2", "int8x2", "int8")
    assert trials[-1] == ("int8x2", "int8x2", "int8")  # tried after the moves: not one of theirs
    slow = fast | {"int8x2": 1.1}  # a trial pass buys too little
    assert _search(worst, 3, kinds, 0.99, slow) == ("float32", "int8x2", "int8")
    assert _search(worst, 3, ("int8", "float32"), 0.99, fast) == ("float32", "float32", "int8")  # no middle


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_calibration_replays_the_float32_blocks_before_the_first_lowered_one(model_type: str):
    """A calibration trial takes the reference pass's outputs of the float32 blocks before its first lowered block
    instead of computing them again: on every architecture the same bits as the whole pass, over several passes
    (replayed in call order), with nothing computed in the replayed blocks."""
    encoder = tiny_encoder(model_type)
    ids, prefix = encoder.tokenization.tokenize([""] * len(TEXTS), TEXTS)
    prefixes = blocks(encoder.model)
    modules = block_modules(encoder.model)
    encoder.packs()

    def embed() -> torch.Tensor:
        return encoder.embed_tokens(ids, prefix, batch_size=8, max_tokens=64)

    with _recorded(encoder.model, modules) as recording:
        reference = embed()
    outputs = recording.outputs
    assert all(len(kept) > 1 for kept in outputs) and len(recording.passes) > 1  # several passes
    assert recording.in_order() and recording.passes[0] == list(range(len(modules)))
    plan = ("float32", "bfloat16", *("float32",) * (len(modules) - 2))
    with lowered_in_turn(encoder.model, plan):
        whole = embed()
    calls: list[str] = []
    first = [encoder.model.get_submodule(name) for name in linear_layers(encoder.model, prefixes[0])]
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append("called")) for layer in first]
    with _replayed(modules[:1], outputs[:1]), lowered_in_turn(encoder.model, plan):
        replayed = embed()
    with _replayed(modules, outputs):
        every = embed()
    for hook in hooks:
        hook.remove()
    assert not calls and torch.equal(replayed, whole) and not torch.equal(whole, reference)
    assert torch.equal(every, reference)
    assert torch.equal(embed(), reference)  # the blocks compute again outside


# Models that run blocks more than once a pass (tiny sizes): Inkling 2 Loop its middle blocks (2 and 3) three times
# over, HRM its stack of 2 blocks in cycles.
LOOPED = {
    "inkling2_loop_text": dict(
        num_hidden_layers=6,
        n_layers_per_attn_res_block=2,
        loop_layer_index_start=2,
        loop_layer_index_end=4,
        loop_gate_rank=8,
        swa_head_dim=16,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        unpadded_vocab_size=128,
        d_rel=4,
        rel_extent=64,
        sliding_window_size=64,
    ),
    "hrm_text": {},
}


@pytest.mark.parametrize("model_type", ["llama", *LOOPED])
def test_a_calibration_trial_measures_what_the_whole_pass_gives(model_type: str):
    """Calibration replays the recorded outputs of the float32 blocks before a plan's first lowered block only where
    every pass runs each block once, in order. A looped model runs earlier blocks again on a lowered block's outputs:
    replayed, those would hand on the float32 pass's states and the plan would be measured wrong."""
    config = tiny_config(model_type, head_dim=16, pad_token_id=3, **LOOPED.get(model_type, {}))
    lm2vec.set_bidirectional(config)
    encoder = lm2vec.Encoder(tiny_model(config), tiny_tokenizer(), max_length=64)
    trials = _Trials(encoder, TEXTS)
    count = len(trials.modules)
    assert trials.recording.in_order() == (model_type not in LOOPED)
    plan = tuple("bfloat16" if block == count // 2 else "float32" for block in range(count))  # inside the loop
    with lowered_in_turn(encoder.model, plan):
        whole = trials._embedded()
    assert trials.worst(plan) == float((whole * trials.reference).sum(-1).min()) < 1.0


def test_plans_of_mixed_precisions_and_their_speed():
    encoder = tiny_encoder()
    count = len(blocks(encoder.model))
    plan = ("int8x2", *("int8",) * (count - 1))
    lower_precision(encoder.model, plan)
    assert block_plan(encoder.model) == plan and encoder.dtype == "int8"
    assert encoder.info()["blocks"] == f"int8 {count - 1}, int8x2 1 (of {count})"
    only_precise = tiny_encoder()
    lower_precision(only_precise.model, ("int8x2",) * count)
    assert only_precise.dtype == "int8x2"
    assert plan_speed(("float32",) * count) == 1.0
    with pytest.raises(ValueError, match="for each of the"):
        lower_precision(tiny_encoder().model, ("int8",))
    with pytest.raises(ValueError, match="for each of the"):
        lower_precision(tiny_encoder().model, ("int4",) * count)


def test_best_plan_keeps_float32_when_nothing_is_faster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    encoder = tiny_encoder()
    float32 = (chain("int8")[-1],) * len(blocks(encoder.model))
    assert best_plan(encoder, ()) == float32
    plan = best_plan(encoder, ("int8", "bfloat16"))  # a kind slower than float32 here is not even calibrated
    assert plan_speed(plan) >= 1.0 and plan in (float32, calibrate(encoder, "int8"), calibrate(encoder, "bfloat16"))


def test_auto_picks_a_measured_path_and_stays_float32_grade(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    auto = lm2vec.load(tiny_dir)  # the default
    assert auto.batch_invariant and auto.info()["engine"] == "torch"
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    if not {"amx_bf16", "avx512_bf16"} & flags:  # emulated bf16 is far slower than fp32: never chosen
        assert auto.dtype != "bfloat16"
    if not {"amx_int8", "avx512_vnni", "avx_vnni"} & flags:  # so is int8 without dot-product instructions
        assert auto.dtype != "int8"
    speeds = json.loads(next((tmp_path / "cache" / "hardware").glob("linear-speeds-*.json")).read_text())["speeds"]
    assert speeds["float32"] == 1.0 and set(speeds) >= {"float32", "bfloat16", "int8", "int8x2"}
    assert auto.dtype == "float32" or speeds[auto.dtype] >= 1.3
    reference = lm2vec.load(tiny_dir, dtype="float32")
    assert reference.batch_invariant
    cosine = cosine_rows(auto.encode(TEXTS), reference.encode(TEXTS))
    assert cosine.min() > 0.99 and cosine.mean() > 0.999


def test_nothing_to_quantize():
    with pytest.raises(ValueError, match="no transformer blocks"):
        lower_precision(torch.nn.Sequential(torch.nn.ReLU()), "int8")
    with pytest.raises(ValueError, match="unknown precision"):
        lower_precision(tiny_encoder().model, "int4")


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_a_model_stored_in_bf16_loads_in_bf16_and_lowers_as_its_float32_copy_does(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
):
    """Checkpoints are stored in bf16: a lower precision loads them so (half the float32 model's memory: a 7B model
    fits in 24 GB) and gets, from calibration on, what the float32 load of the same weights gets, bit for bit."""
    half, full, mixed = (shutil.copytree(tiny_dir, tmp_path / name) for name in ("half", "full", "mixed"))
    tensors = {name: t.to(torch.bfloat16) for name, t in load_file(tiny_dir / "model.safetensors").items()}
    save_file(tensors, half / "model.safetensors", metadata={"format": "pt"})
    save_file({n: t.float() for n, t in tensors.items()}, full / "model.safetensors", metadata={"format": "pt"})
    first = next(iter(tensors))
    save_file(tensors | {first: tensors[first].float()}, mixed / "model.safetensors", metadata={"format": "pt"})
    sources = {path: resolve_source(path) for path in (half, full, mixed)}
    assert [source.half_dtype() for source in sources.values()] == [torch.bfloat16, None, None]

    dtypes: list[torch.dtype] = []
    real = loading.load_model

    def load_model(source, bidirectional, dtype, *args):  # the real loader, watched
        dtypes.append(dtype)
        return real(source, bidirectional, dtype, *args)

    monkeypatch.setattr(loading, "load_model", load_model)
    encoders = {}
    for path in (half, full):  # each calibrates on its own
        monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / f"cache-{path.name}"))
        encoders[path] = lm2vec.load(path, dtype=dtype)
    assert dtypes == [torch.bfloat16, torch.float32]  # once each: the second load of each reads its cache
    plan = block_plan(encoders[half].model)
    assert dtype in plan and plan == block_plan(encoders[full].model)
    np.testing.assert_array_equal(encoders[half].encode(TEXTS), encoders[full].encode(TEXTS))
    state, expected = encoders[half].model.state_dict(), encoders[full].model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(t, state[n]) and t.dtype == state[n].dtype for n, t in expected.items())
    assert lm2vec.load(half, dtype="float32").dtype == "float32"  # asked for: float32, loaded so
    assert dtypes[-1] == torch.float32


def test_int8_weights_are_cached_and_reload_bit_identical(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    first = lm2vec.load(tiny_dir, dtype="int8").encode(TEXTS)
    cached = lower_cache_path(resolve_source(tiny_dir), VARIANT, "int8")
    assert cached.is_file() and not list(cached.parent.glob("*.partial"))
    again = load_from_cache(tiny_dir, "int8")  # built empty, weights from the cache
    assert again.dtype == "int8" and again.bidirectional
    np.testing.assert_array_equal(again.encode(TEXTS), first)
    causal = lm2vec.load(tiny_dir, dtype="int8", bidirectional=False)  # its own calibration and cache
    assert not causal.bidirectional and cosine_rows(causal.encode(TEXTS), first).min() < 0.999
    assert lower_cache_path(resolve_source(tiny_dir), (False, "mean", "cpu"), "int8").is_file()

    del again  # its weights are mapped from the cache file, which is overwritten in place next
    cached.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="rebuilding the unreadable cache"):
        rebuilt = lm2vec.load(tiny_dir, dtype="int8")
    np.testing.assert_array_equal(rebuilt.encode(TEXTS), first)
    assert cached.stat().st_size > 1000  # written again

    moved = shutil.copytree(tiny_dir, tmp_path / "moved", copy_function=shutil.copy)  # another place, new times
    assert lower_cache_path(resolve_source(moved), VARIANT, "int8") == cached  # the same model finds its cache
    other = shutil.copytree(tiny_dir, tmp_path / "other")
    tensors = load_file(other / "model.safetensors")
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1}, other / "model.safetensors", metadata={"format": "pt"})
    assert lower_cache_path(resolve_source(other), VARIANT, "int8") != cached  # other weights: not that cache


def test_a_first_load_ends_on_the_cached_weights_not_the_float_model(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The float32 model a first load calibrates and converts keeps its weights mapped from their file while it
    lives (resident: the built-in model held 1166 MB after its first load, 684 after later ones); the load reads
    the lowered weights back from the cache it wrote, as later loads do, and lets the float model go."""
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    floats: list[weakref.ref] = []
    real = loading.load_model

    def load_model(*args, **kwargs):  # the real loader, watched
        model = real(*args, **kwargs)
        floats.append(weakref.ref(model))
        return model

    monkeypatch.setattr(loading, "load_model", load_model)
    first = lm2vec.load(tiny_dir, dtype="int8")
    assert len(floats) == 1 and floats[0]() is None  # freed at once, before the cached copy is read: no cycles
    assert first.dtype == "int8"
    np.testing.assert_array_equal(first.encode(TEXTS), load_from_cache(tiny_dir, "int8").encode(TEXTS))
    assert len(floats) == 1  # the later load: from the cache alone


def test_a_first_load_whose_cache_reads_back_unreadable_converts_again(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Should the cache just written not read back (a disk fault; it warns), the load converts in memory again."""
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    expected = lm2vec.load(tiny_dir, dtype="int8").encode(TEXTS)
    shutil.rmtree(tmp_path / "cache" / "lower")
    monkeypatch.setattr(loading, "cached_lower_model", lambda *args, **kwargs: None)  # as if unreadable
    encoder = lm2vec.load(tiny_dir, dtype="int8")
    assert encoder.dtype == "int8"
    np.testing.assert_array_equal(encoder.encode(TEXTS), expected)


def load_from_cache(path: Path, dtype: str) -> lm2vec.Encoder:
    """``lm2vec.load`` of a model whose lowered weights are cached, failing if the cache was not read back (an
    unreadable cache only warns and is rebuilt, with the same vectors)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = lm2vec.load(path, dtype=dtype)
    assert not [w for w in caught if "unreadable" in str(w.message)], [str(w.message) for w in caught]
    return encoder


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_reads_its_lowered_weights_back(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The cached load builds each architecture on the meta device (its computed buffers real) and assigns the
    cached int8 weights: the same bits as the load that lowered and cached them."""
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / "cache"))
    saved = tiny_encoder(model_type)
    path = saved.save(tmp_path / model_type)
    ids, prefix = saved.tokenization.tokenize([""] * len(TEXTS), TEXTS)  # token ids: see test_loading's reload test
    first = lm2vec.load(path, dtype="int8")
    assert lower_cache_path(resolve_source(path), VARIANT, "int8").is_file()
    assert torch.equal(load_from_cache(path, "int8").embed_tokens(ids, prefix), first.embed_tokens(ids, prefix))


def test_int8_loads_where_the_cache_cannot_be_written(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("LM2VEC_CACHE", str(blocked / "cache"))
    with pytest.warns(UserWarning, match="weights in lower precision not cached"):
        encoder = lm2vec.load(tiny_dir, dtype="int8")
    assert encoder.dtype == "int8" and encoder.encode(TEXTS).shape == (len(TEXTS), encoder.dim)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_a_bf16_block_keeps_its_mlp_in_bf16_and_everything_else_float32(model_type: str):
    """The layers that open an MLP (:data:`MLP_INPUTS`) hand bf16 to the activation and the output projection;
    every other layer, the MLP's output projection included, returns float32 to the residual stream and attention.
    Each architecture with a dense MLP names its opening layers so (the MoE-only ones have none)."""
    encoder = tiny_encoder(model_type)
    reference = encoder.encode(TEXTS)
    lower_precision(encoder.model, "bfloat16")
    dtypes: dict[str, torch.dtype] = {}
    layers = [(name, m) for name, m in encoder.model.named_modules() if isinstance(m, Bf16Linear)]
    hooks = [
        m.register_forward_hook(lambda _m, _a, out, name=name: dtypes.setdefault(name, out.dtype) and None)
        for name, m in layers
    ]
    lowered_vectors = encoder.encode(TEXTS)
    for hook in hooks:
        hook.remove()
    opening = {name for name, _ in layers if name.rpartition(".")[2] in MLP_INPUTS}
    assert dtypes == {name: torch.bfloat16 if name in opening else torch.float32 for name, _ in layers}
    assert bool(opening) == (model_type not in ("mixtral", "qwen3_moe", "gpt_oss"))
    assert cosine_rows(lowered_vectors, reference).min() > 0.99
