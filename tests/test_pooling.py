"""Pooling against hand computations, under both padding sides and with instruction tokens excluded."""

from __future__ import annotations

import pytest
import torch

from lm2vec.choices import PoolingMode, parse_pooling
from lm2vec.pooling import exclude_prefix, pool

# One text of 4 real tokens whose first token is an instruction; states are [1..4] * ones.
STATES = torch.arange(1.0, 5.0)[:, None].expand(4, 3)
EXPECTED = {
    PoolingMode.MEAN: (2 + 3 + 4) / 3,
    PoolingMode.WEIGHTED_MEAN: (2 * 2 + 3 * 3 + 4 * 4) / (2 + 3 + 4),  # weights = positions 2, 3, 4
    PoolingMode.LAST_TOKEN: 4.0,
    PoolingMode.FIRST_TOKEN: 2.0,  # the first token after the instruction
}


def padded(side: str, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    filler = torch.full((pad, 3), 100.0)  # padding states must never leak into the result
    hidden = torch.cat([filler, STATES]) if side == "left" else torch.cat([STATES, filler])
    mask = torch.tensor([0] * pad + [1] * 4) if side == "left" else torch.tensor([1] * 4 + [0] * pad)
    return hidden[None], mask[None]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", list(PoolingMode))
def test_modes_match_hand_computation(mode: PoolingMode, side: str):
    hidden, mask = padded(side)
    pool_mask = exclude_prefix(mask, torch.tensor([1]))
    out = pool(hidden, mask, pool_mask, mode)
    torch.testing.assert_close(out, torch.full((1, 3), EXPECTED[mode]))


def test_exclude_prefix_counts_from_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = exclude_prefix(mask, torch.tensor([2, 1]))
    assert got.tolist() == [[False, False, False, False, True], [False, True, True, False, False]]


def test_text_that_is_all_instruction_falls_back_to_all_tokens():
    hidden, mask = padded("right")
    out = pool(hidden, mask, exclude_prefix(mask, torch.tensor([4])), PoolingMode.MEAN)
    torch.testing.assert_close(out, torch.full((1, 3), 2.5))


def test_bf16_states_pool_in_fp32():
    hidden, mask = padded("left")
    out = pool(hidden.bfloat16(), mask, mask.bool(), PoolingMode.MEAN)
    assert out.dtype == torch.float32


def test_unknown_mode_lists_the_known_ones():
    with pytest.raises(ValueError, match="weighted_mean"):
        parse_pooling("max")
