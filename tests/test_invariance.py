"""Batch-invariant linear layers: the same row gives the same bits in a product of any size."""

from __future__ import annotations

import pytest
import torch

from lm2vec.invariance import ROWS, BatchInvariant, blocked_linear


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
