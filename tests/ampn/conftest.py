import pytest
import torch
from diffusers import DiTTransformer2DModel


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny diffusers DiT (hidden 16, one block: 7 quantized linears) saved with save_pretrained."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1,
        sample_size=32, patch_size=4, num_embeds_ada_norm=10,
    )
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    return str(path)
