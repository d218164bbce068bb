"""Launch settings of the fused rotate+quantize kernels at DiT-XL/2 sizes (8192 tokens, K = 1152
and 4608): warps per program, persistent programs per SM, the factors reloaded per token or kept
in registers, exact (hi/lo) or fast rotation. GPU time per call from CUDA graphs, against the
bytes floor (read x bf16, write e4m3 codes; backward: read x and dy, write dx) at the copy rate.

    python benchmarks/quant_sweep.py [--json out.json] [--reload] [--x16] [--warps 4] [--per_sm 2 8]

--x16 also times the fp32 token tile (quant_ops.X16_TILES off) against the default bf16 tile;
--grad_split the exact gradient rotation (quant_ops.GRAD_SPLIT) against the bf16 one.
--kinds block none also times the block-diagonal H_128 rotation and no rotation at all, which says
how much of a kernel's time the rotation products take (at K = 4608 all three use the same tile).
--rint 0 1 times the codes rounded by floor and a tie fix-up (0) against one cvt.rni (1, the default).
--unroll 0 2 unrolls the per-token loop by 2 (two tokens' chains interleaved) against the compiler's
choice (0).
--qat_launches times instead the four launches of a DiT-XL/2 block's QAT step as the fused path
makes them (q/k/v: three quantizers and the adaLN in front; out; fc1: the adaLN; fc2), forward
(e4m3 codes) and backward (with the weight gradient's input), at the shipped settings; with
--launch_sweep also at every --per_sm x --stages x --maxnreg setting (--only qkv fc1: those launches).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

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
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--per_sm", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--x16", action="store_true", help="also time the fp32 token tile (X16_TILES off)")
    ap.add_argument("--grad_split", action="store_true", help="also time the exact (hi/lo) gradient rotation")
    ap.add_argument("--stages", type=int, nargs="+", default=[1],
                    help="software-pipelining depth of the token loop (quant_ops.NUM_STAGES, both directions)")
    ap.add_argument("--kinds", nargs="+", default=["kronecker"], choices=["kronecker", "block", "none"],
                    help="rotation of the token (block: block-diagonal H_128)")
    ap.add_argument("--rint", nargs="+", type=int, default=[1], choices=[0, 1],
                    help="round with libdevice rint (1, quant_ops.RINT_ROUNDING) or floor and a tie fix-up (0)")
    ap.add_argument("--unroll", nargs="+", type=int, default=[0],
                    help="unroll factor of the per-token loop (quant_ops.LOOP_UNROLL; 0: the compiler's choice)")
    ap.add_argument("--qat_launches", action="store_true", help="time a DiT block's four QAT launches instead")
    ap.add_argument("--launch_sweep", action="store_true",
                    help="with --qat_launches: also every --per_sm x --stages x --maxnreg setting (both directions)")
    ap.add_argument("--maxnreg", type=int, nargs="+", default=[0],
                    help="with --launch_sweep: register caps per thread (quant_ops.MAX_REGISTERS; 0: none)")
    ap.add_argument("--only", nargs="+", default=None, choices=[launch_key(n) for n, *_ in QAT_LAUNCHES],
                    help="with --launch_sweep: sweep only these launches")
    args = ap.parse_args()
    m = args.tokens
    x = torch.empty(m, 8192, device="cuda", dtype=torch.bfloat16)
    y = x.clone()
    copy = gbench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 2 / (copy * 1e-3)  # bytes/s, read + write
    print(f"GPU {torch.cuda.get_device_name()} | copy {bw / 1e12:.2f} TB/s")
    if args.qat_launches:
        return qat_launches(m, bw, args.json, settings=args.launch_sweep and (args.per_sm, args.stages, args.maxnreg, args.only))
    rows = []
    quant_ops.PROGRAMS_PER_SM_BY_TILE.clear()  # the sweep sets PROGRAMS_PER_SM and LOOP_UNROLL for every tile
    quant_ops.LOOP_UNROLL_BY_TILE.clear()
    for k, kind in itertools.product(args.dims, args.kinds):
        lay = rotation_layout(k, kind, 128 if kind == "block" else None)
        tile = lay.MP * lay.P
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        signs = torch.ones(k, device="cuda")
        alpha = torch.full((1, 1), 0.5, device="cuda")
        floor_f, floor_b = (m * k * 3) / bw * 1e6, (m * k * 6) / bw * 1e6  # us
        for warps, per_sm, reload, split, x16, gsplit, stages, rint, unroll in itertools.product(
                args.warps, args.per_sm, (False, True) if args.reload else (False,), (True, False),
                (True, False) if args.x16 else (True,), (False, True) if args.grad_split else (False,), args.stages,
                args.rint, args.unroll):
            setting = dict(K=k, kind=kind, warps=warps, programs_per_sm=per_sm, reload=reload, split=split, x16=x16,
                           grad_split=gsplit, stages=stages, rint=rint, unroll=unroll)
            quant_ops.NUM_WARPS[tile], quant_ops.PROGRAMS_PER_SM = warps, per_sm
            quant_ops.RINT_ROUNDING = bool(rint)
            quant_ops.LOOP_UNROLL.update(forward=unroll or None, backward=unroll or None)
            quant_ops.X16_TILES, quant_ops.GRAD_SPLIT = x16, gsplit
            quant_ops.NUM_STAGES.update(forward=stages, backward=stages)
            quant_ops.RELOAD_ABOVE.update(forward=0 if reload else 1 << 30, backward=0 if reload else 1 << 30)
            try:
                fwd = gbench(lambda: rotate_quantize(x, signs, lay, alpha, 2, True, 1, want_f8=True, split=split)) * 1e3
                bwd = gbench(lambda: rotate_quantize_backward(x, dy, signs, lay, alpha.reshape(1), 2, True, 1,
                                                              split=split)) * 1e3
            except Exception as e:  # a setting the compiler rejects (e.g. out of shared memory / registers)
                print(" ".join(f"{a}={b}" for a, b in setting.items()) + f": {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append(dict(setting, fwd_us=round(fwd, 1), bwd_us=round(bwd, 1), fwd_floor_us=round(floor_f, 1),
                             bwd_floor_us=round(floor_b, 1)))
            print(json.dumps(rows[-1]), flush=True)
    quant_ops.NUM_WARPS.clear()
    quant_ops.X16_TILES, quant_ops.GRAD_SPLIT, quant_ops.RINT_ROUNDING = True, False, True
    quant_ops.LOOP_UNROLL.update(forward=None, backward=None)
    for k, kind, split, x16, gsplit in itertools.product(args.dims, args.kinds, (True, False), (True, False), (False, True)):
        sub = [r for r in rows if r["K"] == k and r["kind"] == kind and r["split"] == split and r["x16"] == x16 and r["grad_split"] == gsplit]
        if sub:
            bf = min(sub, key=lambda r: r["fwd_us"])
            bb = min(sub, key=lambda r: r["bwd_us"])
            print(f"best K={k} kind={kind} split={split} x16={x16} grad_split={gsplit}: fwd {bf['fwd_us']} us (floor {bf['fwd_floor_us']}) with "
                  f"warps={bf['warps']} per_sm={bf['programs_per_sm']} reload={bf['reload']} stages={bf['stages']} "
                  f"unroll={bf['unroll']}; "
                  f"bwd {bb['bwd_us']} us (floor {bb['bwd_floor_us']}) with warps={bb['warps']} "
                  f"per_sm={bb['programs_per_sm']} reload={bb['reload']} stages={bb['stages']} unroll={bb['unroll']}")
    if args.json:
        json.dump(dict(copy_tb_s=bw / 1e12, rows=rows), open(args.json, "w"), indent=1)


# (name, K, quantizers G, adaLN in front) of each rotate+quantize launch of a DiT-XL/2 block's fused QAT step
QAT_LAUNCHES = [("q/k/v (adaLN)", 1152, 3, True), ("out", 1152, 1, False), ("fc1 (adaLN)", 1152, 1, True),
                ("fc2", 4608, 1, False)]


def qat_launches(m: int, bw: float, json_path: str | None, samples: int = 32, blocks: int = 28, settings=None):
    """GPU us of each rotate+quantize launch of a DiT-XL/2 block's QAT step (A2, rms, bf16 input), with
    the exact and the one-rounding rotation (``use_fused_kernels(exact_rotation=False)``) side by side:
    the forward writes e4m3 codes, the backward the weight gradient's input too.
    ``settings = (programs per SM, stages, register caps, launch keys or None)`` lists: also time each
    combination (JSON lines)."""
    rows = []
    if settings:
        sweep_launches(m, samples, *settings)
    for name, k, g, norm in QAT_LAUNCHES:
        row = dict(launch=name, K=k, G=g, norm=norm)
        for split, tag in ((True, ""), (False, "_one_rounding")):
            run_f, run_b = launch_calls(m, k, g, norm, samples, split=split)
            row[f"fwd{tag}_us"], row[f"bwd{tag}_us"] = round(gbench(run_f) * 1e3, 1), round(gbench(run_b) * 1e3, 1)
        # bytes: forward reads x, writes G code tensors; backward reads x and G gradients, writes dx and G inputs
        row.update(fwd_floor_us=round(m * k * (2 + g) / bw * 1e6, 1), bwd_floor_us=round(m * k * (2 + 4 * g + 2) / bw * 1e6, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{m} tokens, A2 rms, GPU us per launch, exact / one-rounding rotation (floor: bytes at the copy rate)")
    print("| launch | fwd | fwd floor | bwd | bwd floor |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['launch']} | {r['fwd_us']} / {r['fwd_one_rounding_us']} | {r['fwd_floor_us']} | "
              f"{r['bwd_us']} / {r['bwd_one_rounding_us']} | {r['bwd_floor_us']} |")
    for tag, what in (("", "exact"), ("_one_rounding", "one-rounding")):
        tf, tb = (sum(r[f"{d}{tag}_us"] for r in rows) * blocks / 1e3 for d in ("fwd", "bwd"))
        print(f"x {blocks} blocks, {what} rotation: forward {tf:.2f} ms, backward {tb:.2f} ms per step")
    if json_path:
        json.dump(dict(copy_tb_s=bw / 1e12, rows=rows), open(json_path, "w"), indent=1)


def launch_calls(m, k, g, norm, samples, device="cuda", split=True):
    """(forward, backward): zero-argument calls of one QAT launch (``QAT_LAUNCHES`` entry) on random inputs
    (``split=False``: the one-rounding rotation)."""
    lay = rotation_layout(k, "kronecker", None)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    grad = torch.randn(g, m, k, device=device, dtype=torch.bfloat16)
    signs = torch.where(torch.rand(k, device=device) < 0.5, -1.0, 1.0)
    alpha = torch.full((g, 1), 0.5, device=device)
    mod = torch.randn(samples, 2 * k, device=device, dtype=torch.bfloat16) * 0.3
    kw = dict(norm=(mod[:, :k], mod[:, k:], 1e-6)) if norm else {}
    # the forward writes each token's rms statistic (and with the adaLN its LayerNorm mean and rstd),
    # and the backward reads them, as the QAT step does
    u, fkw, bkw = x.float(), dict(want_stat=True), {}
    if norm:
        var, mean = torch.var_mean(u, dim=1, unbiased=False)
        sc, sh = (t.float().repeat_interleave(m // samples, 0) for t in (mod[:, :k], mod[:, k:]))
        u = F.layer_norm(u, (k,)) * (1 + sc) + sh
        fkw["want_norm_stats"], bkw["norm_stats"] = True, torch.stack([mean, torch.rsqrt(var + 1e-6)])
    bkw["stat"] = u.square().mean(1).sqrt()
    fwd = lambda: rotate_quantize(x, signs, lay, alpha, 2, True, 1, want_f8=True, split=split, **kw, **fkw)  # noqa: E731
    bwd = lambda: rotate_quantize_backward(x, grad, signs, lay, alpha, 2, True, 1, out_dtype=torch.bfloat16,  # noqa: E731
                                           split=split, **kw, **bkw)
    return fwd, bwd


def launch_key(name: str) -> str:
    """A QAT_LAUNCHES name as a command-line word: "q/k/v (adaLN)" -> "qkv"."""
    return name.split()[0].replace("/", "")


def sweep_launches(m, samples, per_sms, stages_list, caps, only=None):
    """Each launch at every programs-per-SM x pipeline-stages x register-cap setting (the tile's, the
    forward's and the adaLN backward's own overrides off)."""
    saved = (dict(quant_ops.PROGRAMS_PER_SM_BY_TILE), quant_ops.PROGRAMS_PER_SM, dict(quant_ops.NUM_STAGES),
             dict(quant_ops.MAX_REGISTERS), dict(quant_ops.NORM_BACKWARD), dict(quant_ops.FORWARD))
    quant_ops.NORM_BACKWARD.clear()
    quant_ops.FORWARD.clear()
    for name, k, g, norm in QAT_LAUNCHES:
        if only and launch_key(name) not in only:
            continue
        fwd, bwd = launch_calls(m, k, g, norm, samples)
        for per_sm, stages, cap in itertools.product(per_sms, stages_list, caps):
            quant_ops.PROGRAMS_PER_SM_BY_TILE.clear()
            quant_ops.PROGRAMS_PER_SM = per_sm
            quant_ops.NUM_STAGES.update(forward=stages, backward=stages)
            quant_ops.MAX_REGISTERS.update(forward=cap or None, backward=cap or None)
            r = dict(launch=name, programs_per_sm=per_sm, stages=stages, maxnreg=cap)
            try:
                r.update(fwd_us=round(gbench(fwd) * 1e3, 1), bwd_us=round(gbench(bwd) * 1e3, 1))
            except Exception as e:  # out of registers / shared memory
                r.update(error=type(e).__name__)
            print(json.dumps(r), flush=True)
    quant_ops.PROGRAMS_PER_SM_BY_TILE.update(saved[0])
    quant_ops.PROGRAMS_PER_SM = saved[1]
    quant_ops.NUM_STAGES.update(saved[2])
    quant_ops.MAX_REGISTERS.update(saved[3])
    quant_ops.NORM_BACKWARD.update(saved[4])
    quant_ops.FORWARD.update(saved[5])


if __name__ == "__main__":
    main()
