"""Diagnose the fused rotate+quantize backward kernel on a GPU: finite, deterministic, and equal to a
float64 torch reference? One process per setting (CUDA_LAUNCH_BLOCKING=1: a fault poisons its process).

    python benchmarks/bwd_diag.py [--dims 1152 4608] [--stages 0 1] [--per_sm 1 8] [--ms 256 8192] [--dtype bf16 fp32]
    python benchmarks/bwd_diag.py one K STAGES PROGRAMS_PER_SM M DTYPE    # one setting (STAGES 0: the compiler default)
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robuq.kernels import quant_ops  # noqa: E402
from robuq.kernels.quant_ops import rotate_quantize_backward  # noqa: E402
from robuq.kernels.rotation import reference_rms_backward, rotation_layout  # noqa: E402


def one(k, stages, per_sm, m, dtype="bf16"):
    quant_ops.NUM_STAGES["backward"] = stages or None
    quant_ops.PROGRAMS_PER_SM = per_sm
    quant_ops.PROGRAMS_PER_SM_BY_TILE.clear()
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    dy = torch.randn_like(x)
    signs = torch.where(torch.rand(k, device="cuda") < 0.5, -1.0, 1.0)
    lay = rotation_layout(k, "kronecker", None)
    alpha = torch.full((1,), 0.5, device="cuda")
    runs = [rotate_quantize_backward(x, dy, signs, lay, alpha, 2, True, 1) for _ in range(2)]
    torch.cuda.synchronize()
    dx, ga = runs[0]
    rdx, rga = reference_rms_backward(x, dy, signs, k, 0.5, eps=quant_ops.EPS)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    return dict(K=k, dtype=dtype, stages=stages, per_sm=per_sm, M=m, finite=bool(torch.isfinite(dx).all() and torch.isfinite(ga).all()),
                deterministic=bool(torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])),
                dx_rel_err=rel(dx, rdx), ga_rel_err=rel(ga, rga))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "one":
        print(json.dumps(one(*map(int, sys.argv[2:6]), sys.argv[6])))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__)
    for name, default in (("dims", [1152, 4608]), ("stages", [0, 1]), ("per_sm", [1, 8]), ("ms", [256, 8192])):
        ap.add_argument(f"--{name}", type=int, nargs="+", default=default)
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    args = ap.parse_args()
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for k, stages, per_sm, m, dt in itertools.product(args.dims, args.stages, args.per_sm, args.ms, args.dtype):
        p = subprocess.run([sys.executable, __file__, "one", str(k), str(stages), str(per_sm), str(m), dt], env=env,
                           capture_output=True, text=True, timeout=120)
        line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else \
            json.dumps(dict(K=k, dtype=dt, stages=stages, per_sm=per_sm, M=m, error=(p.stderr.strip().splitlines() or ["?"])[-1][:200]))
        print(line, flush=True)
