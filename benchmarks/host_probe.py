"""Host time of the fused QAT path without a GPU: a narrow 28-block DiT (hidden 192, 4 tokens per
sample, fp32) whose compute is negligible, fwd + bwd, with the Triton kernels replaced by no-ops.
What is left is the Python and torch-op dispatch around the kernels (not their launches), against
the plain model's on the same CPU.

    TRITON_INTERPRET=1 python benchmarks/host_probe.py [--blocks 28] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (the fused path serves CPU tensors only under the interpreter)")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import robuq.kernels.ternary as ternary  # noqa: E402
import robuq.kernels.triton_quant as tq  # noqa: E402
from robuq.kernels.qat import use_fused_kernels  # noqa: E402
from robuq.models import disable_label_dropout  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402


class NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def build(blocks: int, fused: bool):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=4, out_channels=8,
                                  num_layers=blocks, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    disable_label_dropout(model)
    batch = torch.randn(2, 4, 4, 4), torch.tensor([10, 700]), torch.tensor([1, 3])
    if fused:
        quantize_(model, QuantConfig(act_bits=2))
        model(batch[0], timestep=batch[1], class_labels=batch[2])  # initialise the LSQ steps
        use_fused_kernels(model)
    return model, batch


def step(model, batch):
    x, t, y = batch
    model(x, timestep=t, class_labels=y).sample.sum().backward()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=28)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="cProfile the fused steps (top 25 by own time)")
    args = ap.parse_args()
    tq.rotq_fwd_kernel = tq.rotq_bwd_kernel = ternary.ternary_rows_kernel = NoLaunch()
    times = {}
    for name in ("plain", "fused"):
        model, batch = build(args.blocks, name == "fused")
        for _ in range(3):
            step(model, batch)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(model, batch)
        times[name] = (time.perf_counter() - t0) / args.steps * 1e3
        print(f"{name}: {times[name]:.1f} ms per fwd + bwd ({args.blocks} blocks, host only)", flush=True)
    print(f"fused - plain: {times['fused'] - times['plain']:.1f} ms per step of Python and torch-op dispatch")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [step(model, batch) for _ in range(args.steps)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
