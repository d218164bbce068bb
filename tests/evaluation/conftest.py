import pytest
import torch
from diffusers import DiTTransformer2DModel

from robuq.evaluation.features import DEFAULT_WEIGHTS, FMNISTFeatures


def tiny_dit(learned_sigma: bool = False) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2 if learned_sigma else 1,
        num_layers=1, sample_size=32, patch_size=4, num_embeds_ada_norm=10,
    ).eval()


@pytest.fixture(scope="session")
def make_tiny_dit():
    return tiny_dit


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_dit")
    tiny_dit().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def feature_net():
    if not DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"{DEFAULT_WEIGHTS} missing: python -m robuq.evaluation.features --out {DEFAULT_WEIGHTS}")
    return FMNISTFeatures()


@pytest.fixture(scope="session")
def fmnist():
    """{split: (images float [N, 1, 32, 32] in [-1, 1], labels)}."""
    from robuq.data.fmnist import load_fashion_mnist, to_latent

    return {split: (to_latent(x), y) for split in ("train", "test") for x, y in [load_fashion_mnist(split=split)]}
