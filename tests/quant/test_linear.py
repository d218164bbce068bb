"""QuantLinear: exact with quantizers off, ternary in the rotated basis, trainable."""

import pytest
import torch
from torch import nn

from robuq.quant import QuantLinear, RobustQuantizer, TernaryWeight


def _linear(in_features, out_features=48, bias=True, dtype=torch.float64):
    lin = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():  # a non-trivial bias so that dropping it would show
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rotation", ["kronecker", "block", "none"])
@pytest.mark.parametrize("in_features", [192, 768, 1152])
def test_quantizers_off_equals_original_linear(in_features, rotation, bias):
    lin = _linear(in_features, bias=bias)
    act = RobustQuantizer(in_features, bits=16, rotation=rotation, seed=5)
    q = QuantLinear.from_linear(lin, act, weight_quant=None).double()
    x = torch.randn(3, 9, in_features, dtype=torch.float64)
    torch.testing.assert_close(q(x), lin(x), rtol=0, atol=1e-12)
    # the latent weight really lives in the rotated basis: W' = W R
    r = act.rotation_matrix(in_features)
    torch.testing.assert_close(q.weight, lin.weight @ r, rtol=0, atol=1e-12)
    if rotation != "none":
        assert not torch.allclose(q.weight, lin.weight)
    assert (q.bias is None) == (not bias)


def test_conversion_does_not_alias_the_original_parameters():
    lin = _linear(192)
    q = QuantLinear.from_linear(lin, RobustQuantizer(192, bits=16, rotation="none"), None)
    with torch.no_grad():
        q.weight.add_(1.0)
        q.bias.add_(1.0)
    assert not torch.allclose(q.weight, lin.weight) and not torch.allclose(q.bias, lin.bias)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("rotation", ["kronecker", "block"])
def test_ternary_weights_three_levels_in_rotated_basis(rotation, granularity):
    lin = _linear(768, 64)
    q = QuantLinear.from_linear(lin, RobustQuantizer(768, bits=16, rotation=rotation), TernaryWeight(granularity))
    wq = q.quantized_weight()
    w_rot = lin.weight @ q.act.rotation_matrix(768)
    s = w_rot.abs().mean(1, keepdim=True) if granularity == "channel" else w_rot.abs().mean()
    torch.testing.assert_close(wq, s * (w_rot / s).round().clamp(-1, 1), rtol=0, atol=1e-12)
    for row in wq:
        assert len(row.unique()) == 3
    # the layer computes x R T(W R)^T + b
    x = torch.randn(5, 768, dtype=torch.float64)
    torch.testing.assert_close(q(x), q.act.rotate(x) @ wq.T + lin.bias, rtol=0, atol=1e-12)


def test_w158a2_forward_backward():
    lin = _linear(192, 96, dtype=torch.float32)
    q = QuantLinear.from_linear(lin, RobustQuantizer(192, bits=2), TernaryWeight())
    x = torch.randn(2, 16, 192, requires_grad=True)
    y = q(x)
    assert y.shape == (2, 16, 96) and torch.isfinite(y).all()
    # far from the FP output at 2 bits, but correlated with it
    ref = lin(x)
    rel = ((y - ref).pow(2).sum() / ref.pow(2).sum()).item()
    assert 0.01 < rel < 0.9, rel
    y.pow(2).mean().backward()
    grads = {"x": x.grad, "weight": q.weight.grad, "bias": q.bias.grad, "step": q.act.quantizer.step.grad}
    for name, t in grads.items():
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0, name
    # the rotation's signs are a buffer, not a trainable parameter
    assert "act.rotation.signs" in dict(q.named_buffers())
    assert {n for n, _ in q.named_parameters()} == {"weight", "bias", "act.quantizer.step"}


@pytest.mark.parametrize("shape", [(4, 191), (4, 193), (2, 3, 96)])
def test_wrong_input_width_is_a_clear_error(shape):
    q = QuantLinear.from_linear(_linear(192), RobustQuantizer(192, bits=2), TernaryWeight()).double()
    with pytest.raises(ValueError, match="last dim 192"):
        q(torch.randn(*shape, dtype=torch.float64))


def test_extra_repr():
    q = QuantLinear.from_linear(_linear(192, 48, bias=False), RobustQuantizer(192), TernaryWeight())
    assert "in_features=192, out_features=48, bias=False" in repr(q)
