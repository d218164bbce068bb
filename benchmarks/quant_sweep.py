"""Launch settings of the fused rotate+quantize kernels at DiT-XL/2 sizes (8192 tokens, K = 1152
and 4608): warps per program, persistent programs per SM, the factors reloaded per token or kept
in registers, exact (hi/lo) or fast rotation. GPU time per call from CUDA graphs, against the
bytes floor (read x bf16, write e4m3 codes; backward: read x and dy, write dx) at the copy rate.

    python benchmarks/quant_sweep.py [--json out.json] [--reload]
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import gbench  # noqa: E402
from robuq.kernels import quant_ops  # noqa: E402
from robuq.kernels.quant_ops import rotate_quantize, rotate_quantize_backward  # noqa: E402
from robuq.kernels.rotation import rotation_layout  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", default=None)
    ap.add_argument("--reload", action="store_true", help="also try reloading the factors per token")
    ap.add_argument("--dims", type=int, nargs="+", default=[1152, 4608])
    args = ap.parse_args()
    m = args.tokens
    x = torch.empty(m, 8192, device="cuda", dtype=torch.bfloat16)
    y = x.clone()
    copy = gbench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 2 / (copy * 1e-3)  # bytes/s, read + write
    print(f"GPU {torch.cuda.get_device_name()} | copy {bw / 1e12:.2f} TB/s")
    rows = []
    for k in args.dims:
        lay = rotation_layout(k, "kronecker", None)
        tile = lay.MP * lay.P
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        signs = torch.ones(k, device="cuda")
        alpha = torch.full((1, 1), 0.5, device="cuda")
        floor_f, floor_b = (m * k * 3) / bw * 1e6, (m * k * 6) / bw * 1e6  # us
        for warps, per_sm, reload, split in itertools.product(
                (4, 8, 16), (1, 2, 4, 8), (False, True) if args.reload else (False,), (True, False)):
            quant_ops.NUM_WARPS[tile], quant_ops.PROGRAMS_PER_SM = warps, per_sm
            quant_ops.RELOAD_ABOVE.update(forward=0 if reload else 1 << 30, backward=0 if reload else 1 << 30)
            try:
                fwd = gbench(lambda: rotate_quantize(x, signs, lay, alpha, 2, True, 1, want_f8=True, split=split)) * 1e3
                bwd = gbench(lambda: rotate_quantize_backward(x, dy, signs, lay, alpha.reshape(1), 2, True, 1,
                                                              split=split)) * 1e3
            except Exception as e:  # a setting the compiler rejects (e.g. out of shared memory / registers)
                print(f"K={k} warps={warps} per_sm={per_sm} reload={reload} split={split}: "
                      f"{type(e).__name__}")
                continue
            rows.append(dict(K=k, warps=warps, programs_per_sm=per_sm, reload=reload, split=split,
                             fwd_us=round(fwd, 1), bwd_us=round(bwd, 1), fwd_floor_us=round(floor_f, 1),
                             bwd_floor_us=round(floor_b, 1)))
            print(json.dumps(rows[-1]), flush=True)
    quant_ops.NUM_WARPS.clear()
    for k in args.dims:
        for split in (True, False):
            sub = [r for r in rows if r["K"] == k and r["split"] == split]
            if sub:
                bf = min(sub, key=lambda r: r["fwd_us"])
                bb = min(sub, key=lambda r: r["bwd_us"])
                print(f"best K={k} split={split}: fwd {bf['fwd_us']} us (floor {bf['fwd_floor_us']}) with "
                      f"warps={bf['warps']} per_sm={bf['programs_per_sm']} reload={bf['reload']}; "
                      f"bwd {bb['bwd_us']} us (floor {bb['bwd_floor_us']}) with warps={bb['warps']} "
                      f"per_sm={bb['programs_per_sm']} reload={bb['reload']}")
    if args.json:
        json.dump(dict(copy_tb_s=bw / 1e12, rows=rows), open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
