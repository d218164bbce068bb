"""Ternary (absmean) weights: three levels, the BitNet scale, a straight-through gradient."""

import pytest
import torch

from robuq.quant import TernaryWeight, ternary_codes


def _weights(out=16, inp=96):
    # rows of very different scales: a per-tensor scale would not fit them all
    return torch.randn(out, inp, dtype=torch.float64) * torch.logspace(-2, 1, out, dtype=torch.float64)[:, None]


def test_per_channel_three_levels_with_absmean_scale():
    w = _weights()
    q = TernaryWeight("channel")(w)
    s = w.abs().mean(dim=1)
    for i in range(w.shape[0]):
        levels = set(q[i].tolist())
        assert levels == {-s[i].item(), 0.0, s[i].item()}, (i, levels)
    # by hand: s * clip(round(w / s), -1, 1)
    torch.testing.assert_close(q, s[:, None] * (w / s[:, None]).round().clamp(-1, 1), rtol=0, atol=0)


def test_per_tensor_three_levels_with_one_scale():
    w = torch.randn(8, 64, dtype=torch.float64)
    q = TernaryWeight("tensor")(w)
    s = w.abs().mean().item()
    assert set(q.unique().tolist()) == {-s, 0.0, s}
    torch.testing.assert_close(q, s * (w / s).round().clamp(-1, 1), rtol=0, atol=0)


def test_per_channel_and_per_tensor_differ_on_mixed_scales():
    w = _weights()
    assert not torch.equal(TernaryWeight("channel")(w), TernaryWeight("tensor")(w))
    # per tensor, the small rows collapse to zero; per channel they keep three levels
    assert torch.count_nonzero(TernaryWeight("tensor")(w)[0]) == 0
    assert torch.count_nonzero(TernaryWeight("channel")(w)[0]) > 0


@pytest.mark.parametrize("granularity,scale_shape", [("channel", (16, 1)), ("tensor", (1, 1))])
def test_codes_and_scale(granularity, scale_shape):
    w = _weights()
    codes, s = ternary_codes(w, granularity)
    assert s.shape == scale_shape and codes.dtype == w.dtype
    assert set(codes.unique().tolist()) == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(codes * s, TernaryWeight(granularity)(w), rtol=0, atol=0)


def test_zero_row_gives_zero_codes_not_nan():
    w = torch.randn(4, 32)
    w[2] = 0
    q = TernaryWeight()(w)
    assert torch.isfinite(q).all() and torch.count_nonzero(q[2]) == 0


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_straight_through_gradient_is_identity(granularity):
    w = _weights().requires_grad_(True)
    g = torch.randn_like(w)
    (TernaryWeight(granularity)(w) * g).sum().backward()
    torch.testing.assert_close(w.grad, g, rtol=0, atol=0)


def test_works_in_float32_and_bfloat16():
    w = torch.randn(8, 64)
    for dtype in (torch.float32, torch.bfloat16):
        q = TernaryWeight()(w.to(dtype))
        assert q.dtype == dtype
        for row in q:
            assert len(row.unique()) == 3


@pytest.mark.parametrize("granularity", ["row", "group", "", None])
def test_bad_granularity_refused(granularity):
    with pytest.raises(ValueError, match="granularity"):
        TernaryWeight(granularity)
    with pytest.raises(ValueError, match="granularity"):
        ternary_codes(torch.randn(4, 4), granularity)


@pytest.mark.parametrize("shape", [(16,), (4, 4, 4), (2, 3, 3, 3)])
def test_non_2d_weight_refused(shape):
    with pytest.raises(ValueError, match="2-D"):
        TernaryWeight()(torch.randn(*shape))
