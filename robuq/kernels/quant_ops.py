"""Host wrappers around the Triton rotate+quantize kernels (see ``triton_quant``)."""

from __future__ import annotations

import functools

import torch

from robuq.quant.lsq import qrange

from . import triton_quant as tq
from .rotation import RotationLayout, rotation_factors

MODE_IDS = {"static": 0, "rms": 1, "absmax": 2}
# activation fused in front of the rotation (the kernel reads its input h and quantizes act(h))
ACTIVATIONS = {None: 0, "gelu_tanh": 1}
EPS = 1e-6  # robuq.quant.lsq.token_stat's eps


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mode_id(mode: str, stat: str) -> int:
    return 0 if mode == "static" else MODE_IDS[stat]


def _dot_dtype():
    import triton.language as tl

    return tl.float32 if tq.INTERPRET else tl.bfloat16


def _factor_dtype() -> torch.dtype:
    return torch.float32 if tq.INTERPRET else torch.bfloat16


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Launch settings, swept on an H100 by benchmarks/quant_sweep.py (docs/PERFORMANCE.md): persistent
# programs per SM (8; fewer for the [64, 128] tile of K = 4608 with the exact rotation, where registers
# allow no more and 8 queued programs were 5% slower, see below; the one-rounding forward keeps 8
# there, P59 on an H200: 116.7 -> 96.8 us); warps per program by token tile size MP * P (4 everywhere: at
# K = 4608 8 warps took 2x longer, 16 warps 4x); software-pipelining depth of the per-token loop:
# two stages in the backward (the next token's x and dy load while this one computes: 66 -> 60 us
# at K = 1152, 324 -> 278 us at K = 4608 with bf16 input; finite, deterministic and within 4e-3
# of float64 in benchmarks/bwd_diag.py), except for an fp32 [64, 128] tile (fp32 or fp16 x),
# where the prefetched tile cost registers (0.42 -> 0.69 ms); one in the forward (two were 3-10%
# slower).
# The [64, 128] tile with the exact rotation: 2 programs per SM since P64 (H200 QAT launch sweep: fc2's
# forward 123.8 -> 119.4 us, backward 228.0 -> 224.1 us against 4).
PROGRAMS_PER_SM = 8
PROGRAMS_PER_SM_BY_TILE: dict[tuple[int, bool], int] = {(64 * 128, True): 2}  # (tile size, exact rotation)
# bf16 input: keep the token tile and the sign pattern in bf16 (exact: the signs are +-1) instead
# of fp32, halving their registers (benchmarks/quant_sweep.py --x16 compares both).
X16_TILES = True
# Rotate the gradient back with one bf16 product per factor (False) or the exact hi/lo split (True).
# dx leaves the kernel in bf16 anyway; the split doubled the backward's tensor-core work.
GRAD_SPLIT = False
# Round codes with one cvt.rni instruction (libdevice rint) instead of floor and a tie fix-up: the
# same codes, ~20% off both kernels on an H200 (docs/PERFORMANCE.md, P54); the CPU interpreter
# always takes the fix-up.
RINT_ROUNDING = True
NUM_WARPS: dict[int, int] = {}
NUM_STAGES: dict[str, int | None] = {"forward": 1, "backward": 2}  # None: the compiler default
# Unroll factor of the per-token loop (None: the compiler's choice), by direction, and by token tile
# and direction where a sweep found better (benchmarks/quant_sweep.py --unroll; H200, P60): two
# tokens per iteration overlap their chains in the K = 4608 exact forward (129.6 -> 125.0 us at 4
# programs/SM); it slowed the one-rounding forward at its 8/SM, the K = 1152 forward and the backwards.
LOOP_UNROLL: dict[str, int | None] = {"forward": None, "backward": None}
LOOP_UNROLL_BY_TILE: dict[tuple[int, str, bool], int] = {(64 * 128, "forward", True): 2}  # (tile, way, exact)
# Register cap per thread (Triton's maxnreg; None: ptxas's choice, up to 255), by direction. The
# adaLN backwards take 228-255 registers, so 2 programs fit on an SM (benchmarks/kernel_regs.py);
# a cap trades spills for programs (benchmarks/quant_sweep.py --qat_launches --launch_sweep
# --maxnreg; H200, P64 and P66: it paid only in fc1's adaLN backward, at one value, NORM_BACKWARD).
MAX_REGISTERS: dict[str, int | None] = {"forward": None, "backward": None}
# The backward with the adaLN in front, by token tile and quantizers per launch (DiT-XL/2's K = 1152
# tile [64, 32]; q/k/v: 3, fc1: 1): programs per SM and register cap over the settings above, where
# the H200 sweep of a DiT block's QAT launches found better (benchmarks/quant_sweep.py --qat_launches
# --launch_sweep, P64; 2 pipeline stages): q/k/v 182.9 -> 167.5 us at 2 programs per SM, fc1 133.0
# -> 106.0 us at 4 per SM and 128 registers. Other tiles were not swept and keep the defaults. A
# register cap set in MAX_REGISTERS wins over these.
NORM_BACKWARD: dict[tuple[int, int], dict[str, int]] = {
    (64 * 32, 3): {"programs_per_sm": 2},
    (64 * 32, 1): {"programs_per_sm": 4, "maxnreg": 128},
}


# The forward by token tile, quantizers per launch and adaLN in front, where a setting keeps its
# programs within a register boundary: DiT-XL/2's out forward (K = 1152 tile [64, 32], one
# quantizer, no adaLN) takes 67 registers once it stores the rms statistic for the backward, and 8
# programs per SM need <= 64; at a cap of 64 ptxas compiles it without spills (offline, sm_90,
# benchmarks/kernel_regs.py): 26.6 -> 21.4 us on an H200 (P72). The adaLN forwards (q/k/v: three
# quantizers, fc1: one) take 100-105 registers since they hold their sample's scale and shift across
# the token loop, so 4 programs fit on an SM: at the default 8 per SM their runs took two waves, at 4
# they take one (P72: 52.1 -> 50.8 and 38.1 -> 36.8 us). A cap set in MAX_REGISTERS wins over these.
FORWARD: dict[tuple[int, int, bool], dict[str, int]] = {
    (64 * 32, 1, False): {"maxnreg": 64},
    (64 * 32, 3, True): {"programs_per_sm": 4},
    (64 * 32, 1, True): {"programs_per_sm": 4},
}


def _forward(lay: RotationLayout, g: int, norm: bool) -> dict[str, int]:
    """This forward launch's FORWARD overrides (empty where none)."""
    return FORWARD.get((lay.MP * lay.P, g, norm), {})


def _norm_backward(lay: RotationLayout, g: int) -> dict[str, int]:
    """This adaLN backward launch's NORM_BACKWARD overrides (empty where none)."""
    return NORM_BACKWARD.get((lay.MP * lay.P, g), {})


def _grid(m: int, device: torch.device, lay: RotationLayout, split: bool = True, per_sm: int | None = None) -> tuple[int]:
    if tq.INTERPRET or device.type != "cuda":
        return (max(1, min(m, 2)),)
    per_sm = per_sm or PROGRAMS_PER_SM_BY_TILE.get((lay.MP * lay.P, split), PROGRAMS_PER_SM)
    return (max(1, min(m, _sm_count(device.index or 0) * per_sm)),)


def _loop(lay: RotationLayout, x_dtype: torch.dtype, backward: bool, split: bool) -> dict:
    """The token loop's constexprs: pipelining depth and unroll factor."""
    way = "backward" if backward else "forward"
    stages = NUM_STAGES[way]
    if backward and x_dtype != torch.bfloat16 and lay.MP * lay.P >= 64 * 128:
        stages = 1
    return dict(STAGES=stages, UNROLL=LOOP_UNROLL_BY_TILE.get((lay.MP * lay.P, way, split), LOOP_UNROLL[way]))


def _register_cap(backward: bool, default: int | None = None) -> dict:
    """The launch's ``maxnreg`` option, when MAX_REGISTERS (or else the launch's ``default``) sets one."""
    cap = MAX_REGISTERS["backward" if backward else "forward"] or default
    return {} if cap is None else {"maxnreg": cap}


def _warps(lay: RotationLayout) -> int:
    tile = lay.MP * lay.P
    return NUM_WARPS.get(tile, 4)


# Reload the factors per token (from L1/L2) above this tile size instead of keeping them in
# registers across tokens. Off by default: ptxas reported more spills with reloads at [64, 128].
RELOAD_ABOVE = {"forward": 1 << 30, "backward": 1 << 30}


def _reload(lay: RotationLayout, backward: bool) -> bool:
    return lay.MP * lay.P > RELOAD_ABOVE["backward" if backward else "forward"]


def _tile_dtype(x: torch.Tensor, round_to_bf16: bool) -> torch.dtype:
    """The dtype the kernel treats x as: bf16 also for fp32 x rounded on load."""
    if round_to_bf16 and x.dtype == torch.float32 and not tq.INTERPRET:
        return torch.bfloat16
    return x.dtype


def act_id(act: str | None) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown fused activation {act!r}; choose one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def _common(lay: RotationLayout, bits: int, signed: bool, mode: int, x_dtype: torch.dtype, split: bool,
            act: str | None):
    qn, qp = qrange(bits, signed)
    return dict(ACT=act_id(act),
        ROWS=lay.rows, MP=lay.MP, P=lay.P, QN=float(qn), QP=float(qp), SIGN1=(signed and bits == 1), MODE=mode,
        ROTATE=lay.kind != "none", HAS_LEFT=lay.has_left, R_FIRST=lay.r_first,
        # the first product is exact without a split only for bf16 input (x is a bf16 dot operand)
        SPLIT1=(x_dtype != torch.bfloat16 and split), SPLIT2=split, DOT_DT=_dot_dtype(),
        SQRT_N=float(lay.sqrt_n), EPS=EPS, X16=(X16_TILES and x_dtype == torch.bfloat16 and not tq.INTERPRET),
        RINT=RINT_ROUNDING and not tq.INTERPRET,
    )


def rotate_quantize(
    x: torch.Tensor,
    signs: torch.Tensor,
    lay: RotationLayout,
    alpha: torch.Tensor,
    bits: int,
    signed: bool,
    mode: int,
    *,
    want_i8: bool = False,
    want_f8: bool = False,
    out: str | None = None,  # None | "scaled" (q * s_t) | "codes" (q)
    out_dtype: torch.dtype = torch.bfloat16,
    want_stat: bool = False,
    split: bool = True,
    round_to_bf16: bool = False,
    act: str | None = None,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    want_norm_stats: bool = False,
) -> dict[str, torch.Tensor]:
    """x [M, K] -> codes for each of the G rows of ``alpha`` ([G, M] per token, or [G, 1]) of
    ``act(x)`` (``act="gelu_tanh"``: x is the pre-activation; None: x itself), or with ``norm =
    (scale [B, K], shift [B, K], eps)`` of the adaLN ``LayerNorm(x) * (1 + scale_b) + shift_b``,
    where token m belongs to sample b = m // (M / B) (rows of scale and shift may be strided views).

    ``round_to_bf16``: round an fp32 x to bf16 as it is loaded (what bf16 autocast does to a
    linear's input), which runs the faster bf16 tile. Returns a dict with 's' [G, M] fp32 and, as
    asked, 'i8' / 'f8' / 'out' [G, M, K], 'stat' [M] and (``want_norm_stats``, with ``norm``)
    'norm_stats' [2, M] fp32: each token's LayerNorm mean and rstd, which
    ``rotate_quantize_backward(norm_stats=...)`` reads instead of recomputing them.
    """
    if x.dim() != 2 or x.shape[1] != lay.dim:
        raise ValueError(f"rotate_quantize expects [M, {lay.dim}], got {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    g = alpha.shape[0]
    alpha = alpha.float().contiguous()
    dev = x.device
    res: dict[str, torch.Tensor] = {"s": torch.empty(g, m, device=dev, dtype=torch.float32)}
    dummy = res["s"]
    scale, shift, ln_eps, per_sample, stride_mod = _norm_args(norm, x, act, dummy, "rotate_quantize")
    i8 = torch.empty(g, m, k, device=dev, dtype=torch.int8) if want_i8 else dummy
    f8 = torch.empty(g, m, k, device=dev, dtype=torch.float8_e4m3fn) if want_f8 else dummy
    o = torch.empty(g, m, k, device=dev, dtype=out_dtype) if out else dummy
    st = torch.empty(m, device=dev, dtype=torch.float32) if want_stat else dummy
    if want_norm_stats and norm is None:
        raise ValueError("rotate_quantize: want_norm_stats needs norm (the statistics are the adaLN's LayerNorm's)")
    nst = torch.empty(2, m, device=dev, dtype=torch.float32) if want_norm_stats else dummy
    if m:
        tdt = _tile_dtype(x, round_to_bf16)
        f = rotation_factors(lay.dim, lay.kind, None if lay.kind != "block" else lay.P, dev, _factor_dtype())
        settings = _forward(lay, g, norm is not None)
        grid = _grid(m, dev, lay, split, per_sm=settings.get("programs_per_sm"))
        n_iter, chunks = triton_cdiv(m, grid[0]), 1
        if norm is not None:  # programs in runs of one sample's tokens, none of them empty
            b = m // per_sample
            n_iter = triton_cdiv(per_sample, max(1, min(per_sample, grid[0] // b)))
            chunks = triton_cdiv(per_sample, n_iter)
            grid = (b * chunks,)
        tq.rotq_fwd_kernel[grid](
            x, signs.float().contiguous(), f["left"], f["right"], alpha, i8, f8, o, res["s"], st, scale, shift, nst,
            m, n_iter, x.stride(0), alpha.stride(0), alpha.stride(1) if alpha.shape[1] > 1 else 0, m * k, m,
            per_sample, stride_mod, chunks, NORM=norm is not None, LN_EPS=ln_eps, W_NSTAT=want_norm_stats,
            G=g, RELOAD=_reload(lay, backward=False), **_loop(lay, tdt, backward=False, split=split),
            W_I8=want_i8, W_F8=want_f8, W_OUT=out is not None, OUT_SCALED=(out == "scaled"), W_STAT=want_stat,
            num_warps=_warps(lay), **_register_cap(False, settings.get("maxnreg")),
            **_common(lay, bits, signed, mode, tdt, split, act),
        )
    if want_i8:
        res["i8"] = i8
    if want_f8:
        res["f8"] = f8
    if out:
        res["out"] = o
    if want_stat:
        res["stat"] = st
    if want_norm_stats:
        res["norm_stats"] = nst
    return res


def _norm_args(norm, x: torch.Tensor, act: str | None, dummy: torch.Tensor, caller: str):
    """(scale, shift, eps, tokens per sample, row stride) kernel arguments of an adaLN ``norm`` (or
    dummies); errors name ``caller``."""
    if norm is None:
        return dummy, dummy, 0.0, 1, 0
    scale, shift, eps = norm
    m, k = x.shape
    if act is not None:
        raise ValueError(f"{caller}: norm and act cannot be combined (the adaLN feeds a linear, not a GELU)")
    if scale.dim() != 2 or scale.shape != shift.shape or scale.shape[1] != k or scale.stride(1) != 1 or (
            shift.stride(0) != scale.stride(0)) or scale.shape[0] == 0 or m % scale.shape[0]:
        raise ValueError(f"{caller}: norm scale and shift must be [B, {k}] with unit column stride and one "
                         f"row stride, B dividing the {m} tokens; got {tuple(scale.shape)} / {tuple(shift.shape)}")
    return scale, shift, float(eps), m // scale.shape[0], scale.stride(0)


def norm_chunks(m: int, samples: int, device: torch.device, lay: RotationLayout, g: int) -> int:
    """Programs per sample of the backward kernel with the adaLN in front and ``g`` quantizers (each
    sums its own run of the sample's tokens): the rows of its partial scale and shift gradients."""
    per_sm = _norm_backward(lay, g).get("programs_per_sm")
    return max(1, min(m // samples, _grid(m, device, lay, per_sm=per_sm)[0] // samples))


def rotate_quantize_backward(
    x: torch.Tensor,
    grad: torch.Tensor,
    signs: torch.Tensor,
    lay: RotationLayout,
    alpha: torch.Tensor,
    bits: int,
    signed: bool,
    mode: int,
    split: bool = True,
    round_to_bf16: bool = False,
    act: str | None = None,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    out_dtype: torch.dtype | None = None,
    norm_partials: bool = False,
    chunks: int | None = None,
    norm_stats: torch.Tensor | None = None,
    stat: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dx [M, K] in x's dtype, ga = per-token dL/dalpha) for the LSQ straight-through gradient.

    One quantizer: ``grad`` [M, K] = dL/d(fake-quantized output), ``alpha`` [M] per token or [1],
    ga [M] fp32. G quantizers of the same x (``rotate_quantize`` with G alpha rows): ``grad``
    [G, M, K], ``alpha`` [G, M] or [G, 1], ga [G, M], and dx sums their gradients.
    ``round_to_bf16`` and ``act`` must be what the forward used (the rotation is recomputed from x);
    with ``act``, dx is the gradient with respect to the pre-activation x. With ``norm`` (the
    forward's adaLN, see ``rotate_quantize``) dx is the residual stream's gradient and two more
    results follow: dL/dscale and dL/dshift [B, K] in scale's dtype (``norm_partials``: the programs'
    fp32 partial sums [chunks, B, K] instead, whose sum over dim 0 the caller takes, e.g. inside a
    compiled graph where it fuses with the consumer; ``chunks``, by default ``norm_chunks``);
    ``norm_stats``: the forward's ``rotate_quantize(want_norm_stats=True)`` result, read instead of
    recomputing the LayerNorm's statistics (two reductions fewer per token, and the forward's codes exactly:
    a recompute can differ in the last bit on the GPU); ``stat``
    (rms mode only): the forward's ``rotate_quantize(want_stat=True)`` statistic [M], read instead of
    recomputed (one reduction fewer per token). With
    ``out_dtype``, a last result follows: the forward's ``q * s_t`` [G, M, K]
    (``rotate_quantize(out="scaled")``) in that dtype.
    """
    grouped = grad.dim() == 3
    if chunks is not None and chunks < 1:
        raise ValueError(f"rotate_quantize_backward: chunks must be at least 1 (programs per sample), got {chunks}")
    if x.dim() != 2 or x.shape[1] != lay.dim or grad.shape[grouped:] != x.shape or (
            grouped and alpha.shape[0] != grad.shape[0]):
        raise ValueError(f"rotate_quantize_backward expects x [M, {lay.dim}] and grad [M, {lay.dim}] or "
                         f"[G, M, {lay.dim}] with alpha [G, M or 1], got {tuple(x.shape)}, {tuple(grad.shape)} "
                         f"and {tuple(alpha.shape)}")
    x = x.contiguous()
    grad = grad.contiguous()
    m, k = x.shape
    alpha = alpha.float().reshape(grad.shape[0] if grouped else 1, -1).contiguous()
    g = alpha.shape[0]
    dx = torch.empty_like(x)
    ga = torch.empty(g, m, device=x.device, dtype=torch.float32)
    scale, shift, ln_eps, per_sample, stride_mod = _norm_args(norm, x, act, ga, "rotate_quantize_backward")
    if norm_stats is not None and (norm is None or norm_stats.shape != (2, m) or norm_stats.dtype != torch.float32):
        raise ValueError(f"rotate_quantize_backward: norm_stats must be the forward's [2, {m}] fp32 LayerNorm "
                         f"statistics of the same norm, got {tuple(norm_stats.shape)} {norm_stats.dtype}"
                         + ("" if norm is not None else " without norm"))
    if stat is not None and (mode != MODE_IDS["rms"] or stat.shape != (m,) or stat.dtype != torch.float32):
        raise ValueError(f"rotate_quantize_backward: stat must be the forward's [{m}] fp32 rms statistic (mode "
                         f"{MODE_IDS['rms']}), got {tuple(stat.shape)} {stat.dtype} in mode {mode}")
    grid = _grid(m, x.device, lay)
    n_iter, cap = triton_cdiv(m, grid[0]), None
    if norm is not None:  # programs in runs of one sample's tokens; partial scale/shift gradients
        b = norm[0].shape[0]  # samples (m // per_sample, also for m = 0)
        chunks = chunks or norm_chunks(m, b, x.device, lay, g)
        cap = _norm_backward(lay, g).get("maxnreg")
        grid, n_iter = (b * chunks,), triton_cdiv(per_sample, chunks)
        dscale = torch.empty(chunks, b, k, device=x.device, dtype=torch.float32)
        dshift = torch.empty_like(dscale)
    else:
        chunks, dscale, dshift = 1, ga, ga
    o = torch.empty(g, m, k, device=x.device, dtype=out_dtype) if out_dtype is not None else ga
    if m:
        tdt = _tile_dtype(x, round_to_bf16)
        f = rotation_factors(lay.dim, lay.kind, None if lay.kind != "block" else lay.P, x.device, _factor_dtype())
        tq.rotq_bwd_kernel[grid](
            x, grad, signs.float().contiguous(), f["left"], f["right"], f["left_t"], alpha, dx, ga,
            scale, shift, dscale, dshift, o, ga if norm_stats is None else norm_stats.contiguous(),
            ga if stat is None else stat.contiguous(), m, n_iter, x.stride(0), grad.stride(-2), alpha.stride(0),
            1 if alpha.shape[1] > 1 else 0, m * k, per_sample, stride_mod, chunks, G=g, NORM=norm is not None,
            LN_EPS=ln_eps, W_OUT=out_dtype is not None, R_NSTAT=norm_stats is not None, R_STAT=stat is not None,
            num_warps=_warps(lay), **_register_cap(True, cap), RELOAD=_reload(lay, backward=True),
            **_loop(lay, tdt, backward=True, split=split), GSPLIT=GRAD_SPLIT or tdt != torch.bfloat16,
            **_common(lay, bits, signed, mode, tdt, split, act),
        )
    ga = ga if grouped else ga[0]
    res = (dx, ga)
    if norm is not None:
        if not m:
            dscale.zero_(), dshift.zero_()
        if not norm_partials:
            dscale, dshift = dscale.sum(0).to(norm[0].dtype), dshift.sum(0).to(norm[0].dtype)
        res += (dscale, dshift)
    if out_dtype is not None:
        res += (o if grouped else o[0],)
    return res
