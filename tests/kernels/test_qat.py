import pytest
import torch

pytest.importorskip("triton")

from robuq.kernels.qat import _ternary_weight_uncached, cached_ternary_weight  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_cached_ternary_weight_follows_every_optimizer_step(fused):
    """The per-step cache of T(W') refreshes after an optimizer step even where the optimizer leaves
    the weight's version counter alone (AdamW(fused=True) does)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    quantize_(model, QuantConfig(act_bits=2, weight_granularity="tensor", include=["0"]))
    layer = model[0]
    first = cached_ternary_weight(layer, torch.float32)
    assert cached_ternary_weight(layer, torch.float32) is first  # cached within a step
    opt = torch.optim.AdamW([layer.weight], lr=0.5, fused=fused)
    layer.weight.grad = torch.randn_like(layer.weight)
    version = layer.weight._version
    opt.step()
    assert fused == (layer.weight._version == version)  # the case the cache must not rely on
    after = cached_ternary_weight(layer, torch.float32)
    assert after is not first
    torch.testing.assert_close(after[0], _ternary_weight_uncached(layer, torch.float32)[0], rtol=0, atol=0)
    assert not torch.equal(after[0], first[0])


def test_fused_linears_refuses_a_norm_without_tokens():
    from robuq.kernels.qat import fused_linears

    model = torch.nn.Sequential(torch.nn.Linear(192, 8))
    quantize_(model, QuantConfig(act_bits=2, include=["0"]))
    norm = (torch.zeros(2, 192), torch.zeros(2, 192), 1e-6)
    with pytest.raises(ValueError, match=r"norm \(the adaLN\) needs x of shape \[B, T, K\], got \(8, 192\)"):
        fused_linears([model[0]], torch.randn(8, 192), norm=norm)
    assert fused_linears([model[0]], torch.randn(2, 4, 192), norm=norm)[0].shape == (2, 4, 8)  # reference path on CPU
