"""The exported DiT block with its adaLN inside the quantize launches (robuq.kernels.block): which
blocks get it, and that it computes what diffusers' block does (CPU: the launches fall back to
torch's LayerNorm and modulation; the kernel is checked under the interpreter and on the GPU)."""

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("triton")

from robuq.deploy import export, load_exported, pack_model  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402


def packed_dit(plan=None, **cfg):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=1,
                                            out_channels=1, num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10)
    quantize_(model, QuantConfig(**cfg), plan=plan)
    x, t, y = inputs()
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
    return pack_model(model).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 700]), torch.tensor([1, 3])


def fused_blocks(model):
    return [n for n, m in model.named_modules() if isinstance(m, diffusers.models.attention.BasicTransformerBlock)
            and "forward" in m.__dict__]


@pytest.mark.parametrize("plan,cfg,fused", [
    (None, {}, ["transformer_blocks.0", "transformer_blocks.1"]),
    ({"transformer_blocks.1.attn1.to_k": 3}, {}, ["transformer_blocks.0"]),  # q/k/v of block 1: three launches
    (None, {"exclude": ["*ff.net.0.proj"]}, []),  # fc1 in full precision: no launch to put the norm in
])
def test_which_blocks_fuse_their_norms(plan, cfg, fused, tmp_path):
    model = packed_dit(plan, **cfg)
    assert fused_blocks(model) == fused


def test_fused_block_computes_what_diffusers_does(tmp_path):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=1,
                                            out_channels=1, num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10)
    quantize_(model, QuantConfig())
    x, t, y = inputs()
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
    export(model, tmp_path / "m")
    loaded = load_exported(tmp_path / "m")
    assert len(fused_blocks(loaded)) == 2
    plain = copy.deepcopy(loaded)
    for block in plain.transformer_blocks:
        del block.forward
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, timestep=t, class_labels=y).sample,
                                   plain(x, timestep=t, class_labels=y).sample, rtol=1e-5, atol=1e-5)
