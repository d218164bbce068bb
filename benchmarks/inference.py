"""Inference benchmark: packed W1.58A{2,4} DiT-XL/2 (fused rotate+quant kernel, fp8 / packed GEMMs)
against the bf16 DiT-XL/2, measured in the same run on the same GPU.

    python benchmarks/inference.py [--batches 1 8 32] [--tokens 8192] [--bits 2] [--no-forward]

Prints (and writes as JSON with --json):
  1. ceilings: bf16 and fp8 8192^3 matmul TFLOP/s, device copy bandwidth;
  2. per-layer GEMM times at DiT-XL/2 shapes with --tokens rows: bf16 F.linear vs our pieces
     (quantize kernel, cuBLAS fp8 _scaled_mm, packed Triton GEMM) and our whole layer;
     the adaLN modulation shape (1152 -> 6912) at one row per sample;
  3. whole-model forward (random init): bf16 vs packed, eager and CUDA graph, peak memory, model
     weight bytes, and the exported file size;
  4. 250-step DDPM sampling wall time at batch 8 with CFG through RobuQDiTPipeline, eager and
     with CUDAGraphDiT, bf16 vs packed;
  5. last (its compile can take minutes, so the tables above are out first): torchao int8 dynamic
     where it installs, eager and compiled block by block (torchao's docs compile the model; per
     block bounds the compile time), against the bf16 rows of 3.
Times are medians of ``triton.testing.do_bench`` (CUDA events); ratios are bf16 time / ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from benchmarks.timing import gbench, profile_kernels  # noqa: E402
from robuq.deploy import PackedTernaryLinear, export, load_exported, weight_bytes  # noqa: E402
from robuq.kernels.gemm import PACKED_CONFIGS, packed_gemm, scaled_mm_rowwise  # noqa: E402
from robuq.deploy.modules import packed_linears  # noqa: E402
from robuq.deploy.pack import pack_ternary  # noqa: E402
from robuq.kernels.quant_ops import rotate_quantize  # noqa: E402
from robuq.kernels.rotation import rotation_layout  # noqa: E402
from robuq.models import DIT_XL_2_256 as XL  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402

DEV = "cuda"


def bench(fn, rep=200) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def host_overhead(fn, n=300) -> float:
    """Host time per call (us) of n back-to-back calls on tiny inputs (launch-bound)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def table(title, header, rows):
    print(f"\n{title}")
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(str(h).ljust(w[i]) for i, h in enumerate(header)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |")
    sys.stdout.flush()


def ceilings(res):
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    t = bench(lambda: a @ b, rep=100)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=DEV)
    t8 = bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), rep=100)
    big = torch.empty(1 << 30, device=DEV, dtype=torch.uint8)
    dst = torch.empty_like(big)
    tc = bench(lambda: dst.copy_(big), rep=100)
    res["ceilings"] = dict(bf16_tflops=2 * n**3 / t / 1e9, fp8_tflops=2 * n**3 / t8 / 1e9,
                           copy_tb_s=2 * big.numel() / tc / 1e9)
    del a, b, a8, b8, big, dst
    c = res["ceilings"]
    table("Ceilings", ["bf16 8192^3 TFLOP/s", "fp8 8192^3 TFLOP/s", "copy TB/s (read+write)"],
          [[f"{c['bf16_tflops']:.0f}", f"{c['fp8_tflops']:.0f}", f"{c['copy_tb_s']:.2f}"]])


def layer_bench(res, tokens: int, bits: int):
    """GPU time of each piece and of the whole layer, CUDA-graph timed (no launch overhead)."""
    rows, out = [], []
    shapes = [("qkv fused (if tied)", 1152, 3456, tokens), ("q/k/v/out", 1152, 1152, tokens),
              ("fc1", 1152, 4608, tokens), ("fc2", 4608, 1152, tokens)]
    shapes += [(f"adaLN M={m}", 1152, 6912, m) for m in (1, 8, 32)]
    shapes += [(f"fc1 M={m}", 1152, 4608, m) for m in (256, 2048)]
    for name, k, n, m in shapes:
        torch.manual_seed(0)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        t_bf16 = gbench(lambda: F.linear(x, w, b))
        lin = torch.nn.Linear(k, n, device=DEV)
        net = torch.nn.Sequential(lin)
        quantize_(net, QuantConfig(include=["0"], act_bits=bits))
        net(x.float()[: max(m, 2)])
        layer = PackedTernaryLinear.from_quant_linear(net[0])
        del net, lin
        lay = rotation_layout(k, "kronecker", None)
        lay_blk = rotation_layout(k, "block", 128)
        alpha = layer.alpha[:1].reshape(1, 1)
        t_q = gbench(lambda: rotate_quantize(x, layer.signs, lay, alpha, bits, True, 1, want_f8=True))
        t_q_fast = gbench(lambda: rotate_quantize(x, layer.signs, lay, alpha, bits, True, 1, want_f8=True, split=False))
        t_q_blk = gbench(lambda: rotate_quantize(x, layer.signs, lay_blk, alpha, bits, True, 1, want_f8=True))
        r = rotate_quantize(x, layer.signs, lay, alpha, bits, True, 1, want_f8=True)
        a8, s = r["f8"][0], r["s"][0]
        wf8 = layer.fp8_weight()
        bias = layer._bias_in(torch.bfloat16)
        try:
            t_mm = gbench(lambda: scaled_mm_rowwise(a8, wf8, s, layer.w_scale, bias))
        except Exception as e:  # noqa: BLE001
            print(f"  {name} _scaled_mm: {type(e).__name__}: {str(e)[:160]}")
            t_mm = float("inf")
        t_pk = gbench(lambda: packed_gemm(a8, layer.packed, k, s, layer.w_scale, layer.bias))
        times = {}
        for gemm, split in (("cublas", True), ("cublas", False), ("triton", True), ("triton", False)):
            layer.gemm, layer.split = gemm, split
            try:
                times[(gemm, split)] = gbench(lambda: layer(x))
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {gemm}/{split}: {type(e).__name__}: {str(e)[:160]}")
                times[(gemm, split)] = float("inf")
        layer.gemm, layer.split = "auto", True
        t_auto_eager = bench(lambda: layer(x))
        t_bf16_eager = bench(lambda: F.linear(x, w, b))
        best = min(times, key=times.get)
        t_best = times[best]
        split_best = min((v, key) for key, v in times.items() if key[1])
        flops = 2 * m * k * n
        us = lambda v: f"{v * 1e3:.1f}"  # noqa: E731
        rows.append([name, f"{m}x{k}x{n}", us(t_bf16), us(t_q), us(t_q_fast), us(t_q_blk), us(t_mm), us(t_pk),
                     us(times[("cublas", True)]), us(times[("triton", True)]),
                     f"{us(t_best)} ({best[0]},{'split' if best[1] else 'fast'})",
                     f"{t_bf16 / split_best[0]:.2f}x", f"{t_bf16 / t_best:.2f}x", us(t_bf16_eager), us(t_auto_eager),
                     f"{flops / t_bf16 / 1e9:.0f}"])
        out.append(dict(name=name, m=m, k=k, n=n, bf16_ms=t_bf16, quant_ms=t_q, quant_fast_ms=t_q_fast,
                        quant_block128_ms=t_q_blk, scaled_mm_ms=t_mm, packed_gemm_ms=t_pk,
                        layer_ms={f"{g}/{'split' if sp else 'fast'}": v for (g, sp), v in times.items()},
                        best=list(best), ratio_best=t_bf16 / t_best, ratio_exact=t_bf16 / split_best[0],
                        bf16_eager_ms=t_bf16_eager, ours_auto_eager_ms=t_auto_eager))
        del x, w, layer, a8, wf8
        torch.cuda.empty_cache()
    res["layers"] = out
    qkv_shared(res, bits, tokens)
    gelu_fc2(res, bits, tokens)
    adaln_input(res, bits, tokens)
    table(f"Per-layer GPU times (us; CUDA graph of 10 calls, median of 20 replays), A{bits}. quant = fused "
          "rotate+quantize kernel (split = exact hi/lo rotation, fast = one bf16 rounding, block128 = block-diagonal "
          "H_128 rotation); ratio = bf16 / ours (exact = split variants only); eager = do_bench incl. launch overhead",
          ["layer", "MxKxN", "bf16", "quant split", "quant fast", "quant block128", "fp8 mm", "packed mm",
           "ours cublas", "ours triton", "ours best", "ratio exact", "ratio best", "bf16 eager", "ours eager",
           "bf16 TFLOP/s"], rows)


def qkv_shared(res, bits, tokens):
    """q, k and v (8192x1152x1152 each): three bf16 linears vs ours with one rotate+quantize launch
    for the three (``robuq.deploy.modules.packed_linears``, what the exported model runs)."""

    torch.manual_seed(0)
    x = torch.randn(tokens, 1152, device=DEV, dtype=torch.bfloat16)
    ws = [torch.randn(1152, 1152, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(3)]
    bs = [torch.randn(1152, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
    net = torch.nn.Sequential(*[torch.nn.Linear(1152, 1152, device=DEV) for _ in range(3)])
    quantize_(net, QuantConfig(include=["0", "1", "2"], act_bits=bits))
    layers = []
    for lin in net:
        lin(x.float())
        layers.append(PackedTernaryLinear.from_quant_linear(lin))
    t_bf16 = gbench(lambda: [F.linear(x, w, b) for w, b in zip(ws, bs)])
    t_ours = gbench(lambda: packed_linears(layers, x))
    t_apart = gbench(lambda: [layer(x) for layer in layers])
    res["qkv_shared"] = dict(bf16_ms=t_bf16, ours_shared_ms=t_ours, ours_apart_ms=t_apart)
    print(f"\nq+k+v ({tokens}x1152x1152 x3, GPU us): bf16 {t_bf16 * 1e3:.1f} | ours, one quantize launch "
          f"{t_ours * 1e3:.1f} ({t_bf16 / t_ours:.2f}x) | ours, three launches {t_apart * 1e3:.1f} "
          f"({t_bf16 / t_apart:.2f}x)", flush=True)


def gelu_fc2(res, bits, tokens):
    """The GELU in front of fc2 (8192 x 4608): its own bf16 pass + the rotate+quantize kernel, vs the
    kernel computing the GELU itself (``act="gelu_tanh"``, robuq.kernels.mlp, QAT's memory saver)."""
    torch.manual_seed(0)
    h = torch.randn(tokens, 4608, device=DEV, dtype=torch.bfloat16)
    lay = rotation_layout(4608, "kronecker", None)
    signs = torch.ones(4608, device=DEV)
    alpha = torch.full((1, 1), 0.7, device=DEV)
    gelu = lambda: F.gelu(h, approximate="tanh")  # noqa: E731
    quant = lambda x, act=None: rotate_quantize(x, signs, lay, alpha, bits, True, 1, want_f8=True, act=act)  # noqa: E731
    t = dict(gelu=gbench(gelu), quant=gbench(lambda: quant(h)), gelu_then_quant=gbench(lambda: quant(gelu())),
             quant_gelu_inside=gbench(lambda: quant(h, "gelu_tanh")))
    res["gelu_fc2_input"] = {f"{k}_ms": v for k, v in t.items()}
    us = {k: f"{v * 1e3:.1f}" for k, v in t.items()}
    print(f"\nfc2 input ({tokens}x4608, GPU us): GELU pass {us['gelu']} | quantize {us['quant']} | GELU pass + "
          f"quantize {us['gelu_then_quant']} | quantize with the GELU inside {us['quant_gelu_inside']}", flush=True)


def adaln_input(res, bits, tokens):
    """The adaLN in front of q/k/v (8192 x 1152, batch 32 of 256 tokens): torch's LayerNorm and
    modulation passes + the rotate+quantize kernel (G = 3), vs the kernel computing them itself."""
    from robuq.models import modulate

    torch.manual_seed(0)
    b = tokens // 256
    x = torch.randn(b, 256, 1152, device=DEV, dtype=torch.bfloat16)
    emb = torch.randn(b, 6912, device=DEV, dtype=torch.bfloat16) * 0.3
    norm = (emb[:, 1152:2304], emb[:, :1152], 1e-6)
    lay = rotation_layout(1152, "kronecker", None)
    signs = torch.ones(1152, device=DEV)
    alpha = torch.full((3, 1), 0.7, device=DEV)
    quant = lambda v, **kw: rotate_quantize(v.reshape(-1, 1152), signs, lay, alpha, bits, True, 1, want_f8=True, **kw)  # noqa: E731
    t = dict(modulate=gbench(lambda: modulate(x, norm)), quant=gbench(lambda: quant(x)),
             modulate_then_quant=gbench(lambda: quant(modulate(x, norm))),
             quant_norm_inside=gbench(lambda: quant(x, norm=norm)))
    res["adaln_qkv_input"] = {f"{k}_ms": v for k, v in t.items()}
    us = {k: f"{v * 1e3:.1f}" for k, v in t.items()}
    print(f"\nq/k/v input ({tokens}x1152, G = 3, GPU us): LayerNorm + modulation {us['modulate']} | quantize "
          f"{us['quant']} | both {us['modulate_then_quant']} | quantize with the adaLN inside "
          f"{us['quant_norm_inside']}", flush=True)


def residual_bench(res, tokens):
    """The gated residual x + gate_b * y at 8192 x 1152: torch.addcmul vs robuq.kernels.residual."""
    from robuq.kernels.residual import gated_residual

    torch.manual_seed(0)
    x = torch.randn(tokens // 256, 256, 1152, device=DEV, dtype=torch.bfloat16)
    y = torch.randn_like(x)
    gate = torch.randn(tokens // 256, 6912, device=DEV, dtype=torch.bfloat16)[:, 2304:3456]
    t = dict(addcmul=gbench(lambda: torch.addcmul(x, gate.unsqueeze(1), y)), ours=gbench(lambda: gated_residual(x, gate, y)))
    res["gated_residual"] = {f"{k}_ms": v for k, v in t.items()}
    print(f"\ngated residual ({tokens}x1152, GPU us): torch.addcmul {t['addcmul'] * 1e3:.1f} | "
          f"robuq.kernels.residual {t['ours'] * 1e3:.1f}", flush=True)


def rotation_precision(res, tokens=8192):
    """How often the fast rotation (one bf16 rounding between the products) gives another A2 code
    than the exact one (hi/lo split, ~1e-5 relative to fp32), and than a float64 rotation."""
    from robuq.quant.hadamard import HadamardRotation

    out = {}
    for k in (1152, 4608):
        torch.manual_seed(k)
        rot = HadamardRotation(k).to(DEV)
        x = (torch.randn(tokens, k, device=DEV) * torch.rand(tokens, 1, device=DEV) * 4).bfloat16()
        x[:, :7] *= 30  # outlier channels
        lay = rotation_layout(k, "kronecker", None)
        alpha = torch.full((1, 1), 0.8, device=DEV)
        r = rot(x.double())
        ref = (r / (0.8 * r.pow(2).mean(-1, keepdim=True).sqrt())).clamp(-2, 1).round()
        codes = {split: rotate_quantize(x, rot.signs, lay, alpha, 2, True, 1, want_i8=True, split=split)["i8"][0].double()
                 for split in (True, False)}
        out[k] = dict(exact_vs_f64=(codes[True] != ref).float().mean().item(),
                      fast_vs_f64=(codes[False] != ref).float().mean().item(),
                      fast_vs_exact=(codes[False] != codes[True]).float().mean().item())
        print(f"A2 codes at {tokens}x{k}, fraction that differ: exact vs float64 {out[k]['exact_vs_f64']:.2e}, "
              f"fast vs float64 {out[k]['fast_vs_f64']:.2e}, fast vs exact {out[k]['fast_vs_exact']:.2e}", flush=True)
    res["rotation_precision"] = out


def overheads(res):
    x = torch.randn(16, 1152, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(1152, 1152, device=DEV, dtype=torch.bfloat16)
    net = torch.nn.Sequential(torch.nn.Linear(1152, 1152, device=DEV))
    quantize_(net, QuantConfig(include=["0"], act_bits=2))
    net(x.float())
    layer = PackedTernaryLinear.from_quant_linear(net[0])
    lay = rotation_layout(1152, "kronecker", None)
    alpha = layer.alpha[:1].reshape(1, 1)
    r = rotate_quantize(x, layer.signs, lay, alpha, 2, True, 1, want_f8=True)
    a8, s = r["f8"][0], r["s"][0]
    xe = torch.empty(16, 1152, device=DEV, dtype=torch.bfloat16)
    rows = [
        ["F.linear bf16", host_overhead(lambda: F.linear(x, w))],
        ["empty_like (torch op)", host_overhead(lambda: torch.empty_like(xe))],
        ["rotate_quantize (Triton launch)", host_overhead(lambda: rotate_quantize(x, layer.signs, lay, alpha, 2, True, 1, want_f8=True))],
        ["packed_gemm (Triton launch)", host_overhead(lambda: packed_gemm(a8, layer.packed, 1152, s, layer.w_scale, layer.bias))],
        ["scaled_mm_rowwise (cuBLAS)", host_overhead(lambda: scaled_mm_rowwise(a8, layer.fp8_weight(), s, layer.w_scale, None))],
        ["PackedTernaryLinear.forward", host_overhead(lambda: layer(x))],
    ]
    res["host_overhead_us"] = {k: v for k, v in rows}
    table("Host time per call on a 16x1152 input (us; launch-bound, back-to-back calls)", ["call", "us"],
          [[k, f"{v:.1f}"] for k, v in rows])


def packed_sweep(res):
    """Time every packed-GEMM tile candidate at the shapes where the packed kernel is used."""
    rows, out = [], []
    for m, k, n in [(1, 1152, 6912), (8, 1152, 6912), (32, 1152, 6912), (256, 1152, 4608), (256, 4608, 1152)]:
        codes = torch.randint(-1, 2, (n, k), device=DEV)
        p = pack_ternary(codes)
        a = torch.randint(-2, 2, (m, k), device=DEV).float().to(torch.float8_e4m3fn)
        sa, sb = torch.rand(m, device=DEV), torch.rand(n, device=DEV)
        times = []
        for cfg in PACKED_CONFIGS:
            try:
                times.append(gbench(lambda: packed_gemm(a, p, k, sa, sb, None, config=cfg)))
            except Exception as e:  # noqa: BLE001
                print(f"  config {cfg} failed at {m}x{k}x{n}: {type(e).__name__}: {str(e)[:120]}")
                times.append(float("inf"))
        wb = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
        xb = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        t_bf16 = gbench(lambda: F.linear(xb, wb))
        best = min(range(len(times)), key=times.__getitem__)
        weight_gbs = p.numel() / times[best] / 1e6
        rows.append([f"{m}x{k}x{n}", f"{t_bf16 * 1e3:.1f}"] + [f"{t * 1e3:.1f}" for t in times]
                    + [str(best), f"{t_bf16 / times[best]:.2f}x", f"{weight_gbs:.0f}"])
        out.append(dict(m=m, k=k, n=n, bf16_ms=t_bf16, config_ms=times, best=best))
    res["packed_sweep"] = out
    table("Packed-weight Triton GEMM tile sweep (us, CUDA-graph timed; e4m3 codes, no bias); configs = gemm.PACKED_CONFIGS",
          ["MxKxN", "bf16"] + [f"cfg{i}" for i in range(len(PACKED_CONFIGS))] + ["best", "bf16/best", "packed GB/s"], rows)


def build_xl(dtype=torch.float32):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        model = DiTTransformer2DModel(**XL).to(dtype)
    # diffusers keeps a timestep + class embedder per block; converted DiT-XL/2 weights make all 28
    # identical (the original model has one), so the random model gets that structure too
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def share_embedders(model):
    """One embedder module for all blocks (values are identical, see build_xl): the original DiT's layout."""
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = model.transformer_blocks[0].norm1.emb
    return model


def inputs(bs, dtype):
    g = torch.Generator(device=DEV).manual_seed(bs)
    x = torch.randn(bs, 4, 32, 32, device=DEV, generator=g).to(dtype)
    t = torch.randint(0, 1000, (bs,), device=DEV, generator=g)
    y = torch.randint(0, 1000, (bs,), device=DEV, generator=g)
    return x, t, y


def graph_time(model, args):
    """Median time of a CUDA-graph replay of model(*args) (None if capture fails)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(3):
                model(args[0], timestep=args[1], class_labels=args[2])
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), torch.no_grad():
            model(args[0], timestep=args[1], class_labels=args[2])
        t = bench(g.replay, rep=200)
        del g
        return t
    except Exception as e:  # noqa: BLE001
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]})")
        return None


def forward_bench(res, batches, bits, profile_batch=None, torchao="both"):
    residual_bench(res, 8192)
    rotation_precision(res)
    teacher = build_xl(torch.float32)
    student = copy.deepcopy(teacher)
    bf16 = teacher.to(torch.bfloat16).eval()
    t0 = time.time()
    quantize_(student, QuantConfig(act_bits=bits))
    x, t, y = inputs(2, torch.float32)
    with torch.no_grad():
        student(x, timestep=t, class_labels=y)  # initialise the LSQ steps
    student.eval()
    print(f"\nquantize_ + LSQ init of DiT-XL/2: {time.time() - t0:.1f} s")
    xs, ts, ys = inputs(4, torch.float32)
    with torch.no_grad():
        ref_out = student(xs, timestep=ts, class_labels=ys).sample.float()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        export(student, d, dtype=torch.bfloat16)
        size = sum(f.stat().st_size for f in Path(d).iterdir())
        print(f"export: {time.time() - t0:.1f} s, {size / 2**20:.1f} MiB on disk")
        packed = load_exported(d, device=DEV, dtype=torch.bfloat16)  # the user's path: one call
        norms_apart = load_exported(d, device=DEV, dtype=torch.bfloat16)
        fast = load_exported(d, device=DEV, dtype=torch.bfloat16, exact_rotation=False)
    for block in norms_apart.transformer_blocks:  # diffusers' block forward: the adaLN as its own passes
        block.__dict__.pop("forward", None)
    wb_diffusers = weight_bytes(bf16)["total"]
    wb_bf16 = weight_bytes(share_embedders(bf16))["total"]
    wb_ours = weight_bytes(packed)
    n_fp8 = sum(m.packed.shape[0] * m.in_features for m in packed.modules() if isinstance(m, PackedTernaryLinear))
    res["weights"] = dict(bf16_diffusers_bytes=wb_diffusers, bf16_bytes=wb_bf16, packed_bytes=wb_ours["total"],
                          packed_layers_bytes=wb_ours["packed_layers"], fp8_cache_bytes=n_fp8, export_file_bytes=size)
    table("Model weight bytes (DiT-XL/2)", ["bf16, per-block embedder copies (diffusers)", "bf16, shared embedders",
                                            "packed model", "of which packed layers", "+ e4m3 cache (cuBLAS path)",
                                            "export file", "bf16 (shared) / packed"],
          [[f"{wb_diffusers / 2**20:.0f} MiB", f"{wb_bf16 / 2**20:.0f} MiB", f"{wb_ours['total'] / 2**20:.0f} MiB",
            f"{wb_ours['packed_layers'] / 2**20:.0f} MiB", f"{n_fp8 / 2**20:.0f} MiB", f"{size / 2**20:.0f} MiB",
            f"{wb_bf16 / wb_ours['total']:.2f}x"]])

    # sanity: the packed CUDA model (bf16 activations) against the fp32 fake-quant student
    with torch.no_grad():
        got = packed(xs.bfloat16(), timestep=ts, class_labels=ys).sample.float()
        got_fast = fast(xs.bfloat16(), timestep=ts, class_labels=ys).sample.float()
    agree = ((got - ref_out).norm() / ref_out.norm()).item()
    agree_fast = ((got_fast - ref_out).norm() / ref_out.norm()).item()
    res["packed_vs_student_rel_err"], res["packed_fast_vs_student_rel_err"] = agree, agree_fast
    print(f"packed bf16 CUDA model vs fp32 fake-quant student, batch 4: rel. error {agree:.2e} (exact rotation), "
          f"{agree_fast:.2e} (fast rotation)")
    # diffusers' residual stream is a transposed view (from the patch embedding), which slows every
    # elementwise op of the bf16 model; the same model with a contiguous stream, for a fair comparison
    bf16_contiguous = contiguous_stream(copy.deepcopy(bf16))
    models = [("bf16", bf16), ("ours", packed), ("ours, norms apart", norms_apart),
              ("bf16, contiguous stream", bf16_contiguous), ("ours, fast rotation", fast),
              ("bf16, as sampling runs it", AutocastFP32Input(bf16)), ("ours, as sampling runs it", AutocastFP32Input(packed))]
    if profile_batch:
        kernel_profile(res, models[:4], inputs(profile_batch, torch.bfloat16))
    rows, out = [], []
    for bs in batches:
        xb, tb, yb = inputs(bs, torch.bfloat16)
        entry = dict(batch=bs, **{name: time_forward(model, (xb, tb, yb)) for name, model in models})
        rows.append([bs, f"{entry['bf16']['eager_ms']:.2f}", f"{entry['ours']['eager_ms']:.2f}",
                     f"{entry['bf16']['eager_ms'] / entry['ours']['eager_ms']:.2f}x",
                     graph_cell(entry["bf16"]["graph_ms"]), graph_cell(entry["ours"]["graph_ms"]),
                     graph_ratio(entry["bf16"], entry["ours"]),
                     f"{entry['bf16']['peak_bytes'] / 2**30:.2f}", f"{entry['ours']['peak_bytes'] / 2**30:.2f}"])
        out.append(entry)
    res["forward"] = out
    for entry in out:
        e, a = entry["ours"], entry["ours, norms apart"]
        print(f"batch {entry['batch']}: ours with diffusers' block forward (adaLN as its own passes): eager "
              f"{a['eager_ms']:.2f} ms, graph {graph_cell(a['graph_ms'])} ms; with the adaLN inside the quantize "
              f"launches: {e['eager_ms']:.2f} / {graph_cell(e['graph_ms'])} ms")
        c = entry["bf16, contiguous stream"]
        print(f"batch {entry['batch']}: bf16 with a contiguous residual stream: eager {c['eager_ms']:.2f} ms, graph "
              f"{graph_cell(c['graph_ms'])} ms")
        f = entry["ours, fast rotation"]
        print(f"batch {entry['batch']}: ours with the fast rotation (split=False): eager {f['eager_ms']:.2f} ms, graph "
              f"{graph_cell(f['graph_ms'])} ms")
        b, o = entry["bf16, as sampling runs it"], entry["ours, as sampling runs it"]
        print(f"batch {entry['batch']}: fp32 input under bf16 autocast (how RobuQDiTPipeline calls the model): bf16 "
              f"graph {graph_cell(b['graph_ms'])} ms, ours {graph_cell(o['graph_ms'])} ms")
    table(f"DiT-XL/2 forward (ms, median), bf16 vs packed W1.58A{bits}",
          ["batch", "bf16 eager", "ours eager", "ratio", "bf16 graph", "ours graph", "ratio", "bf16 peak GiB",
           "ours peak GiB"], rows)
    try:
        sampling_bench(res, [("bf16", bf16), ("ours", packed), ("bf16, contiguous stream", bf16_contiguous),
                             ("ours, fast rotation", fast)])
    except Exception as e:  # noqa: BLE001  (keep the tables above in the JSON)
        res["sampling"] = f"failed: {type(e).__name__}: {e}"
        print(f"sampling benchmark failed: {type(e).__name__}: {e}")
    del packed, norms_apart, fast, bf16_contiguous, models
    torchao_bench(res, bf16, batches, torchao)  # last: its compile can take minutes, the tables above are out
    del bf16, teacher


class AutocastFP32Input(torch.nn.Module):
    """``model`` called as the sampling loop calls it (``robuq.evaluation.sampling.denoise``): fp32
    latents under bf16 autocast."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, timestep, class_labels):
        with torch.autocast("cuda", torch.bfloat16):
            return self.model(x.float(), timestep=timestep, class_labels=class_labels)


def kernel_profile(res, models, args):
    """GPU time per forward by kernel: where each model's time goes."""
    out = {}
    for name, model in models:
        with torch.no_grad():
            out[name] = profile_kernels(lambda: model(args[0], timestep=args[1], class_labels=args[2]),
                                        f"{name} forward, batch {args[0].shape[0]}")
    res["kernel_profile"] = out


def graph_cell(ms):
    return "n/a" if ms is None else f"{ms:.2f}"


def graph_ratio(base, ours):
    """base / ours of two time_forward entries' CUDA-graph times ("n/a" where a capture failed)."""
    return "n/a" if None in (base["graph_ms"], ours["graph_ms"]) else f"{base['graph_ms'] / ours['graph_ms']:.2f}x"


def time_forward(model, args):
    """Eager median ms, CUDA-graph median ms (None if capture fails) and peak bytes of model(*args)."""
    xb, tb, yb = args
    with torch.no_grad():
        model(xb, timestep=tb, class_labels=yb)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        te = bench(lambda: model(xb, timestep=tb, class_labels=yb), rep=300)
        peak = torch.cuda.max_memory_allocated()
    return dict(eager_ms=te, graph_ms=graph_time(model, args), peak_bytes=peak, activation_peak_bytes=peak - base)


def torchao_bench(res, bf16, batches, torchao="both"):
    """torchao int8 dynamic (where it installs), eager and compiled per block, against the bf16 rows of
    res["forward"] (same run). Each row prints as it is measured: the compile can take minutes."""
    ao = torchao_int8(bf16) if torchao != "none" else ("not run (--torchao none)",)
    res["torchao"] = ao[0] if isinstance(ao, tuple) else "int8 dynamic activation, int8 weight"
    print(f"\ntorchao: {res['torchao']}", flush=True)
    if isinstance(ao, tuple):
        return
    models = [("torchao int8", ao)]
    if torchao == "both":  # compiled per block, as torchao's docs advise compiling
        # with a contiguous stream: otherwise block 0's transposed input costs a second compile (P77:
        # minutes each on the device machine)
        models.append(("torchao int8, compiled", compiled_per_block(contiguous_stream(torchao_int8(bf16)))))
    rows = []
    for name, model in models:
        for entry in res["forward"]:
            args = inputs(entry["batch"], torch.bfloat16)
            t0 = time.time()
            with torch.no_grad():
                model(args[0], timestep=args[1], class_labels=args[2])  # compiles, for the compiled model
            torch.cuda.synchronize()
            first_s = time.time() - t0
            entry[name] = dict(time_forward(model, args), first_call_s=first_s)
            e, b = entry[name], entry["bf16"]
            rows.append([name, entry["batch"], f"{first_s:.1f}", f"{e['eager_ms']:.2f}", graph_cell(e["graph_ms"]),
                         f"{b['eager_ms'] / e['eager_ms']:.2f}x", graph_ratio(b, e)])
            print(f"  {' | '.join(str(c) for c in rows[-1])}", flush=True)
    table("DiT-XL/2 forward (ms, median), torchao int8 dynamic; ratios: bf16 (same run) / torchao",
          ["model", "batch", "first call s", "eager", "graph", "eager ratio", "graph ratio"], rows)


def torchao_only(res, batches, torchao):
    """The bf16 forward per batch, then torchao_bench against it (``--only-torchao``)."""
    bf16 = build_xl(torch.bfloat16).eval()
    res["forward"] = [dict(batch=bs, bf16=time_forward(bf16, inputs(bs, torch.bfloat16))) for bs in batches]
    for entry in res["forward"]:
        print(f"bf16, batch {entry['batch']}: eager {entry['bf16']['eager_ms']:.2f} ms, graph "
              f"{graph_cell(entry['bf16']['graph_ms'])} ms", flush=True)
    torchao_bench(res, bf16, batches, torchao)


def torchao_int8(bf16):
    """A copy of the bf16 model under torchao's int8 dynamic-activation / int8-weight config (every
    nn.Linear), or a one-item tuple with the reason it is unavailable."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        from torchao.quantization import quantize_ as ao_quantize_

        model = copy.deepcopy(bf16)
        ao_quantize_(model, Int8DynamicActivationInt8WeightConfig())
        xb, tb, yb = inputs(2, torch.bfloat16)
        with torch.no_grad():
            model(xb, timestep=tb, class_labels=yb)
        return model
    except Exception as e:  # noqa: BLE001  (not installed, or built for another torch)
        return (f"unavailable: {type(e).__name__}: {str(e)[:160]}",)


def contiguous_stream(model):
    """``model`` with its residual stream made contiguous after the patch embedding (diffusers hands
    the first block a transposed view and the others contiguous tensors)."""
    model.pos_embed.register_forward_hook(lambda module, args, out: out.contiguous())
    return model


def compiled_per_block(model):
    """``model`` with each transformer block compiled in place (regional compilation, as torch's
    recipe for repeated blocks and our own ``compile_blocks`` do): one block's graph serves all 28
    blocks of the same input layout. ``torch.compile(model)`` of DiT-XL/2 under torchao outlasted a
    170 s run (P69); one block's graph took about 4 minutes on the device machine (P77)."""
    for block in model.transformer_blocks:
        block.compile()
    return model


def sampling_bench(res, models, batch=8, steps=250, cfg=4.0):
    """Wall time of ``steps``-step DDPM sampling with CFG (model batch 2 x ``batch``) through
    RobuQDiTPipeline, eager and with CUDAGraphDiT; each (name, model) through the same loop, ratios
    of "bf16" to "ours"."""
    from robuq.deploy import CUDAGraphDiT, RobuQDiTPipeline
    from robuq.evaluation.sampling import make_scheduler

    labels = list(range(batch))
    rows, out = [], {}
    for name, model in models:
        for mode in ("eager", "graph"):
            pipe = RobuQDiTPipeline(CUDAGraphDiT(model) if mode == "graph" else model, make_scheduler("ddpm", True))
            run = lambda n: pipe(labels, guidance_scale=cfg, num_inference_steps=n, output_type="pt",  # noqa: E731
                                 generator=torch.Generator(DEV).manual_seed(0)).images
            run(2)  # compile / capture
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            images = run(steps)
            torch.cuda.synchronize()
            out[f"{name}_{mode}_s"] = time.perf_counter() - t0
            out[f"{name}_{mode}_images"] = images
        diff = (out[f"{name}_graph_images"] - out[f"{name}_eager_images"]).abs().max().item()
        out[f"{name}_graph_vs_eager_max_abs"] = diff
        rows.append([name, f"{out[f'{name}_eager_s']:.2f}", f"{out[f'{name}_graph_s']:.2f}", f"{diff:.1e}"])
    for name, _ in models:
        for mode in ("eager", "graph"):
            del out[f"{name}_{mode}_images"]
    res["sampling"] = dict(batch=batch, steps=steps, cfg=cfg, scheduler="ddpm", **out)
    rows.append(["bf16 / ours", f"{out['bf16_eager_s'] / out['ours_eager_s']:.2f}x",
                 f"{out['bf16_graph_s'] / out['ours_graph_s']:.2f}x", ""])
    table(f"{steps}-step DDPM sampling, batch {batch}, CFG {cfg} (wall s, RobuQDiTPipeline)",
          ["model", "eager", "CUDA graph", "graph vs eager max abs diff"], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--no-forward", action="store_true")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time every packed-GEMM tile candidate")
    ap.add_argument("--profile", type=int, default=None, metavar="BATCH",
                    help="GPU time per forward by kernel at this batch (torch.profiler), bf16 vs ours")
    ap.add_argument("--torchao", choices=["both", "eager", "none"], default="both",
                    help="torchao int8 dynamic rows, where it installs: eager and compiled (torch.compile per "
                         "block adds compile time at each batch size), eager only, or none")
    ap.add_argument("--only-torchao", action="store_true",
                    help="just the bf16 forward and torchao's rows (its compile takes minutes; ours are measured elsewhere)")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, bits=args.bits)
    print(f"GPU: {res['gpu']} | torch {res['torch']} | triton {res['triton']}")
    if args.only_torchao:
        torchao_only(res, args.batches, args.torchao)
    else:
        ceilings(res)
        overheads(res)
        if args.sweep:
            packed_sweep(res)
        if not args.no_layers:
            layer_bench(res, args.tokens, args.bits)
        if not args.no_forward:
            forward_bench(res, args.batches, args.bits, args.profile, args.torchao)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
