import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from robuq.deploy import RobuQDiTPipeline, export  # noqa: E402
from robuq.evaluation.sampling import denoise, make_scheduler  # noqa: E402

from .test_export import init_and_eval, tiny_student  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("export")
    student = init_and_eval(tiny_student(act_bits=4))
    export(student, path)
    return path, student


def test_pipeline_samples_as_the_student_does(exported):
    path, student = exported
    pipe = RobuQDiTPipeline.from_exported(path, scheduler="ddim")
    out = pipe([1, 3], guidance_scale=1.5, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
               output_type="pt")
    assert out.images.shape == (2, 1, 32, 32) and 0 <= out.images.min() and out.images.max() <= 1
    x_t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))  # randn_tensor's draw on CPU
    ref = denoise(student, make_scheduler("ddim"), x_t, torch.tensor([1, 3]), steps=4, cfg_scale=1.5,
                  num_classes=10, learned_sigma=False)
    torch.testing.assert_close(out.images, (ref / 2 + 0.5).clamp(0, 1), rtol=0, atol=2e-3)


def test_pipeline_output_types_and_errors(exported):
    path, _ = exported
    pipe = RobuQDiTPipeline.from_exported(path, scheduler="ddpm", id2label={0: "T-shirt, top", 1: "trouser"})
    kw = dict(generator=torch.Generator().manual_seed(1), num_inference_steps=2)
    pil = pipe(pipe.get_label_ids(["top", "trouser"]), **kw).images
    assert len(pil) == 2 and pil[0].size == (32, 32)
    arr, = pipe([2], output_type="np", return_dict=False, **kw)
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 32, 32, 1)
    with pytest.raises(ValueError, match=r"class_labels .* \[0, 10\)"):
        pipe([10], **kw)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="latent", **kw)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        pipe([1], generator=torch.Generator().manual_seed(1), num_inference_steps=0)
    with pytest.raises(ValueError, match="unknown class names"):
        pipe.get_label_ids("sandal")
    with pytest.raises(ValueError, match="unknown scheduler"):
        RobuQDiTPipeline.from_exported(path, scheduler="euler")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_dit_replays_the_eager_model(exported):
    from robuq.deploy import CUDAGraphDiT

    path, _ = exported
    pipe = RobuQDiTPipeline.from_exported(path, scheduler="ddpm", device="cuda", dtype=torch.bfloat16)
    graphed = RobuQDiTPipeline(CUDAGraphDiT(pipe.transformer), pipe.scheduler)
    kw = dict(guidance_scale=2.0, num_inference_steps=5, output_type="pt")
    eager = pipe([1, 2, 3], generator=torch.Generator("cuda").manual_seed(0), **kw).images
    replay = graphed([1, 2, 3], generator=torch.Generator("cuda").manual_seed(0), **kw).images
    torch.testing.assert_close(replay, eager, rtol=0, atol=1e-2)
    assert len(graphed.transformer.graphs) == 1  # one shape: captured once, replayed 5 times
    with pytest.raises(ValueError, match="CUDA inputs"):
        graphed.transformer(torch.zeros(1, 1, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_pipeline_decodes_latents_with_a_vae(tmp_path):
    """A latent DiT (4 channels) through a tiny AutoencoderKL, as DiT-XL/2 with sd-vae-ft-ema."""
    from diffusers import AutoencoderKL

    from robuq.quant import QuantConfig, quantize_

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=4, out_channels=8,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    quantize_(dit, QuantConfig(act_bits=2))
    with torch.no_grad():
        dit(torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 500]), class_labels=torch.tensor([0, 1]))
    export(dit.eval(), tmp_path / "latent")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "vae")
    pipe = RobuQDiTPipeline.from_exported(tmp_path / "latent", scheduler="ddpm", vae=str(tmp_path / "vae"))
    out = pipe([3, 4], guidance_scale=4.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert out.shape == (2, 3, 16, 16) and 0 <= out.min() and out.max() <= 1  # 8x8 latents, one 2x upsampling
