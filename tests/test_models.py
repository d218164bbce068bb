"""robuq.models: how a frozen (teacher) DiT runs."""

import copy

import torch
from diffusers import DiTTransformer2DModel

from robuq.models import dit_forward, frozen_forward, native_dtype


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def inputs():
    return torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])


def test_native_dtype():
    model = tiny_dit()
    assert native_dtype(model) is None
    assert native_dtype(copy.deepcopy(model).to(torch.bfloat16)) == torch.bfloat16
    mixed = copy.deepcopy(model).to(torch.bfloat16)
    mixed.proj_out_2.float()
    assert native_dtype(mixed) is None


@torch.no_grad()
def test_frozen_forward_runs_a_half_model_natively():
    """A bf16 teacher under the trainer's autocast runs as a plain bf16 model (autocast would lift
    its LayerNorms to fp32), on x cast to bf16; an fp32 teacher keeps the caller's autocast."""
    x, t, y = inputs()
    fp32 = tiny_dit()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        native = frozen_forward(bf16, x, t, y)
        mixed = frozen_forward(fp32, x, t, y)
        autocast_ref = dit_forward(fp32, x, t, y)
    plain_ref = dit_forward(bf16, x.bfloat16(), t, y)
    assert native.dtype == torch.bfloat16 and torch.equal(native, plain_ref)
    assert torch.equal(mixed, autocast_ref)
    torch.testing.assert_close(native.float(), dit_forward(fp32, x, t, y), rtol=0.05, atol=0.05)
