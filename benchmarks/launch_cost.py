"""Host time per call of the fused QAT path's pieces on a GPU, where the eager step is host-bound
(docs/PERFORMANCE.md section 3.3): every call does tiny work, so the wall time of many
back-to-back calls is the host's time to issue them.

    python benchmarks/launch_cost.py [--calls 300] [--profile]

Rows: one ATen op (the unit), a bf16 linear, a bare Triton launch of each rotate+quantize kernel
(the arguments a real call passed), the host wrappers around them, one fused q/k/v group forward
and forward + backward, and the whole 28-block DiT-XL/2 (4 tokens per sample) fwd + bwd, plain
bf16 against the fused student: the eager step's host cost per step. ``--profile`` adds the fused
model's cProfile (top 30 by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import robuq.kernels.triton_quant as tq  # noqa: E402
from robuq.kernels.qat import fused_linears, use_fused_kernels  # noqa: E402
from robuq.models import DIT_XL_2_256, disable_label_dropout  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402

DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def host_us(fn, calls: int) -> float:
    """Wall time per call (us) of ``calls`` back-to-back calls after a warm-up, GPU drained at both ends."""
    for _ in range(5):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


class Recorder:
    """Wraps a Triton kernel: records the grid and arguments of its launches, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def build(blocks: int, fused: bool, tokens_side: int = 4):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(DIT_XL_2_256, num_layers=blocks, sample_size=tokens_side)
    with torch.device(DEV):
        model = DiTTransformer2DModel(**cfg)
    disable_label_dropout(model)
    g = torch.Generator(device=DEV).manual_seed(0)
    batch = (torch.randn(2, 4, tokens_side, tokens_side, device=DEV, generator=g),
             torch.tensor([10, 700], device=DEV), torch.tensor([1, 3], device=DEV))
    if fused:
        quantize_(model, QuantConfig(act_bits=2))
        with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
            model(batch[0], timestep=batch[1], class_labels=batch[2])  # initialise the LSQ steps
        use_fused_kernels(model)
    return model.train(), batch


def model_step(model, batch):
    x, t, y = batch
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = model(x, timestep=t, class_labels=y).sample
    out.float().sum().backward()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=28)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (no timings to read)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    n = args.calls
    rows = []

    a = torch.randn(64, device=DEV)
    rows.append(("torch.add, 64 elements (one ATen op)", host_us(lambda: torch.add(a, a), n)))
    xb = torch.randn(8, 1152, device=DEV, dtype=torch.bfloat16)
    wb = torch.randn(1152, 1152, device=DEV, dtype=torch.bfloat16)
    rows.append(("F.linear bf16 8x1152x1152", host_us(lambda: F.linear(xb, wb), n)))

    # one DiT block's q/k/v group with its adaLN, 8 tokens per sample, 2 samples
    model, batch = build(1, True)
    block = model.transformer_blocks[0]
    attn = block.attn1
    layers = [attn.to_q, attn.to_k, attn.to_v]
    x = torch.randn(2, 8, 1152, device=DEV)
    scale = torch.randn(2, 1152, device=DEV) * 0.1
    shift = torch.randn(2, 1152, device=DEV) * 0.1
    norm = (scale, shift, 1e-6)

    rec_f, rec_b = Recorder(tq.rotq_fwd_kernel), Recorder(tq.rotq_bwd_kernel)
    tq.rotq_fwd_kernel, tq.rotq_bwd_kernel = rec_f, rec_b
    try:
        xr = x.clone().requires_grad_()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            ys = fused_linears(layers, xr, norm=norm)
        sum(y.float().sum() for y in ys).backward()
    finally:
        tq.rotq_fwd_kernel, tq.rotq_bwd_kernel = rec_f.kernel, rec_b.kernel
    for name, rec in (("forward", rec_f), ("backward", rec_b)):
        grid, kargs, kw = rec.calls[-1]
        kern = rec.kernel
        rows.append((f"bare Triton launch, rotate+quantize {name} (q/k/v + adaLN; {len(kargs)} args, "
                     f"{len(kw)} keywords)", host_us(lambda: kern[grid](*kargs, **kw), n)))

    def qkv_forward():
        with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
            fused_linears(layers, x, norm=norm)

    def qkv_step():
        xr = x.clone().requires_grad_()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            ys = fused_linears(layers, xr, norm=norm)
        torch.autograd.backward([y for y in ys], [torch.ones_like(y) for y in ys])

    rows.append(("fused_linears q/k/v + adaLN forward (no grad)", host_us(qkv_forward, n)))
    rows.append(("fused_linears q/k/v + adaLN forward + backward", host_us(qkv_step, n)))
    model = None

    steps = max(5, n // 30)
    for name in ("plain", "fused"):
        model, batch = build(args.blocks, name == "fused")
        rows.append((f"DiT-XL/2 {args.blocks} blocks, 2 x 4 tokens, fwd + bwd: {name}",
                     host_us(lambda: model_step(model, batch), steps)))
        model.zero_grad(set_to_none=True)

    print(f"GPU: {torch.cuda.get_device_name() if DEV == 'cuda' else DEV} | torch {torch.__version__} | host time per call (us)")
    print("| call | host us per call |")
    print("|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    sys.stdout.flush()
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [model_step(model, batch) for _ in range(steps)] and sync())
        print(f"\ncProfile of {steps} fused DiT-XL/2 steps (top 30 by own time)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
