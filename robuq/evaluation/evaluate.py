"""The `evaluate` job: a checkpoint -> class-balanced samples -> FID, KID, IS, precision/recall,
a sample grid PNG and a JSON report.

    python -m robuq.evaluation.evaluate --config configs/evaluate_fmnist.yaml --checkpoint PATH

Samples are generated in batches and reduced to features on the fly (decoded through the VAE
first for latent models), so N = 50k ImageNet images never sit in memory at once.
"""

import json
import time
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from torch import nn

from robuq.evaluation.features import load_feature_network
from robuq.evaluation.metrics import DEFAULT_CACHE_DIR, compute_metrics, reference_features
from robuq.evaluation.sampling import iter_samples, model_shape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
console = Console(stderr=True)


def load_model(checkpoint: str, use_ema: bool = True) -> tuple[nn.Module, dict]:
    """(model, info) from a robuq Lightning `.ckpt` (EMA weights if use_ema; info holds e.g. the
    bit plan), an exported packed model directory (robuq.deploy) or a diffusers DiT directory / hub id."""
    if checkpoint.endswith(".ckpt"):
        from robuq.module import load_for_eval

        return load_for_eval(checkpoint, use_ema=use_ema)
    from robuq.deploy.export import CONFIG_NAME, load_exported

    if (Path(checkpoint) / CONFIG_NAME).is_file():
        return load_exported(checkpoint), {"checkpoint": checkpoint, "exported": True}
    from robuq.models import load_dit

    return load_dit(checkpoint), {}


def make_decoder(vae: str | None, device: torch.device, dtype: torch.dtype):
    """latents -> images in [-1, 1]: the identity in pixel space (vae=None), else
    AutoencoderKL(vae).decode(latents / scaling_factor) under autocast(dtype), vae being a
    directory or hub id."""
    if vae is None:
        return lambda x: x.clamp(-1, 1)
    from diffusers import AutoencoderKL

    autoencoder = AutoencoderKL.from_pretrained(vae).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            images = autoencoder.decode(latents / autoencoder.config.scaling_factor).sample
        return images.float().clamp(-1, 1)

    return decode


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def save_grid(rows: list[list[torch.Tensor]], row_names: list[str], path: Path, min_tile: int = 64) -> None:
    """PNG grid of uint8 [C, H, W] tiles, one row per class, labelled on the left."""
    _, h, w = rows[0][0].shape
    scale = max(1, min_tile // h)
    th, tw, pad = h * scale, w * scale, 2
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = int(max(draw.textlength(name) for name in row_names)) + 2 * pad
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (margin + cols * (tw + pad) + pad, len(rows) * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (name, tiles) in enumerate(zip(row_names, rows)):
        top = pad + i * (th + pad)
        draw.text((pad, top + th // 2), name, fill="black", anchor="lm")
        for j, tile in enumerate(tiles):
            image = Image.fromarray(tile.permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB")
            grid.paste(image.resize((tw, th), Image.NEAREST), (margin + pad + j * (tw + pad), top))
    grid.save(path)


def evaluate(
    checkpoint: str,
    use_ema: bool = True,
    num_samples: int = 10_000,
    per_class: int | None = None,
    scheduler: Literal["ddpm", "ddim", "dpm"] = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.5,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    vae: str | None = None,
    feature_network: Literal["fmnist", "inception"] = "fmnist",
    feature_weights: str | None = None,
    reference: str = "fashion-mnist/train",
    reference_size: int | None = None,
    data_root: str | None = None,
    cache_dir: str = str(DEFAULT_CACHE_DIR),
    class_names: list[str] | None = None,
    grid_classes: int = 10,
    grid_per_class: int = 10,
    out_dir: str = "out/evaluate",
    progress: bool = True,
) -> dict:
    """Sample, score and report; returns the report dict (also written to out_dir/report.json).

    Args:
        checkpoint: robuq `.ckpt`, or a diffusers DiT directory / hub id.
        use_ema: take the EMA weights of a `.ckpt`.
        num_samples: N, class-balanced (label of sample i is i mod num_classes).
        per_class: if set, N = per_class * num_classes (overrides num_samples).
        scheduler: "ddpm", "ddim" or "dpm" (DPM-Solver++); steps: sampling steps.
        cfg_scale: classifier-free guidance scale (1 = no guidance).
        seed: sample i depends only on (seed, i).
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        dtype: autocast dtype of the model and VAE: float32 (no autocast), bfloat16 or float16.
        vae: AutoencoderKL directory or hub id for latent models; None for pixel space.
        feature_network: "fmnist" or "inception"; feature_weights: its weights file.
        reference: real data, "fashion-mnist/train", "fashion-mnist/test" or an image folder.
        reference_size: real images used (a fixed random subset); None = all.
        data_root: Fashion-MNIST directory (default: robuq.data.fmnist.DEFAULT_ROOT).
        cache_dir: where real-data features are cached.
        class_names: grid row labels (default: Fashion-MNIST's names for a fashion-mnist
            reference, else class ids).
        grid_classes, grid_per_class: grid rows (first classes) and columns.
        out_dir: gets report.json and samples.png.
    """
    start = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, info = load_model(checkpoint, use_ema)
    model = model.to(device).eval().requires_grad_(False)
    num_classes, sample_shape, learned_sigma = model_shape(model)
    n = per_class * num_classes if per_class is not None else num_samples
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples; got num_samples={n}")
    labels = torch.arange(n) % num_classes
    decode = make_decoder(vae, device, DTYPES[dtype])
    net = load_feature_network(feature_network, feature_weights).to(device)

    sampling_start = time.time()
    grid_classes = min(grid_classes, num_classes)
    grid = [[] for _ in range(grid_classes)]
    features, logits, offset = [], [], 0
    sampler = dict(scheduler=scheduler, steps=steps, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size)
    for latents in iter_samples(model, labels, device=device, dtype=DTYPES[dtype], progress=progress, **sampler):
        images = decode(latents)
        batch_features, batch_logits = net.features_and_logits(images)
        features.append(batch_features.float().cpu())
        logits.append(batch_logits.float().cpu())
        for y, image in zip(labels[offset : offset + len(images)].tolist(), to_uint8(images)):
            if y < grid_classes and len(grid[y]) < grid_per_class:
                grid[y].append(image)
        offset += len(images)
    metrics_start = time.time()

    console.print(f"reference features of {reference} (cached in {cache_dir})")
    real = reference_features(
        net, reference, reference_size, cache_dir=cache_dir, data_root=data_root, image_size=images.shape[-1]
    )
    metrics = compute_metrics(real, torch.cat(features), torch.cat(logits), device=device)
    metrics_time = time.time() - metrics_start

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if class_names is None and reference.startswith("fashion-mnist/"):
        from robuq.data.fmnist import CLASS_NAMES

        class_names = list(CLASS_NAMES)
    names = list(class_names[:grid_classes]) if class_names else [str(c) for c in range(grid_classes)]
    save_grid(grid, names, out / "samples.png")
    report = dict(
        metrics=metrics,
        checkpoint=str(checkpoint),
        use_ema=use_ema,
        checkpoint_info=info,
        model=dict(
            parameters=sum(p.numel() for p in model.parameters()), num_classes=num_classes,
            sample_shape=list(sample_shape), learned_sigma=learned_sigma, vae=vae,
        ),
        sampler=sampler,
        num_samples=n,
        reference=dict(data=reference, num_images=len(real), feature_network=net.fingerprint),
        device=str(device),
        dtype=dtype,
        wall_time_s=dict(
            sampling=round(metrics_start - sampling_start, 2), metrics=round(metrics_time, 2),
            total=round(time.time() - start, 2),
        ),
        grid=str(out / "samples.png"),
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(args: list[str] | None = None) -> dict:
    from jsonargparse import auto_cli

    report = auto_cli(evaluate, args=args, as_positional=False)
    console.print_json(data=report["metrics"])
    console.print(f"report: {Path(report['grid']).with_name('report.json')}")
    return report


if __name__ == "__main__":
    main()
