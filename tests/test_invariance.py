"""Batch-invariant linear layers: the same row gives the same bits in a product of any size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lm2vec.invariance import ELEMENTWISE, ROWS, BatchInvariant, block_sizes, blocked_linear, in_row_blocks


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_are_bit_identical_whatever_the_row_count(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(1536, 576, generator=generator)
        rows = torch.randn(3 * ROWS + 17, 576, generator=generator)
        reference = blocked_linear(rows, weight)
        for count in (1, 5, 15, ROWS - 1, ROWS + 3, 2 * ROWS):
            for start in (0, 7):
                part = blocked_linear(rows[start : start + count], weight)
                assert torch.equal(part, reference[start : start + count]), (count, start)
    finally:
        torch.set_num_threads(previous)


def test_row_blocks_are_for_cpus_only():
    """Other devices (GPUs: here the meta device, which computes shapes only) take one product: fast, and their
    batch invariance is not promised."""
    calls: list[int] = []

    def kernel(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(rows.shape[0])
        return rows @ weight.t()

    for device in ("meta", "cpu"):
        calls.clear()
        out = in_row_blocks(kernel, torch.ones(3 * ROWS + 5, 8, device=device), torch.ones(4, 8, device=device))
        assert out.shape == (3 * ROWS + 5, 4)
        assert calls == ([3 * ROWS + 5] if device == "meta" else [ROWS] * 4)


def test_blocked_linear_is_linear_with_bias_and_any_leading_shape():
    x, weight, bias = torch.randn(3, 50, 32), torch.randn(24, 32), torch.randn(24)
    out = blocked_linear(x, weight, bias)
    assert out.shape == (3, 50, 24)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_the_mode_reroutes_nn_linear_for_inference_only():
    layer = torch.nn.Linear(32, 8)
    x = torch.randn(5, 32)
    calls = []

    class Counting(BatchInvariant):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                calls.append(torch.is_grad_enabled())
            return super().__torch_function__(func, types, args, kwargs)

    with torch.no_grad(), Counting():
        assert torch.equal(layer(x), blocked_linear(x, layer.weight, layer.bias))
    with Counting():  # training: autograd needs the plain op, and the mode leaves it alone
        layer(x).sum().backward()
    assert calls == [False, True] and layer.weight.grad is not None


@pytest.mark.parametrize("width", [1, 3, 100])
def test_narrow_elementwise_functions_give_a_row_its_bits_in_any_batch(width: int):
    """ATen's scalar path for a tensor's last few elements rounds otherwise than its vector path (sigmoid of a
    one-column gate: 31 of 39 row counts gave some row other bits); in whole vectors every row keeps its bits."""
    rows = torch.randn(200, width, generator=torch.Generator().manual_seed(0))
    functions = ELEMENTWISE - {torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.exp}  # the same kernels
    with torch.inference_mode(), BatchInvariant():
        for function in [*functions, lambda x: x.sigmoid(), lambda x: nn.functional.gelu(x, approximate="tanh")]:
            everything = function(rows)
            torch.testing.assert_close(everything, function(rows.double()).float())  # still the function
            for count in range(1, 40):
                assert torch.equal(function(rows[:count]), everything[:count]), (function, count)


def test_token_rows_times_one_matrix_give_a_row_its_bits_in_any_batch():
    """Falcon's linear layers compute ``hidden_states @ weight.T`` on (batch, tokens, in) states: a linear layer the
    mode must block as ``F.linear`` (a text's vector moved by 3e-7 with its batch)."""
    generator = torch.Generator().manual_seed(0)
    states, weight = torch.randn(1, 300, 256, generator=generator), torch.randn(1024, 256, generator=generator)
    with torch.inference_mode(), BatchInvariant():
        everything = states @ weight.T
        torch.testing.assert_close(everything, (states.double() @ weight.double().T).float(), rtol=1e-5, atol=1e-4)
        for count in (*range(1, 40), 127, 129, 255, 257):
            assert torch.equal(states[:, :count] @ weight.T, everything[:, :count]), count
            assert torch.equal(torch.matmul(states[0, :count], weight.T), everything[0, :count]), count


def test_token_rows_times_stacked_weights_give_a_row_its_bits_in_any_batch():
    """Inkling's shared experts compute ``torch.bmm(states, weights.transpose(1, 2))``: each expert's weight times
    all of a batch's token rows (a text's vector moved by 1e-7 with its batch). Batched products of two activations
    (attention's) are left alone."""
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(300, 256, generator=generator).expand(2, -1, -1)
    weights = nn.Parameter(torch.randn(2, 1024, 256, generator=generator))
    with torch.inference_mode(), BatchInvariant():
        everything = torch.bmm(states, weights.transpose(1, 2))
        expected = torch.bmm(states.double(), weights.double().transpose(1, 2)).float()
        torch.testing.assert_close(everything, expected, rtol=1e-5, atol=1e-4)
        for count in (*range(1, 40), 127, 129, 255, 257):
            assert torch.equal(torch.bmm(states[:, :count], weights.transpose(1, 2)), everything[:, :count]), count
            assert torch.equal(states[:, :count].bmm(weights.transpose(1, 2)), everything[:, :count]), count


def _shared_key_head(generator: torch.Generator, texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention's scores with one key/value head for all query heads (Gemma 3 1B, DeepSeek-V4): the keys are
    a stride-0 view, as ``repeat_kv`` leaves them."""
    keys = torch.randn(texts, 1, 5, 128, generator=generator).expand(-1, 4, -1, -1)
    return torch.randn(texts, 4, 5, 128, generator=generator), keys.transpose(2, 3)


def _head_major_views(generator: torch.Generator, texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniMax's lightning attention: (batch, tokens, heads, dim) states viewed as (batch, heads, tokens, dim)."""
    queries, keys = torch.randn(2, texts, 2, 4, 128, generator=generator)
    return queries.transpose(1, 2), keys.permute(0, 2, 3, 1)


def _strided_vectors(generator: torch.Generator, texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's scan: each text's (channels, state) matrix times a state vector sliced from a larger tensor."""
    return torch.randn(texts, 128, 16, generator=generator), torch.randn(texts, 16, 20, generator=generator)[..., :1]


@pytest.mark.parametrize("operands", [_shared_key_head, _head_major_views, _strided_vectors])
def test_products_of_a_batchs_activations_give_a_text_its_bits_in_any_batch(operands):
    """Batched products of two activations where an operand is broadcast or laid out sparsely: ``torch.matmul``
    computed one text by another path than a batch of them (texts moved by 1e-7 to 2e-6 in MQA models on eager
    attention, MiniMax, Mamba). Each text's product now equals its own, alone."""
    a, b = operands(torch.Generator().manual_seed(0), 16)
    with torch.inference_mode(), BatchInvariant():
        everything = a @ b
        torch.testing.assert_close(everything, (a.double() @ b.double()).float())
        for count in (1, 2, 3, 8):
            for start in (0, 5):
                part = slice(start, start + count)
                assert torch.equal(a[part] @ b[part], everything[part]), (count, start)
                assert torch.equal(torch.matmul(a[part], b[part]), everything[part]), (count, start)


def test_a_row_count_dependent_kernel_is_probed_as_such_and_keeps_alike_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path))
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))

    def kernel(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # another order below 64 rows, as MKL's
        if rows.shape[0] < 64:
            return rows @ weight.t()
        return (rows.double() @ weight.double().t()).float()

    rows = torch.randn(1100, 64, generator=torch.Generator().manual_seed(2))
    assert block_sizes("test-variant 64x96", kernel, rows, weight) == (64, ROWS, 256, 512, 1024)
    assert (tmp_path / "hardware").is_dir()  # measured once, cached
    whole = in_row_blocks(kernel, rows, weight, "test-variant 64x96")
    torch.testing.assert_close(whole, rows @ weight.t())
    for count in (1, 5, 63, 64, 200, 300, 700, 1030):
        assert torch.equal(in_row_blocks(kernel, rows[:count], weight, "test-variant 64x96"), whole[:count]), count


def test_the_probe_sees_a_summation_order_through_bf16_outputs(tmp_path, monkeypatch):
    """Rounding to bf16 hides most order differences of random rows; the probe's cancelling rows show them."""
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path))

    def kernel(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # reversed order below 32 rows
        if rows.shape[0] < 32:
            return torch.nn.functional.linear(rows.flip(1), weight.flip(1))
        return torch.nn.functional.linear(rows, weight)

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    rows = torch.randn(1152, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    rows[::37] *= 100
    assert torch.equal(kernel(rows[:16], weight), kernel(rows[:128], weight)[:16])  # random rows: no difference
    assert block_sizes("test-reversed 64x8", kernel, rows, weight) == (32, 64, ROWS, 256, 512, 1024)


@pytest.mark.parametrize("kind", ["bfloat16", "float32-onednn"])
def test_lowered_layers_give_the_same_bits_in_one_piece_or_in_blocks(kind: str, tmp_path, monkeypatch):
    from lm2vec.quantization import Bf16Linear, OneDnnLinear, onednn_available

    if kind == "float32-onednn" and not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path))
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(576, 1536)
    layer = (Bf16Linear if kind == "bfloat16" else OneDnnLinear)(linear)  # probed for its block sizes
    rows = torch.randn(700, 576, generator=generator)
    rows[::50] *= 100
    with torch.inference_mode():
        whole = layer(rows)
        for count in (1, 9, 40, 128, 129, 250, 400, 520):
            for start in (0, 11):
                assert torch.equal(layer(rows[start : start + count].clone()), whole[start : start + count])
