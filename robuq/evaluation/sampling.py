"""Class-conditional sampling with classifier-free guidance through diffusers schedulers.

Per batch of labels y: x_T ~ N(0, I), then for every scheduler timestep t

    eps_c, eps_u = model([x_t; x_t], t, [y; null]).chunk(2)      (one forward of 2B samples)
    eps = eps_u + s * (eps_c - eps_u)                             (CFG, Ho & Salimans 2022)
    x_{t-1} = scheduler.step(eps, t, x_t)

The null label is `num_classes`. With learned sigma (2C output channels) the last C channels are
DiT's variance interpolation v: DDPM (`variance_type="learned_range"`) gets the conditional v
appended to eps, DDIM and DPM-Solver++ do not use it. Noise (x_T and DDPM's per-step noise) comes
from a CPU generator seeded per sample index, so a sample depends on (seed, index) only, not on
the batch size or the device.
"""

from collections.abc import Iterator, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from rich.progress import Progress

from robuq.diffusion import SCHEDULE_KWARGS
from robuq.models import frozen_forward

SCHEDULERS = ("ddpm", "ddim", "dpm")


def make_scheduler(name: str, learned_sigma: bool = False):
    """A diffusers scheduler on our training schedule. "trailing" spacing makes the first step
    t = 999, where x_T ~ N(0, I) belongs; x_0 is never clipped (latents are not in [-1, 1])."""
    kwargs = dict(SCHEDULE_KWARGS, timestep_spacing="trailing")
    if name == "ddpm":
        variance_type = "learned_range" if learned_sigma else "fixed_small"
        return DDPMScheduler(**kwargs, variance_type=variance_type, clip_sample=False)
    if name == "ddim":
        return DDIMScheduler(**kwargs, clip_sample=False)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**kwargs, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")


def model_shape(model) -> tuple[int, tuple[int, int, int], bool]:
    """(num_classes, sample_shape (C, H, W), learned_sigma) from a diffusers DiT's config."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_embeds_ada_norm", None) is None:
        raise ValueError("model has no diffusers DiT config; pass num_classes, sample_shape and learned_sigma")
    channels, size = config.in_channels, config.sample_size
    out_channels = config.out_channels or channels
    return config.num_embeds_ada_norm, (channels, size, size), out_channels == 2 * channels


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The noise source of sample `index`. CPU generators keep 32 bits of their seed: indices
    of one run get distinct seeds, and seeds are spread by a Fibonacci-hashing stride so that
    runs with nearby seeds do not share streams."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index) % 2**32)


@torch.no_grad()
def iter_samples(
    model,
    labels: Sequence[int] | torch.Tensor,
    *,
    scheduler: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.5,
    seed: int = 0,
    batch_size: int = 64,
    num_classes: int | None = None,
    sample_shape: tuple[int, int, int] | None = None,
    learned_sigma: bool | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield x_0 for labels[0:B], labels[B:2B], ... as float32 [B, C, H, W] on `device`.

    The model runs under torch.autocast(dtype) unless dtype is float32, the scheduler always in
    float32. num_classes, sample_shape and learned_sigma default to the model's diffusers config,
    device to the model's.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if None in (num_classes, sample_shape, learned_sigma):
        config = model_shape(model)
        num_classes = config[0] if num_classes is None else num_classes
        sample_shape = config[1] if sample_shape is None else tuple(sample_shape)
        learned_sigma = config[2] if learned_sigma is None else learned_sigma
    device = torch.device(device) if device is not None else next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    noise_scheduler = make_scheduler(scheduler, learned_sigma)
    num_batches = -(-len(labels) // batch_size)

    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"sampling: {scheduler}, {steps} steps, cfg {cfg_scale}", total=num_batches * steps)
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size].to(device)
            generators = [sample_generator(seed, i) for i in range(start, start + len(y))]
            x = torch.cat([torch.randn(1, *sample_shape, generator=g) for g in generators]).to(device)
            yield denoise(model, noise_scheduler, x, y, steps=steps, cfg_scale=cfg_scale, num_classes=num_classes,
                          learned_sigma=learned_sigma, dtype=dtype, generator=generators,
                          on_step=lambda: bar.advance(task))


@torch.no_grad()
def denoise(model, scheduler, x: torch.Tensor, y: torch.Tensor, *, steps: int, cfg_scale: float, num_classes: int,
            learned_sigma: bool, dtype: torch.dtype = torch.float32, generator=None, on_step=None) -> torch.Tensor:
    """x_T [B, C, H, W] -> x_0 through ``steps`` steps of a diffusers ``scheduler`` with CFG (module
    docstring); ``generator`` (one, or one per sample) feeds the scheduler's stochastic steps.

    ``dtype``: the compute dtype of a model stored in fp32, which then runs under autocast to it. A
    model stored in bf16/fp16 (a bf16 export, a ``.to(bfloat16)`` DiT) runs in its own dtype on
    inputs cast to it (``robuq.models.frozen_forward``), as diffusers' ``DiTPipeline`` feeds them. (Autocast over a bf16 model would run its LayerNorms, and
    the elementwise ops after them, in fp32: 23% slower for the bf16 DiT-XL/2 at batch 16 on an
    H100, docs/PERFORMANCE.md.) x and the scheduler stay in fp32 either way."""
    channels = x.shape[1]
    out_channels = 2 * channels if learned_sigma else channels
    keep_v = learned_sigma and getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    guided = cfg_scale != 1.0
    y_in = torch.cat([y, torch.full_like(y, num_classes)]) if guided else y
    scheduler.set_timesteps(steps, device=x.device)  # also resets multistep solver state
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        with torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32):
            out = frozen_forward(model, x_in, t.expand(len(x_in)), y_in).float()
        if out.shape[1] != out_channels:
            raise ValueError(
                f"model returned {out.shape[1]} channels, expected {out_channels} "
                f"(in_channels {channels}, learned_sigma {learned_sigma})"
            )
        eps, v = out[:, :channels], out[:, channels:]
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps, v = eps_uncond + cfg_scale * (eps_cond - eps_uncond), v[: len(y)]
        model_output = torch.cat([eps, v], dim=1) if keep_v else eps
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step()
    return x


def sample(model, labels: Sequence[int] | torch.Tensor, **kwargs) -> torch.Tensor:
    """All samples for `labels` as one float32 CPU tensor [N, C, H, W]; kwargs as iter_samples."""
    return torch.cat([x.cpu() for x in iter_samples(model, labels, **kwargs)])
