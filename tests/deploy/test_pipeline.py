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
