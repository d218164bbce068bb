from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

from robuq.diffusion import SCHEDULE_KWARGS
from robuq.evaluation.sampling import SCHEDULERS, make_scheduler, model_shape, sample

LABELS = list(range(10)) * 2


def test_make_scheduler():
    assert isinstance(make_scheduler("ddpm"), DDPMScheduler)
    assert make_scheduler("ddpm").config.variance_type == "fixed_small"
    assert make_scheduler("ddpm", learned_sigma=True).config.variance_type == "learned_range"
    assert isinstance(make_scheduler("ddim"), DDIMScheduler)
    dpm = make_scheduler("dpm")
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    for name in SCHEDULERS:
        config = make_scheduler(name).config
        assert {k: config[k] for k in SCHEDULE_KWARGS} == SCHEDULE_KWARGS
        scheduler = make_scheduler(name)
        scheduler.set_timesteps(10)
        assert scheduler.timesteps[0] == 999
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("euler")


def test_model_shape(make_tiny_dit):
    assert model_shape(make_tiny_dit()) == (10, (1, 32, 32), False)
    assert model_shape(make_tiny_dit(learned_sigma=True)) == (10, (1, 32, 32), True)


@pytest.mark.parametrize("learned_sigma", [False, True])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_same_seed_same_samples_any_batch_size(scheduler, learned_sigma, make_tiny_dit):
    model = make_tiny_dit(learned_sigma)
    kwargs = dict(scheduler=scheduler, steps=4, progress=False)
    a = sample(model, LABELS, batch_size=8, **kwargs)
    assert a.shape == (20, 1, 32, 32) and a.dtype == torch.float32 and a.isfinite().all()
    assert torch.equal(a, sample(model, LABELS, batch_size=8, **kwargs))
    # same noise per sample; the GEMMs' rounding depends on the batch size (CPU kernels block by it), and the
    # untrained DiT's samples grow to ~1e3-1e7, so the bound is relative to their scale
    scale = float(a.abs().max())
    torch.testing.assert_close(a, sample(model, LABELS, batch_size=20, **kwargs), rtol=1e-4, atol=1e-6 * scale)
    assert not torch.equal(a, sample(model, LABELS, batch_size=8, seed=1, **kwargs))


class ConstantEps(nn.Module):
    """Predicts eps = c for real labels and 0 for the null label (num_classes = 10)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))
        self.batch_sizes = []

    def forward(self, x, timestep, class_labels):
        self.batch_sizes.append(len(x))
        eps = (class_labels != 10).float()[:, None, None, None] * self.c * torch.ones_like(x)
        return SimpleNamespace(sample=eps)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cfg_is_uncond_plus_scale_times_difference(scheduler):
    kwargs = dict(
        scheduler=scheduler, steps=3, num_classes=10, sample_shape=(1, 4, 4), learned_sigma=False, progress=False
    )
    guided_model = ConstantEps(0.1)
    guided = sample(guided_model, [0, 1, 2], cfg_scale=4.0, **kwargs)
    assert guided_model.batch_sizes == [6] * 3  # cond and uncond in one batch
    plain_model = ConstantEps(0.4)
    plain = sample(plain_model, [0, 1, 2], cfg_scale=1.0, **kwargs)
    assert plain_model.batch_sizes == [3] * 3  # no uncond pass without guidance
    torch.testing.assert_close(guided, plain)


class RecordsInput(ConstantEps):
    def forward(self, x, timestep, class_labels):
        self.seen = (x.dtype, torch.is_autocast_enabled("cpu"))
        return super().forward(x, timestep, class_labels)


@pytest.mark.parametrize("stored,seen", [
    (torch.bfloat16, (torch.bfloat16, False)),  # a bf16 model gets bf16 inputs, as diffusers' DiTPipeline feeds it
    (torch.float32, (torch.float32, True)),  # an fp32 model runs under bf16 autocast
])
def test_compute_dtype(stored, seen):
    model = RecordsInput(0.1).to(stored)
    x = sample(model, [0, 1], scheduler="ddim", steps=2, num_classes=10, sample_shape=(1, 4, 4), learned_sigma=False,
               progress=False, dtype=torch.bfloat16)
    assert model.seen == seen and x.dtype == torch.float32


def test_bad_inputs(make_tiny_dit):
    model = make_tiny_dit()
    with pytest.raises(ValueError, match="labels must be in"):
        sample(model, [10], steps=1, progress=False)
    with pytest.raises(ValueError, match="expected 2 "):
        sample(model, [0], steps=1, learned_sigma=True, progress=False)
