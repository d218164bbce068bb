"""A diffusers pipeline for exported (packed W1.58) DiTs: sample them as any diffusers DiT.

    pipe = RobuQDiTPipeline.from_exported("out/export", device="cuda", dtype=torch.bfloat16)
    images = pipe(class_labels=[207, 360], guidance_scale=4.0, num_inference_steps=250).images

It mirrors diffusers' ``DiTPipeline.__call__`` (class labels, CFG scale, steps, generator,
``output_type`` "pil" | "np" | "pt") with two differences that quantized and small DiTs need: the
null class is the model's ``num_embeds_ada_norm`` (DiTPipeline hard-codes 1000), and the VAE is
optional (None: the model samples pixels in [-1, 1], as the Fashion-MNIST default does). The
denoising loop is ``robuq.evaluation.sampling.denoise``, the one ``evaluate`` uses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from robuq.evaluation.sampling import SCHEDULERS, denoise, make_scheduler, model_shape

from .export import load_exported

OUTPUT_TYPES = ("pil", "np", "pt")


class RobuQDiTPipeline(DiffusionPipeline):
    """transformer: a DiT (packed by ``load_exported``, or any diffusers DiT); scheduler: a diffusers
    scheduler; vae: an ``AutoencoderKL`` for latent models, None for pixel-space models."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer, scheduler, vae: AutoencoderKL | None = None, id2label: dict[int, str] | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.labels = {}
        for key, value in (id2label or {}).items():  # "tench, Tinca tinca" -> both names
            for label in value.split(","):
                self.labels[label.strip()] = int(key)

    @classmethod
    def from_exported(cls, path: str | Path, scheduler="ddpm", vae: AutoencoderKL | str | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      id2label: dict[int, str] | None = None, exact_rotation: bool | None = None) -> RobuQDiTPipeline:
        """Load a ``robuq.deploy.export`` directory. ``scheduler``: a diffusers scheduler or one of
        ``SCHEDULERS`` (built on robuq's training schedule); ``vae``: a model, a directory or hub id;
        ``exact_rotation``: see ``load_exported``."""
        transformer = load_exported(path, device=device, dtype=dtype, exact_rotation=exact_rotation)
        if isinstance(scheduler, str):
            if scheduler not in SCHEDULERS:
                raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS} or pass a diffusers scheduler")
            scheduler = make_scheduler(scheduler, model_shape(transformer)[2])
        if isinstance(vae, (str, Path)):
            vae = AutoencoderKL.from_pretrained(vae)
        if vae is not None:
            vae = vae.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
        return cls(transformer, scheduler, vae, id2label)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names -> ids, from the pipeline's ``id2label`` (as ``DiTPipeline.get_label_ids``)."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            raise ValueError(f"unknown class names {unknown}; known: {sorted(self.labels)[:20]}")
        return [self.labels[n] for n in names]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per class label (CFG with ``guidance_scale``; 1.0 turns guidance off)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        num_classes, shape, learned_sigma = model_shape(self.transformer)
        param = next(self.transformer.parameters())
        device = param.device
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be a non-empty list of ids in [0, {num_classes}), got {class_labels!r}")
        latents = randn_tensor((len(labels), *shape), generator=generator, device=device, dtype=torch.float32)
        x = denoise(self.transformer, self.scheduler, latents, labels.to(device), steps=num_inference_steps,
                    cfg_scale=guidance_scale, num_classes=num_classes, learned_sigma=learned_sigma, dtype=param.dtype,
                    generator=generator)
        if self.vae is not None:
            x = self.vae.decode((x / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            output = images.cpu()
        else:
            output = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=output) if return_dict else (output,)


class CUDAGraphDiT(torch.nn.Module):
    """``model(x, timestep=, class_labels=)`` replayed from a CUDA graph captured once per input
    shape/dtype (and autocast state): sampling calls the same shapes hundreds of times, and a packed
    DiT is launch-bound in eager mode. Outputs are copies; inputs must be CUDA tensors."""

    def __init__(self, model: torch.nn.Module, warmup: int = 2):
        super().__init__()
        self.model, self.warmup, self.graphs = model, warmup, {}

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        args = (hidden_states, timestep, class_labels)
        if any(a.device.type != "cuda" for a in args):
            raise ValueError("CUDAGraphDiT needs CUDA inputs; call the model itself on CPU")
        key = tuple((a.shape, a.dtype) for a in args) + (torch.is_autocast_enabled("cuda"),)
        if key not in self.graphs:
            static = [a.clone() for a in args]
            # autocast's weight-cast cache must not outlive the caller's autocast context in a graph
            amp = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), enabled=key[-1], cache_enabled=False)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), amp:
                for _ in range(self.warmup):
                    self.model(static[0], timestep=static[1], class_labels=static[2])
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), amp:
                out = self.model(static[0], timestep=static[1], class_labels=static[2]).sample
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return Transformer2DModelOutput(sample=out.clone())
