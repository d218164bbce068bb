"""Building and loading DiTs (diffusers ``DiTTransformer2DModel``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from safetensors import safe_open
from torch import nn


# DiT-XL/2 at 256 px (``facebook/DiT-XL-2-256``'s transformer): hidden 1152 = 16 heads x 72, 28 blocks,
# 32x32x4 latents in patches of 2, learned sigma (8 output channels), 1000 classes.
DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def build_dit(config: dict) -> DiTTransformer2DModel:
    """A randomly initialised DiT from diffusers config kwargs (e.g. DiT-XL/2: 16 heads x 72, 28 layers)."""
    try:
        return DiTTransformer2DModel(**config)
    except TypeError as e:
        raise ValueError(f"bad DiT config {config}: {e}") from None


def check_safetensors(path: str | Path) -> None:
    """Read a safetensors file's header; a truncated or corrupt file is a ValueError naming it."""
    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"weights file {path} is truncated or corrupt ({e}); re-download or copy it again, "
                         "or re-export it from its training checkpoint (python -m robuq.models --ckpt CKPT "
                         "--out DIR)") from e


def load_dit(source: str, subfolder: str | None = None) -> DiTTransformer2DModel:
    """A pretrained DiT from a diffusers directory or hub id (e.g. ``facebook/DiT-XL-2-256``,
    ``subfolder="transformer"``; offline from the user's HF cache) or a robuq ``.ckpt``."""
    if source.endswith(".ckpt"):
        from .module import load_for_eval

        model, _ = load_for_eval(source, use_ema=True)
        return model
    path = Path(source)
    if path.is_dir() and subfolder is None and (path / "transformer" / "config.json").exists():
        subfolder = "transformer"  # a whole diffusers pipeline directory
    try:
        model, info = DiTTransformer2DModel.from_pretrained(
            source, subfolder=subfolder, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        if path.is_dir():  # diffusers names the file but not what is wrong with it
            for weights in sorted((path / (subfolder or "")).glob("*.safetensors")):
                check_safetensors(weights)
        raise FileNotFoundError(
            f"cannot load a DiT from {source!r}: {e}\n"
            "Give a local diffusers directory (config.json + diffusion_pytorch_model.safetensors), "
            "a robuq .ckpt, or a hub id already in your Hugging Face cache (set HF_HUB_OFFLINE=1 offline)."
        ) from None
    missing = info.get("missing_keys") or []
    if missing:
        raise ValueError(f"DiT weights in {source!r} are missing {len(missing)} tensors its config needs "
                         f"(e.g. {missing[0]}): the weights file does not belong to this config.json")
    return model


def dit_config(model: nn.Module) -> dict:
    """The model's constructor kwargs as a plain dict (for checkpoints)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def check_same_architecture(expected: dict, got: dict, what: str) -> None:
    diff = {k: (expected[k], got.get(k)) for k in expected if got.get(k) != expected[k]}
    if diff:
        lines = ", ".join(f"{k}: expected {a!r}, got {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{what} does not match the model config ({lines})")


def num_classes(model: nn.Module) -> int:
    return int(model.config.num_embeds_ada_norm)


def learns_sigma(model: nn.Module) -> bool:
    """DiT predicts the variance too when it has twice the input channels."""
    return model.config.out_channels == 2 * model.config.in_channels


def disable_label_dropout(model: nn.Module) -> None:
    """We drop labels ourselves (the same ones for student and teacher); keep the null-class row."""
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            if m.embedding_table.num_embeddings <= m.num_classes:
                raise ValueError("this DiT has no null-class embedding, so it cannot use classifier-free guidance")
            m.dropout_prob = 0.0


def dit_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, timestep=t, class_labels=y).sample


def modulate(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    """DiT's adaLN as diffusers computes it: ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]``
    (no affine) for x [B, T, K], ``norm = (scale [B, K], shift [B, K], eps)``."""
    scale, shift, eps = norm
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def native_dtype(model: nn.Module) -> torch.dtype | None:
    """The half-precision dtype (bf16/fp16) every parameter of ``model`` is stored in, else None."""
    dtypes = {p.dtype for p in model.parameters()}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} else None


def frozen_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``dit_forward`` of a frozen model in its own dtype: a model stored in bf16/fp16 runs natively,
    autocast off, on x cast to that dtype (as diffusers' pipelines run one; autocast would put its
    LayerNorms and the modulation after them in fp32, docs/PERFORMANCE.md section 3); any other
    model runs under the caller's autocast."""
    dtype = native_dtype(model)
    if dtype is None:
        return dit_forward(model, x, t, y)
    with torch.autocast(x.device.type, enabled=False):
        return dit_forward(model, x.to(dtype), t, y)


def save_pretrained_from_ckpt(ckpt: str, out_dir: str, dtype: str = "float16", use_ema: bool = True) -> None:
    """Write a robuq checkpoint's (EMA) model as a diffusers directory of safetensors."""
    from .module import load_for_eval

    model, info = load_for_eval(ckpt, use_ema=use_ema)
    if info["task"] != "pretrain":
        raise ValueError(f"{ckpt} holds a quantized student: export it with robuq.deploy instead")
    model.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    print(f"wrote {out_dir} ({info['weights']} weights, step {info['global_step']}, {dtype})")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Export a robuq checkpoint's model as a diffusers directory.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    a = p.parse_args()
    save_pretrained_from_ckpt(a.ckpt, a.out, a.dtype, use_ema=not a.raw)
