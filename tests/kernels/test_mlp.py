"""Which MLPs run their GELU inside fc2's kernels in QAT (``use_fused_kernels(...,
fuse_activations=True)``, robuq.kernels.mlp.fuse_gelu), and that the fused forward computes what
diffusers' FeedForward does (CPU: the layers fall back to GELU then their own forward; the kernels
themselves are checked under the interpreter and on the GPU)."""

import copy

import pytest
import torch
from diffusers.models.attention import FeedForward

pytest.importorskip("triton")

from robuq.kernels.qat import use_fused_kernels  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402

FC = ["net.0.proj", "net.2"]


def quantized_mlp(include=FC, **kwargs):
    torch.manual_seed(0)
    ff = FeedForward(192, mult=4, activation_fn=kwargs.pop("activation_fn", "gelu-approximate"), **kwargs)
    quantize_(ff, QuantConfig(include=include, act_bits=2))
    ff(torch.randn(2, 5, 192))  # initialise the LSQ steps
    return ff


@pytest.mark.parametrize("kwargs,include,fused", [
    ({}, FC, True),
    ({}, ["net.0.proj"], False),  # fc2 in full precision: no kernel to put the GELU in
    ({"activation_fn": "gelu"}, FC, False),  # exact (erf) GELU: the kernel computes the tanh form
    ({"dropout": 0.1}, FC, False),  # dropout between the GELU and fc2
])
def test_which_mlps_fuse_the_gelu(kwargs, include, fused):
    qat = quantized_mlp(include, **kwargs)
    use_fused_kernels(qat, fuse_activations=True)
    assert ("forward" in qat.__dict__) == fused
    use_fused_kernels(qat, False)
    assert "forward" not in qat.__dict__
    use_fused_kernels(qat)  # the default keeps diffusers' GELU pass (faster on an H100)
    assert "forward" not in qat.__dict__


def test_fused_mlp_computes_what_diffusers_does():
    ff = quantized_mlp()
    use_fused_kernels(ff, fuse_activations=True)
    plain = copy.deepcopy(ff)
    del plain.forward
    x = torch.randn(2, 5, 192)
    with torch.no_grad():
        assert torch.equal(ff(x), plain(x))
