"""Export a QAT student (a diffusers DiT quantized by ``robuq.quant.quantize_``) for inference.

``export(student, out_dir)`` writes
  * ``model.safetensors``: for each quantized layer ``<name>.packed`` (uint8, 2-bit ternary codes,
    ``robuq.deploy.pack`` layout), ``<name>.w_scale`` (fp32 per output channel), ``<name>.alpha``
    (fp32 LSQ step(s): |step| clamped as the student uses it), ``<name>.signs`` (fp32 rotation
    signs), ``<name>.bias``; every other tensor of the model (the full-precision layers) as is
    (or cast to ``dtype``);
  * ``robuq_export.json``: format version, packing layout, the DiT class and constructor config,
    per quantized layer its shape, activation bits/signedness/mode/statistic/timestep groups
    and rotation, ``exact_rotation`` (False: the student trained with the fused kernels'
    one-rounding rotation, which the exported model then computes too), and ``aliases``:
    full-precision tensors stored once because another tensor has the same values (diffusers' DiT keeps a copy of the timestep and class embedders in each of
    its 28 blocks; converted DiT-XL/2 weights make them identical). ``load_exported`` ties each
    alias to its original, so they share memory on the device too.

``load_exported(dir)`` rebuilds the DiT with ``PackedTernaryLinear`` in place of each
``QuantLinear``; on CPU it computes the student's integers in pure torch, on CUDA it uses the
fused Triton quantizer and fp8 GEMMs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .modules import PackedTernaryLinear, pack_model, fuse_launches
from .pack import PACK_LAYOUT

FORMAT = "robuq-packed-v1"
CONFIG_NAME = "robuq_export.json"
WEIGHTS_NAME = "model.safetensors"
ALIAS_MIN_NUMEL = 1024  # smaller identical tensors (biases, norms) are stored as they are
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dit_config(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("export needs a diffusers model (with a .config) so that it can be rebuilt")
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


def _layer_meta(m: PackedTernaryLinear) -> dict:
    return {
        "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
        "bits": m.bits, "signed": m.signed, "mode": m.mode, "stat": m.stat, "groups": m.groups,
        "rotation": m.rotation, "block_size": m.block_size,
    }


@torch.no_grad()
def export(student: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None,
           exact_rotation: bool | None = None) -> Path:
    """Write the packed inference form of ``student`` to ``out_dir`` (the student is not changed).

    ``dtype`` (e.g. torch.bfloat16) casts the full-precision tensors; packed codes and all scales
    are stored exactly (uint8 / float32) whatever it is. ``exact_rotation``: the rotation the
    student's codes were trained with, recorded for ``load_exported``; None: that of its layers
    (False where ``robuq.kernels.qat.use_fused_kernels(exact_rotation=False)`` switched them).
    """
    import copy

    from robuq.quant.linear import QuantLinear

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, m in student.named_modules() if isinstance(m, QuantLinear)]
    if not names:
        raise ValueError("export: the model has no QuantLinear layers (quantize it with robuq.quant.quantize_)")
    if exact_rotation is not None and not isinstance(exact_rotation, bool):
        raise TypeError(f"exact_rotation must be True, False or None, got {exact_rotation!r}")
    packed = pack_model(copy.deepcopy(student))
    if exact_rotation is None:
        exact_rotation = all(packed.get_submodule(n).split for n in names)
    layers = {n: _layer_meta(packed.get_submodule(n)) for n in names}
    tensors, aliases, seen = {}, {}, {}
    for k, v in packed.state_dict().items():
        v = v.detach()
        owner = k.rpartition(".")[0]
        if owner not in layers and dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.cpu().contiguous().clone()
        if owner not in layers and v.numel() >= ALIAS_MIN_NUMEL:
            key = (str(v.dtype), tuple(v.shape), hashlib.sha256(v.view(torch.uint8).numpy().tobytes()).hexdigest())
            first = seen.setdefault(key, k)
            if first != k and torch.equal(tensors[first], v):
                aliases[k] = first
                continue
        tensors[k] = v
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    groups = max((meta["groups"] for meta in layers.values()), default=1)
    config = {
        "format": FORMAT,
        "pack_layout": PACK_LAYOUT,
        "model_class": type(student).__name__,
        "model_module": type(student).__module__,
        "model_config": _dit_config(student),
        "timestep_groups": groups,
        "exact_rotation": exact_rotation,
        "layers": layers,
        "aliases": aliases,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return out


def _model_class(config: dict):
    import importlib

    module = importlib.import_module(config.get("model_module", "diffusers"))
    return getattr(module, config["model_class"])


@torch.no_grad()
def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  exact_rotation: bool | None = None) -> nn.Module:
    """Rebuild the exported DiT with ``PackedTernaryLinear`` layers (eval mode).

    ``dtype`` casts the full-precision layers (e.g. torch.bfloat16 for CUDA inference); packed
    layers keep their scales in float32 and compute in the dtype of their input.
    ``exact_rotation=False`` lets the CUDA kernels round once to bf16 between the two rotation
    products instead of the exact hi/lo split: on an H100 (DiT-XL/2, batch 32) the forward is 4.5%
    faster, ~0.1% of A2 codes differ from the exact rotation's, and the outputs agree with the
    fp32 fake-quant student as closely as before (docs/PERFORMANCE.md, P37). None (the default):
    the rotation the student was trained with, as the export records it (exact unless recorded).
    """
    if exact_rotation is not None and not isinstance(exact_rotation, bool):
        raise TypeError(f"exact_rotation must be True, False or None, got {exact_rotation!r}")
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a robuq export (no {CONFIG_NAME}); make one with robuq.deploy.export")
    config = json.loads(cfg_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: unknown format {config.get('format')!r} (expected {FORMAT!r})")
    if config.get("pack_layout") != PACK_LAYOUT:
        raise ValueError(f"{cfg_file}: unknown packing layout {config.get('pack_layout')!r} (expected {PACK_LAYOUT!r})")
    if exact_rotation is None:
        exact_rotation = config.get("exact_rotation", True)
        if not isinstance(exact_rotation, bool):
            raise ValueError(f"{cfg_file}: exact_rotation must be true or false, got {exact_rotation!r}; "
                             "the export is damaged: export it again")
    cls = _model_class(config)
    with torch.device(device):
        model = cls(**config["model_config"])
        for name, meta in config["layers"].items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, PackedTernaryLinear(**meta))
    state = load_file(str(path / WEIGHTS_NAME), device=str(device))
    aliases = config.get("aliases", {})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    known = set(model.state_dict())
    bad = {k: v for k, v in aliases.items() if k not in known or v not in state}
    if bad:
        raise ValueError(f"{cfg_file}: aliases {dict(list(bad.items())[:3])} name tensors the model or {WEIGHTS_NAME} "
                         "lacks; the export is damaged: export it again")
    if dtype is not None:
        for m in model.modules():
            if not isinstance(m, PackedTernaryLinear):
                m._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    for name, original in aliases.items():
        _tie(model, name, original)
    if config.get("timestep_groups", 1) > 1:
        from robuq.quant.convert import _set_groups_from_timestep

        _set_groups_from_timestep(model, int(config["timestep_groups"]))
    for m in model.modules():
        if isinstance(m, PackedTernaryLinear):
            m.split = exact_rotation
    fuse_launches(model)
    return model.eval()


def _tie(model: nn.Module, name: str, original: str) -> None:
    """Make parameter/buffer ``name`` the very tensor ``original`` (one copy in memory)."""
    owner, _, leaf = name.rpartition(".")
    src_owner, _, src_leaf = original.rpartition(".")
    module, src = model.get_submodule(owner), model.get_submodule(src_owner)
    if src_leaf in src._parameters:
        setattr(module, leaf, src._parameters[src_leaf])
    else:
        module._buffers[leaf] = src._buffers[src_leaf]


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters + persistent buffers (tied tensors counted once): packed layers vs the rest."""
    packed = other = 0
    counted = set()
    for m in model.modules():
        n = 0
        for t in [*m.parameters(recurse=False), *(b for b in m.buffers(recurse=False) if b is not None)]:
            if t.data_ptr() not in counted:
                counted.add(t.data_ptr())
                n += t.numel() * t.element_size()
        if isinstance(m, PackedTernaryLinear):
            packed += n
        else:
            other += n
    return {"packed_layers": packed, "other": other, "total": packed + other}


def main(argv: list[str] | None = None) -> Path:
    """``python -m robuq.deploy.export --checkpoint runs/x/checkpoints/last.ckpt --out exported/x``"""
    import argparse

    from robuq.module import load_for_eval

    p = argparse.ArgumentParser(description="Export a robuq QAT checkpoint as a packed inference model directory.")
    p.add_argument("--checkpoint", required=True, help="a robuq QAT .ckpt")
    p.add_argument("--out", required=True)
    p.add_argument("--raw", action="store_true", help="export the raw student instead of its EMA")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast the full-precision layers (packed codes and scales stay exact)")
    args = p.parse_args(argv)
    model, info = load_for_eval(args.checkpoint, use_ema=not args.raw)
    if info["task"] != "qat":
        raise SystemExit(f"{args.checkpoint} is a full-precision ({info['task']}) checkpoint: nothing to pack")
    out = export(model, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                 exact_rotation=info["exact_rotation"])
    print(f"exported {info['weights']} weights of {args.checkpoint} (step {info['global_step']}) to {out}")
    return out


if __name__ == "__main__":
    main()
