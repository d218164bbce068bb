"""Diagnostic (GPU, run with CUDA_LAUNCH_BLOCKING=1): which fused-kernel configuration faults?

The first GPU run hit an illegal memory access in the fused QAT test without autocast (fp32
outputs / fp32 incoming gradients), while every bf16 configuration passed. This runs the kernels
directly, mildest first, synchronising after each case, so the last 'start' line printed before
a crash names the faulting one. Not collected by pytest (no test_ prefix)."""

import sys

import torch

from robuq.kernels.quant_ops import rotate_quantize, rotate_quantize_backward
from robuq.kernels.rotation import rotation_layout
from robuq.quant.hadamard import HadamardRotation

CASES = [  # (name, K, x dtype, out dtype or None, grad dtype or None)
    ("fwd x32 out bf16 K1152", 1152, torch.float32, torch.bfloat16, None),
    ("fwd x32 out bf16 K4608", 4608, torch.float32, torch.bfloat16, None),
    ("bwd x32 grad bf16 K1152", 1152, torch.float32, None, torch.bfloat16),
    ("bwd x32 grad bf16 K4608", 4608, torch.float32, None, torch.bfloat16),
    ("fwd x32 out fp32 K1152", 1152, torch.float32, torch.float32, None),
    ("fwd x32 out fp32 K4608", 4608, torch.float32, torch.float32, None),
    ("bwd x32 grad fp32 K1152", 1152, torch.float32, None, torch.float32),
    ("bwd x32 grad fp32 K4608", 4608, torch.float32, None, torch.float32),
]


def main():
    only = sys.argv[1:]
    for name, k, xdt, odt, gdt in CASES:
        if only and name not in only:
            continue
        print(f"start {name}", flush=True)
        rot = HadamardRotation(k).cuda()
        lay = rotation_layout(k, "kronecker", None)
        x = torch.randn(256, k, device="cuda", dtype=xdt)
        alpha = torch.tensor([[0.9]], device="cuda")
        if odt is not None:
            r = rotate_quantize(x, rot.signs, lay, alpha, 2, True, 1, want_i8=True, out="scaled", out_dtype=odt)
            torch.cuda.synchronize()
            ok = torch.equal(r["out"][0].float(), (r["i8"][0].float() * r["s"][0][:, None]).to(odt).float())
        else:
            g = torch.randn(256, k, device="cuda", dtype=gdt)
            dx, ga = rotate_quantize_backward(x, g, rot.signs, lay, alpha.reshape(1), 2, True, 1)
            torch.cuda.synchronize()
            ok = bool(torch.isfinite(dx).all() and torch.isfinite(ga).all())
        print(f"done  {name}: {'ok' if ok else 'WRONG VALUES'}", flush=True)
    print("all cases ran")


if __name__ == "__main__":
    main()
