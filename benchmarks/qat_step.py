"""QAT step benchmark on DiT-XL/2 (random init), batch 32, bf16 autocast, AdamW (fp32 master weights).

Rows (issue 7):
  a  plain bf16 DiT-XL/2 step (fwd + bwd + AdamW): the baseline
  b  QAT student, pure-torch reference path (robuq.quant)
  c  QAT student, fused Triton path (robuq.kernels.qat.use_fused_kernels: forward GEMMs on fp8
     tensor cores where the GPU has them, one rotate+quantize launch for q, k and v of each attention),
     with diffusers' own adaLN norms (fuse_norms=False: the default until session 7)
  c16  (c) with the forward GEMMs in bf16 (robuq.kernels.qat.FP8_FORWARD = False)
  c3   (c) with q, k and v quantized by three launches (diffusers' own attention processor)
  cg   (c) with the MLP's GELU inside the kernels of fc2 (fuse_activations: less memory, not faster)
  cn   (c) with each block's adaLN (LayerNorm + modulation) inside the q/k/v and fc1 kernels
       (fuse_norms=True): the fused path as it ships
  cnk  (cn) with the forward kernels writing and keeping the weight gradient's input q * s_t
       (qat.GEMM_INPUT_IN_BACKWARD = False: the default until session 10)
  d  full QAT step: frozen bf16 teacher forward + (c) with the distillation MSE; the teacher runs
     as a plain bf16 model (robuq.models.frozen_forward, what DiTModule does)
  da (d) with the teacher under the step's autocast (before session 7: its LayerNorms in fp32)
  dn (d) with the student's adaLN inside the kernels, as cn: the full step as it ships
  cnf, dnf  (cn), (dn) with the one-rounding rotation (use_fused_kernels(exact_rotation=False),
       --model.exact_rotation false): opt-in

    python benchmarks/qat_step.py [--rows a b c cn d dn] [--modes eager compile-regional graph] [--steps 10]

Prints ms/step, images/s, peak memory and each row's time and memory against row (a) in the same
mode: eager, torch.compile (per block or whole model), or the whole step as one CUDA graph.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import gbench, profile_kernels  # noqa: E402
from robuq.cuda_graph import CapturedForward, GraphedBlocks  # noqa: E402
from robuq.models import DIT_XL_2_256 as XL  # noqa: E402
from robuq.models import dit_forward, frozen_forward  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402

DEV = "cuda"


def build_xl():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        return DiTTransformer2DModel(**XL)


def batch(bs):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(bs, 4, 32, 32, device=DEV, generator=g)
    t = torch.randint(0, 1000, (bs,), device=DEV, generator=g)
    y = torch.randint(0, 1000, (bs,), device=DEV, generator=g)
    target = torch.randn(bs, 8, 32, 32, device=DEV, generator=g)
    return x, t, y, target


def make_student(bits):
    student = build_xl()
    quantize_(student, QuantConfig(act_bits=bits))
    x, t, y, _ = batch(2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        student(x, timestep=t, class_labels=y)  # initialise the LSQ steps
    return student.train()


def _compile(model, how):
    """``full``: torch.compile the whole model; ``regional``: compile each transformer block (the 28
    identical blocks share one compiled graph, so warm-up is one block's compile, PyTorch's
    regional-compilation recipe)."""
    if how == "full":
        return torch.compile(model)
    for block in model.transformer_blocks:
        block.compile()
    return model


def run_row(name, model, teacher, bs, steps, mode, profile=False, teacher_autocast=False):
    """Time one training step (fwd + bwd + AdamW) in ``mode``: "eager", "compile-regional",
    "compile-full", "graph" (the whole step captured once in a CUDA graph and replayed: GPU time
    without host launch overhead) or "compile-graph" (per-block compile, then the whole step as
    one CUDA graph), or "graph-blocks" (eager, each transformer block's forward and backward replayed
    as CUDA graphs, robuq.cuda_graph.GraphedBlocks, and the teacher's forward as one graph:
    what a DDP run can use)."""
    graph = mode in ("graph", "compile-graph")
    blocks_graphed = mode == "graph-blocks"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=graph)
    how = {"compile-full": "full", "compile-regional": "regional", "compile-graph": "regional"}.get(mode)
    fwd = _compile(model, how) if how else model
    tfwd = None
    if teacher is not None:
        tfwd = _compile(teacher, how) if how else teacher
    x, t, y, target = batch(bs)
    teacher_graph = []  # graph-blocks: the teacher's forward as one CUDA graph

    def step():
        # no autocast weight cache: a CUDA graph must recompute the bf16 casts on every replay
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not (graph or blocks_graphed)):
            if teacher_graph:
                tgt = teacher_graph[0](x, t, y)
            elif tfwd is not None:
                with torch.no_grad():
                    tgt = (dit_forward if teacher_autocast else frozen_forward)(tfwd, x, t, y)
            else:
                tgt = target
            out = fwd(x, timestep=t, class_labels=y).sample
            loss = F.mse_loss(out.float(), tgt.float())
        loss.backward()
        opt.step()
        if not graph:
            opt.zero_grad(set_to_none=True)
        return loss

    # the peak covers warm-up (and capture) too: a graph's pool is allocated during capture and only
    # reused by its replays
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            loss = step()  # gradients live in the graph's pool and are overwritten each replay
        run = g.replay
        run()
    else:
        for _ in range(3):
            loss = step()
        if blocks_graphed:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                GraphedBlocks(model.transformer_blocks, lambda: model(x, timestep=t, class_labels=y))
                if tfwd is not None:
                    forward = dit_forward if teacher_autocast else frozen_forward
                    teacher_graph.append(CapturedForward(lambda *a: forward(tfwd, *a), (x, t, y)))
            loss = step()
        run = step
    torch.cuda.synchronize()
    warm = time.time() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(steps):
        start.record()
        out = run()
        loss = loss if graph else out
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated()
    kernels = profile_kernels(run, f"{name} ({mode})") if profile else None
    times.sort()
    ms = times[len(times) // 2]
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: non-finite loss")
    del opt
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) if mode.startswith("compile") else 0
    return dict(row=name, mode=mode, ms=ms, min_ms=times[0], images_s=bs / ms * 1e3, peak_gib=peak / 2**30,
                warmup_s=warm, loss=float(loss.detach()), compiled_graphs=graphs, kernels=kernels)


def cleanup():
    gc.collect()
    torch.cuda.empty_cache()


def kernel_bench(bits, tokens=8192):
    """Per-kernel times of one QuantLinear's act-quant at 8192 tokens: fused vs torch reference."""
    from triton.testing import do_bench

    from robuq.kernels.qat import use_fused_kernels

    rows = []
    for k, n in ((1152, 1152), (1152, 4608), (4608, 1152)):
        net = torch.nn.Sequential(torch.nn.Linear(k, n, device=DEV))
        quantize_(net, QuantConfig(include=["0"], act_bits=bits))
        x = torch.randn(tokens, k, device=DEV)
        net(x)
        layer = net[0]
        act = layer.act
        xr = x.clone().requires_grad_()
        # reference act-quant alone (fp32 input, as under autocast after LayerNorm)
        t_ref_f = do_bench(lambda: act(xr), return_mode="median")
        out = act(xr)
        g = torch.randn_like(out)
        t_ref_fb = do_bench(lambda: torch.autograd.grad(act(xr), [xr, act.quantizer.step], g), return_mode="median")
        fused = copy.deepcopy(net)
        use_fused_kernels(fused)
        fl = fused[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            t_lin_ref = do_bench(lambda: layer(xr), return_mode="median")
            t_lin_fused = do_bench(lambda: fl(xr), return_mode="median")
            y = fl(xr)
            gy = torch.randn_like(y)
            t_lin_fused_fb = do_bench(lambda: torch.autograd.grad(fl(xr), [xr, fl.weight, fl.act.quantizer.step], gy),
                                      return_mode="median")
            t_lin_ref_fb = do_bench(lambda: torch.autograd.grad(layer(xr), [xr, layer.weight, act.quantizer.step], gy),
                                    return_mode="median")
        xb, wb = x.bfloat16().requires_grad_(), torch.randn(n, k, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        t_bf16 = do_bench(lambda: F.linear(xb, wb), return_mode="median")
        yb = F.linear(xb, wb)
        gb = torch.randn_like(yb)
        t_bf16_fb = do_bench(lambda: torch.autograd.grad(F.linear(xb, wb), (xb, wb), gb), return_mode="median")
        from robuq.kernels.quant_ops import rotate_quantize, rotate_quantize_backward
        from robuq.kernels.rotation import rotation_layout

        lay = rotation_layout(k, "kronecker", None)
        alpha = act.quantizer.step.detach().abs().reshape(1, 1)
        t_kf = do_bench(lambda: rotate_quantize(x, act.rotation.signs, lay, alpha, bits, True, 1, want_i8=True,
                                                out="scaled"), return_mode="median")
        gk = torch.randn(tokens, k, device=DEV, dtype=torch.bfloat16)
        t_kb = do_bench(lambda: rotate_quantize_backward(x, gk, act.rotation.signs, lay, alpha.reshape(1), bits, True, 1),
                        return_mode="median")
        g_kf = gbench(lambda: rotate_quantize(x, act.rotation.signs, lay, alpha, bits, True, 1, want_i8=True,
                                              out="scaled"))
        g_kb = gbench(lambda: rotate_quantize_backward(x, gk, act.rotation.signs, lay, alpha.reshape(1), bits, True, 1))
        g_bf16 = gbench(lambda: F.linear(xb.detach(), wb.detach()))
        rows.append([f"{tokens}x{k}x{n}", t_bf16, t_bf16_fb, t_ref_f, t_ref_fb, t_kf, t_kb, t_lin_ref, t_lin_ref_fb,
                     t_lin_fused, t_lin_fused_fb, g_bf16, g_kf, g_kb])
        del net, fused, x, xr
        cleanup()
    print(f"\nPer-kernel times (ms, median), A{bits}: act-quant = rotate + per-token LSQ fake-quant on fp32 input")
    print("| MxKxN | bf16 linear fwd | bf16 linear fwd+bwd | ref act-quant fwd | ref act-quant fwd+bwd | "
          "fused quant fwd kernel | fused quant bwd kernel | ref QuantLinear fwd | ref QuantLinear fwd+bwd | "
          "fused QuantLinear fwd | fused QuantLinear fwd+bwd | GPU-only: bf16 linear fwd | GPU-only: fused fwd kernel | "
          "GPU-only: fused bwd kernel |")
    print("|---" * 14 + "|")
    for r in rows:
        print("| " + " | ".join([r[0]] + [f"{v:.3f}" for v in r[1:]]) + " |")
    sys.stdout.flush()
    return rows


def compile_smoke(bits):
    """Does torch.compile trace the fused path (custom ops inside the autograd.Function)? A small MLP
    of fused QuantLinears, fwd + bwd under bf16 autocast, compiled vs eager."""
    from robuq.kernels.qat import use_fused_kernels

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1152, 4608), torch.nn.GELU(), torch.nn.Linear(4608, 1152)).to(DEV)
    quantize_(net, QuantConfig(include=["0", "2"], act_bits=bits))
    x = torch.randn(8, 256, 1152, device=DEV)
    net(x)
    use_fused_kernels(net)

    def run(f):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = f(xi)
        y.float().square().mean().backward()
        grads = [xi.grad] + [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        return y.float(), grads

    t0 = time.time()
    try:
        ye, ge = run(net)
        cnet = torch.compile(net)
        yc, gc_ = run(cnet)
        yc, gc_ = run(cnet)
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip([yc] + gc_, [ye] + ge))
        from triton.testing import do_bench

        xi = x.clone().requires_grad_()

        def step(f):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                f(xi).float().square().mean().backward()

        te, tc = do_bench(lambda: step(net), return_mode="median"), do_bench(lambda: step(cnet), return_mode="median")
        print(f"\ntorch.compile smoke (2 fused QuantLinears 1152-4608-1152, 2048 tokens, fwd+bwd): works, "
              f"max rel. diff to eager {err:.1e}, eager {te:.3f} ms, compiled {tc:.3f} ms, compile {time.time() - t0:.0f} s")
    except Exception as e:  # noqa: BLE001
        print(f"\ntorch.compile smoke: FAILED {type(e).__name__}: {str(e)[:600]}")
        traceback.print_exc(limit=4)
    finally:
        torch._dynamo.reset()


MODES = ("eager", "compile-regional", "compile-full", "graph", "compile-graph", "graph-blocks")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=["a", "b", "c", "cn", "d", "dn"])
    ap.add_argument("--modes", nargs="*", default=["eager"], choices=MODES,
                    help="eager; torch.compile per block (regional) or of the whole model (full); the whole "
                         "step as one CUDA graph (graph), also after per-block compile (compile-graph); eager "
                         "with each block replayed as CUDA graphs (graph-blocks). "
                         "Row b runs eager only.")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="GPU time per step by kernel (torch.profiler) for each row")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    ap.add_argument("--compile-smoke", action="store_true", help="check torch.compile on a small fused model")
    args = ap.parse_args()
    from robuq.kernels import qat
    from robuq.kernels.qat import use_fused_kernels

    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | batch {args.batch} | A{args.bits}")
    if not args.no_kernels:
        kernel_bench(args.bits)
    if args.compile_smoke:
        compile_smoke(args.bits)
    results = []
    for mode in args.modes:
        for row in args.rows:
            if row == "b" and mode != "eager":
                continue  # the reference path is the slow baseline; 3.4x eager (docs/PERFORMANCE.md)
            label = {"a": "a plain bf16", "b": "b QAT reference", "c": "c QAT fused", "c16": "c16 fused, bf16 fwd GEMM",
                     "c3": "c3 fused, q/k/v apart", "cg": "cg fused, GELU in kernel", "cn": "cn fused, adaLN in kernel",
                     "cnk": "cnk (cn), q*s kept from fwd",
                     "d": "d QAT fused + teacher", "da": "da (d), teacher autocast",
                     "dn": "dn (d), adaLN in kernel", "cnf": "cnf (cn), one-rounding rot.",
                     "dnf": "dnf (dn), one-rounding rot."}[row]
            qat.FP8_FORWARD = row != "c16"
            qat.GEMM_INPUT_IN_BACKWARD = row != "cnk"
            try:
                teacher = None
                if row == "a":
                    model = build_xl().train()
                else:
                    model = make_student(args.bits)
                    if row in ("c", "c16", "c3", "cg", "cn", "cnk", "cnf", "d", "da", "dn", "dnf"):
                        fused = use_fused_kernels(model, fuse_activations=row == "cg",
                                                  fuse_norms=row in ("cn", "cnk", "cnf", "dn", "dnf"),
                                                  exact_rotation=row not in ("cnf", "dnf"))
                        if row == "c3":
                            from diffusers.models.attention_processor import Attention, AttnProcessor2_0

                            for m in model.modules():
                                if isinstance(m, Attention):
                                    m.set_processor(AttnProcessor2_0())
                        print(f"  {label}: {sum(fused.values())}/{len(fused)} layers fused")
                    if row in ("d", "da", "dn", "dnf"):
                        teacher = build_xl().to(torch.bfloat16).eval().requires_grad_(False)
                r = run_row(label, model, teacher, args.batch, args.steps, mode, args.profile, teacher_autocast=row == "da")
                results.append(r)
                print(f"  {label:24s} {mode:16s} {r['ms']:8.1f} ms/step  {r['images_s']:7.1f} img/s  "
                      f"peak {r['peak_gib']:5.1f} GiB  (warm-up {r['warmup_s']:.0f} s, "
                      f"{r['compiled_graphs']} compiled graphs)", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  {label} {mode}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
                traceback.print_exc(limit=3)
                results.append(dict(row=label, mode=mode, error=f"{type(e).__name__}: {str(e)[:400]}"))
            finally:
                model = teacher = None  # noqa: F841
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                cleanup()
    base = {r["mode"]: r for r in results if r["row"].startswith("a") and "ms" in r}
    print(f"\nQAT step, DiT-XL/2, batch {args.batch}, bf16 autocast, AdamW, A{args.bits} "
          f"({torch.cuda.get_device_name()}); ratios against row (a) in the same mode")
    print("| row | mode | ms/step | images/s | peak GiB | time / (a) | memory / (a) | warm-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "ms" not in r:
            print(f"| {r['row']} | {r['mode']} | failed: {r['error'][:80]} | | | | | |")
            continue
        a = base.get(r["mode"])
        t_ratio = f"{r['ms'] / a['ms']:.2f}" if a else "n/a"
        m_ratio = f"{r['peak_gib'] / a['peak_gib']:.2f}" if a else "n/a"
        print(f"| {r['row']} | {r['mode']} | {r['ms']:.1f} | {r['images_s']:.1f} | {r['peak_gib']:.1f} | {t_ratio} | "
              f"{m_ratio} | {r['warmup_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
