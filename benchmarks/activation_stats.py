"""The paper's distribution claim, measured on our real activations: for every quantized layer of
the Fashion-MNIST teacher, per-token excess kurtosis and a normality statistic (Kolmogorov-Smirnov
distance of the standardised token to N(0, 1)) of its inputs, before and after the RobustQuantizer's
Hadamard rotation.

    python benchmarks/activation_stats.py --out docs/assets/activation_stats
    python benchmarks/activation_stats.py --rotation block --block_size 64 --out docs/assets/activation_stats_block64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from robuq.data.fmnist import load_fashion_mnist, to_latent
from robuq.diffusion import Schedule
from robuq.models import load_dit
from robuq.quant import QuantConfig, quant_layers, quantize_


def token_stats(x: torch.Tensor) -> tuple[float, float]:
    """Mean over tokens of (excess kurtosis, KS distance to N(0,1)) of each standardised token."""
    x = x.reshape(-1, x.shape[-1]).double()
    z = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-12)
    kurt = (z**4).mean(-1) - 3
    n = z.shape[-1]
    s = z.sort(-1).values
    phi = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((grid - phi).abs(), (phi - (grid - 1 / n)).abs()).amax(-1)
    return kurt.mean().item(), ks.mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="checkpoints/fmnist_dit_teacher")
    p.add_argument("--data_root", default=None)
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--rotation", default="kronecker", choices=["kronecker", "block", "none"])
    p.add_argument("--block_size", type=int, default=None,
                   help="rotation=block: block size (64 = one head of the Fashion-MNIST teacher)")
    p.add_argument("--out", default="docs/assets/activation_stats")
    args = p.parse_args()

    teacher = load_dit(args.teacher).eval()
    model = copy.deepcopy(teacher)  # rotations only: activations and weights left in full precision
    quantize_(model, QuantConfig(act_bits=16, weight="none", rotation=args.rotation, block_size=args.block_size))
    images, labels = load_fashion_mnist(*([args.data_root] if args.data_root else []), split="test")
    g = torch.Generator().manual_seed(0)
    x0 = to_latent(images[: args.batch])
    t = torch.linspace(0, 999, args.batch).long()  # every timestep range
    xt = Schedule().q_sample(x0, t, torch.randn(x0.shape, generator=g))

    stats = {}
    hooks = []
    for name, layer in quant_layers(model).items():
        def hook(mod, inp, name=name):
            x = inp[0].detach()
            stats[name] = dict(zip(["kurtosis_before", "ks_before"], token_stats(x))) | dict(
                zip(["kurtosis_after", "ks_after"], token_stats(mod.act.rotate(x))))
        hooks.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(xt, timestep=t, class_labels=labels[: args.batch])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(stats, indent=1))
    plot(stats, out.with_suffix(".png"))
    kinds = {}
    for name, s in stats.items():
        kind = ".".join(name.split(".")[2:])
        kinds.setdefault(kind, []).append(s)
    print(f"{'layer kind':22s} {'kurtosis before':>16s} {'after':>8s} {'KS before':>10s} {'after':>8s}")
    for kind, rows in kinds.items():
        m = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(f"{kind:22s} {m['kurtosis_before']:16.2f} {m['kurtosis_after']:8.2f} {m['ks_before']:10.3f} {m['ks_after']:8.3f}")


def plot(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    short = [n.replace("transformer_blocks.", "b").replace("attn1.", "").replace("ff.net.", "ff") for n in names]
    x = range(len(names))
    fig, axes = plt.subplots(2, 1, figsize=(max(10, len(names) * 0.28), 7), sharex=True)
    for ax, key, label in [(axes[0], "kurtosis", "per-token excess kurtosis"), (axes[1], "ks", "per-token KS distance to N(0,1)")]:
        ax.bar([i - 0.2 for i in x], [stats[n][f"{key}_before"] for n in names], 0.4, label="before rotation")
        ax.bar([i + 0.2 for i in x], [stats[n][f"{key}_after"] for n in names], 0.4, label="after Hadamard rotation")
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_yscale("symlog")
    axes[1].set_xticks(list(x), short, rotation=90, fontsize=7)
    fig.suptitle("Inputs of the quantized linears of the Fashion-MNIST teacher (40 test images, t over [0, 999])")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
