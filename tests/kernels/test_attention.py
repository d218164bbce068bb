"""Which attentions get one q/k/v launch (SharedQKVAttnProcessor), in QAT and in the exported
model, and that the processor computes what diffusers' own does (CPU; the kernels themselves are
checked under the interpreter and on the GPU)."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

pytest.importorskip("triton")

from robuq.deploy.modules import pack_model  # noqa: E402
from robuq.kernels.attention import SharedQKVAttnProcessor  # noqa: E402
from robuq.kernels.qat import use_fused_kernels  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402

QKV = ["to_q", "to_k", "to_v"]


def quantized_attention(plan=None, include=QKV):
    torch.manual_seed(0)
    attn = Attention(query_dim=192, heads=4, dim_head=48, bias=True)
    quantize_(attn, QuantConfig(include=include, act_bits=2), plan=plan)
    attn(torch.randn(2, 5, 192))  # initialise the LSQ steps
    return attn


@pytest.mark.parametrize("plan,include,shared", [
    (None, QKV, True),
    ({"to_k": 3}, QKV, False),  # an AMPN plan with another width for k: three launches
    (None, ["to_q", "to_v"], False),  # k kept in full precision
])
def test_which_attentions_share_one_launch(plan, include, shared):
    qat = quantized_attention(plan, include)
    if plan:
        assert qat.to_k.act.quantizer.bits == 3 and qat.to_q.act.quantizer.bits == 2
    use_fused_kernels(qat)
    assert isinstance(qat.processor, SharedQKVAttnProcessor) == shared
    use_fused_kernels(qat, False)
    assert type(qat.processor) is AttnProcessor2_0
    if len(include) == 3:
        packed = pack_model(quantized_attention(plan, include))
        assert isinstance(packed.processor, SharedQKVAttnProcessor) == shared


def test_shared_processor_computes_what_diffusers_does():
    """On CPU the shared processor falls back to each layer's own forward: same output as diffusers'
    processor, for the QAT layers and the packed ones, and cross-attention goes to the parent."""
    fused, packed = quantized_attention(), pack_model(quantized_attention())
    use_fused_kernels(fused)
    for attn in (fused, packed):
        assert isinstance(attn.processor, SharedQKVAttnProcessor)
        plain = copy.deepcopy(attn)
        plain.set_processor(AttnProcessor2_0())
        x, ctx = torch.randn(2, 5, 192), torch.randn(2, 3, 192)
        with torch.no_grad():
            assert torch.equal(attn(x), plain(x))
            assert torch.equal(attn(x, encoder_hidden_states=ctx), plain(x, encoder_hidden_states=ctx))

