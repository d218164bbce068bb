"""Triton kernels: fused Hadamard rotation + per-token LSQ quantization, forward and backward.

One program walks over tokens (a persistent grid). For each token it loads x [rows, P] (zero
padded to [MP, P]), multiplies by the random signs, rotates with two tensor-core products
(``A^T X B``, see ``robuq.kernels.rotation``), takes the per-token statistic, and quantizes:

    s_t = alpha_t * max(stat(y_t), eps)        (dynamic; static: s_t = alpha_t)
    q   = round_half_even(clamp(y / s_t, -Qn, Qp))          (1-bit signed: +-1 by sign)

Precision: the first product has an exact bf16 operand (bf16 input, +-1 factor) and fp32
accumulation; an fp32 operand is split into bf16 hi + lo parts (two products, ~16 mantissa
bits), so rotated values match an fp32 rotation to ~1e-5 relative and codes differ from a
float64 reference only for values within that distance of a rounding boundary. ``split=False``
rounds the intermediate to bf16 once (faster, ~1e-3 relative).

``NORM`` fuses the adaLN in front: the kernel reads the residual stream x and quantizes
u = LayerNorm(x) * (1 + scale_b) + shift_b with its sample's scale and shift, so a DiT block's
norm and modulation passes never reach memory. The backward recomputes u from x, takes du as
below, and goes on through the modulation and the LayerNorm (x_hat = LayerNorm(x), g = du (1 + scale_b)):

    dscale_b = sum_t du_t x_hat_t,   dshift_b = sum_t du_t       (partial sums per program)
    dx       = rstd (g - mean(g) - x_hat mean(g x_hat))

The forward can write each token's LayerNorm mean and rstd (``W_NSTAT``, 8 bytes per token); the
backward then reads them (``R_NSTAT``) instead of taking the LayerNorm's two reductions again
before its rotation can start, and sees the forward's x_hat and codes exactly (a recompute can
differ from the forward's in the last bit on the GPU, where the two kernels reduce in other orders).
Likewise the backward can read the forward's rms statistic (``R_STAT``; the forward's ``W_STAT``
output) instead of reducing the rotated token again: one reduction fewer on each token's chain.

``ACT = 1`` fuses a GELU (tanh form) in front: the kernel reads the pre-activation h, quantizes
GELU(h), and the backward multiplies dx by GELU'(h), so the activation pass of an MLP (diffusers'
``GELU`` module feeding the output projection) never reaches memory.

Outputs (each optional): int8 codes, e4m3 codes (integers |q| <= 16 are exact in e4m3), a dense
tensor ``q * s_t`` (QAT forward) or ``q`` (bf16 codes for the A6-A8 bf16 GEMM), s_t and stat.
Several quantizers that share one input and one rotation (q/k/v projections) are served by one
launch: ``G`` alpha rows give ``G`` code tensors from a single read and rotation of x; the backward
takes their ``G`` gradients, sums them in the rotated basis and rotates back once.

The backward kernel recomputes the rotation from x exactly as the forward did (so the clamp masks
and codes are the forward's), applies the LSQ straight-through gradient, and rotates the gradient
back; ``GSPLIT=False`` rounds the gradient to bf16 before each product of that last rotation (a
bf16 gradient, like any bf16 matmul's backward, at half the tensor-core work). ``W_OUT`` also
writes ``q * s_t`` as the forward would have (the same codes and steps, so the same bits), so a
QAT forward whose GEMM read the e4m3 codes need not keep that tensor for the weight gradient:

    gs_t   = sum_i G_i (q_i - m_i v_i)                         (dL/ds_t)
    dy_i   = G_i m_i + gs_t * alpha_t * dstat/dy_i             (dynamic; stat > eps; summed over G)
    dx     = (A dy B^T) / sqrt(n) * d                          (the rotation transposed)
    ga_t   = gs_t * stat_t   (dynamic)  or  gs_t  (static)     (per-token dL/dalpha)
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._compat import INTERPRET  # noqa: E402  (patches the CPU interpreter when it is on)


@triton.jit
def _round_half_even(v, RINT: tl.constexpr = False):
    """Round to nearest, ties to even: one ``cvt.rni`` instruction (libdevice rint) on the GPU with
    RINT, else floor and a tie fix-up (the CPU interpreter has no libdevice)."""
    if RINT:
        return libdevice.rint(v)
    f = tl.floor(v + 0.5)
    tie = (f - v) == 0.5
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(tie & odd, f - 1.0, f)


@triton.jit
def _load_signs(SIGNS, offs, mask, X16: tl.constexpr):
    sg = tl.load(SIGNS + offs, mask=mask, other=0.0)
    if X16:
        sg = sg.to(tl.bfloat16)
    else:
        sg = sg.to(tl.float32)
    return sg


@triton.jit
def _gelu_tanh(h):
    """GELU, tanh form: 0.5 h (1 + tanh(u)) = h * sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3)."""
    u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    return h / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _gelu_tanh_grad(h):
    """d GELU / dh = s + h s (1 - s) 2 du/dh, s = sigmoid(2u)."""
    u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    return s + h * s * (1.0 - s) * (2.0 * 0.7978845608028654) * (1.0 + 3.0 * 0.044715 * h * h)


@triton.jit
def _signed_token(ptrs, mask, sg, X16: tl.constexpr, ACT: tl.constexpr):
    """act(x) * d for one token tile. ACT = 1: x is a pre-activation h and the tile is GELU(h),
    rounded to h's dtype as torch's GELU rounds its output. X16 (bf16 dot; x bf16, or fp32 rounded
    to bf16 here): a bf16 tile, exact (d is +-1), which halves the registers of the tile and of the
    sign pattern."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if ACT == 1:
        x = _gelu_tanh(x.to(tl.float32)).to(x.dtype)
    return _signed(x, sg, X16)


@triton.jit
def _signed(x, sg, X16: tl.constexpr):
    """x * d as the dot operand: bf16 (exact, d is +-1) for X16, else fp32."""
    if X16:
        y = x.to(tl.bfloat16) * sg
    else:
        y = x.to(tl.float32) * sg
    return y


@triton.jit
def _normalized(ptrs, mask, K: tl.constexpr, LN_EPS: tl.constexpr):
    """(x, LayerNorm(x) = (x - mean) * rstd in fp32, mean, rstd) of one token tile (padded elements 0)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    mean = tl.sum(tl.sum(xf, axis=1), axis=0) / K
    d = tl.where(mask, xf - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / K + LN_EPS)
    return x, d * rstd, mean, rstd


@triton.jit
def _normalized_from(ptrs, mask, mean, rstd):
    """(x, LayerNorm(x)) from the token's saved mean and rstd: _normalized's operations without its
    two reductions, so the forward's x_hat."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    d = tl.where(mask, x.to(tl.float32) - mean, 0.0)
    return x, d * rstd


@triton.jit
def _modulated(x, xhat, sc, sh, sg, X16: tl.constexpr):
    """adaLN: LayerNorm(x) * (1 + scale) + shift, in fp32 (no affine), rounded once to x's dtype,
    times d; sc, sh: the token's sample's scale and shift tiles (padded elements 0, so padded
    outputs stay 0)."""
    y = (xhat * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)).to(x.dtype)
    return _signed(y, sg, X16)


@triton.jit
def _right(z, R, SPLIT: tl.constexpr, DOT_DT: tl.constexpr):
    """z @ R, z fp32, R exact in DOT_DT."""
    zh = z.to(DOT_DT)
    acc = tl.dot(zh, R, out_dtype=tl.float32)
    if SPLIT:
        zl = (z - zh.to(tl.float32)).to(DOT_DT)
        acc = tl.dot(zl, R, acc)
    return acc


@triton.jit
def _left(L, z, SPLIT: tl.constexpr, DOT_DT: tl.constexpr):
    """L @ z, z fp32, L exact in DOT_DT."""
    zh = z.to(DOT_DT)
    acc = tl.dot(L, zh, out_dtype=tl.float32)
    if SPLIT:
        zl = (z - zh.to(tl.float32)).to(DOT_DT)
        acc = tl.dot(L, zl, acc)
    return acc


@triton.jit
def _rotate(x, L, R, ROTATE: tl.constexpr, HAS_LEFT: tl.constexpr, R_FIRST: tl.constexpr,
            SPLIT1: tl.constexpr, SPLIT2: tl.constexpr, DOT_DT: tl.constexpr):
    """A^T X B unnormalised (fp32): the kernels fold 1 / sqrt(n) into per-token scalars."""
    if ROTATE:
        if HAS_LEFT:
            if R_FIRST:
                y = _left(L, _right(x, R, SPLIT1, DOT_DT), SPLIT2, DOT_DT)
            else:
                y = _right(_left(L, x, SPLIT1, DOT_DT), R, SPLIT2, DOT_DT)
        else:
            y = _right(x, R, SPLIT1, DOT_DT)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _stat(y, MODE: tl.constexpr, K: tl.constexpr, SQRT_N: tl.constexpr):
    """The per-token statistic of the rotated token y / SQRT_N, from the unnormalised y."""
    if MODE == 1:
        st = tl.sqrt(tl.sum(tl.sum(y * y, axis=1), axis=0) / K) / SQRT_N
    elif MODE == 2:
        st = tl.max(tl.max(tl.abs(y), axis=1), axis=0) / SQRT_N
    else:
        st = tl.full((), 1.0, tl.float32)
    return st


@triton.jit
def _add2(a, b, c, d):
    """Combine of a two-value sum (tl.reduce over a pair of tiles)."""
    return a + c, b + d


@triton.jit
def _token_step(alpha_ptr, st, MODE: tl.constexpr):
    """(alpha_t, s_t): s_t = alpha_t * stat (dynamic) or alpha_t (static)."""
    alpha = tl.load(alpha_ptr)
    if MODE == 0:
        s = alpha
    else:
        s = alpha * st
    return alpha, s


@triton.jit
def _quantize(v, QN: tl.constexpr, QP: tl.constexpr, SIGN1: tl.constexpr, RINT: tl.constexpr):
    v = tl.minimum(tl.maximum(v, -QN), QP)
    if SIGN1:
        q = tl.where(v >= 0.0, 1.0, -1.0)
    else:
        q = _round_half_even(v, RINT)
    return q


@triton.jit
def _token_tile(ROWS: tl.constexpr, MP: tl.constexpr, P: tl.constexpr):
    """(offs [MP, P] of a token's elements, mask of its ROWS real rows, offsets of the left
    factor [MP, MP] and of the right factor [P, P])."""
    ri = tl.arange(0, MP)
    rj = tl.arange(0, P)
    offs = ri[:, None] * P + rj[None, :]
    mask = (ri[:, None] < ROWS) & (rj[None, :] < P)
    return offs, mask, ri[:, None] * MP + ri[None, :], rj[:, None] * P + rj[None, :]


@triton.jit
def _load_factors(LEFT, RIGHT, l_offs, r_offs):
    return tl.load(LEFT + l_offs), tl.load(RIGHT + r_offs)


@triton.jit
def _token_of(pid, it, nprog, M):
    """(token, valid) of a program's it-th sweep: the last sweep repeats the final token (valid is
    False; its writes are masked)."""
    t = pid + it * nprog
    return tl.minimum(t, M - 1), t < M


@triton.jit
def _sample_token_of(pid, it, chunks, n_iter, tokens_per_sample):
    """(token, valid) of the it-th step of program pid's run: run pid % chunks of sample pid // chunks
    (the adaLN launches; past the sample's last token the final token repeats, valid False)."""
    j = (pid % chunks) * n_iter + it
    return (pid // chunks) * tokens_per_sample + tl.minimum(j, tokens_per_sample - 1), j < tokens_per_sample


@triton.jit
def rotq_fwd_kernel(
    X, SIGNS, LEFT, RIGHT, ALPHA, CODES_I8, CODES_F8, OUT, S, STAT, SCALE, SHIFT, NSTAT,
    M, n_iter, stride_x, alpha_sg, alpha_st, codes_sg, s_sg, tokens_per_sample, stride_mod, chunks,
    ROWS: tl.constexpr, MP: tl.constexpr, P: tl.constexpr,
    QN: tl.constexpr, QP: tl.constexpr, SIGN1: tl.constexpr, MODE: tl.constexpr, G: tl.constexpr,
    ROTATE: tl.constexpr, HAS_LEFT: tl.constexpr, R_FIRST: tl.constexpr,
    SPLIT1: tl.constexpr, SPLIT2: tl.constexpr, DOT_DT: tl.constexpr,
    SQRT_N: tl.constexpr, EPS: tl.constexpr,
    W_I8: tl.constexpr, W_F8: tl.constexpr, W_OUT: tl.constexpr, OUT_SCALED: tl.constexpr, W_STAT: tl.constexpr,
    RELOAD: tl.constexpr, STAGES: tl.constexpr, X16: tl.constexpr, ACT: tl.constexpr,
    NORM: tl.constexpr, LN_EPS: tl.constexpr, RINT: tl.constexpr, UNROLL: tl.constexpr, W_NSTAT: tl.constexpr,
):
    # NORM: program pid takes a contiguous run of the tokens of sample pid // chunks (as the backward)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs, mask, l_offs, r_offs = _token_tile(ROWS, MP, P)
    sg = _load_signs(SIGNS, offs, mask, X16)
    if not RELOAD:
        L, R = _load_factors(LEFT, RIGHT, l_offs, r_offs)
    K: tl.constexpr = ROWS * P
    if NORM:  # the program's sample's scale and shift, loaded once
        sample = pid // chunks
        sc = tl.load(SCALE + sample * stride_mod + offs, mask=mask, other=0.0)
        sh = tl.load(SHIFT + sample * stride_mod + offs, mask=mask, other=0.0)
    # STAGES > 1: the next token's loads overlap this one's work; UNROLL: two tokens' chains interleave
    for it in tl.range(0, n_iter, num_stages=STAGES, loop_unroll_factor=UNROLL):
        if NORM:
            t, ok = _sample_token_of(pid, it, chunks, n_iter, tokens_per_sample)
        else:
            t, ok = _token_of(pid, it, nprog, M)
        mtok = mask & ok
        if RELOAD:  # large tiles: keep the factors out of registers (L1/L2-resident reloads)
            L, R = _load_factors(LEFT, RIGHT, l_offs, r_offs)
        if NORM:
            xr, xhat, mean, rstd = _normalized(X + t * stride_x + offs, mtok, K, LN_EPS)
            if W_NSTAT:  # the LayerNorm's statistics, for the backward
                tl.store(NSTAT + t, mean, mask=ok)
                tl.store(NSTAT + M + t, rstd, mask=ok)
            x = _modulated(xr, xhat, sc, sh, sg, X16)
        else:
            x = _signed_token(X + t * stride_x + offs, mtok, sg, X16, ACT)
        y = _rotate(x, L, R, ROTATE, HAS_LEFT, R_FIRST, SPLIT1, SPLIT2, DOT_DT)  # sqrt(n) * the rotated token
        st = _stat(y, MODE, K, SQRT_N)
        st = tl.maximum(st, EPS)
        for g in tl.static_range(G):
            alpha, s = _token_step(ALPHA + g * alpha_sg + t * alpha_st, st, MODE)
            q = _quantize(y * (1.0 / (s * SQRT_N)), QN, QP, SIGN1, RINT)
            base = g * codes_sg + t * K + offs
            if W_I8:
                tl.store(CODES_I8 + base, q.to(tl.int8), mask=mtok)
            if W_F8:
                tl.store(CODES_F8 + base, q.to(tl.float8e4nv), mask=mtok)
            if W_OUT:
                if OUT_SCALED:
                    tl.store(OUT + base, (q * s).to(OUT.dtype.element_ty), mask=mtok)
                else:
                    tl.store(OUT + base, q.to(OUT.dtype.element_ty), mask=mtok)
            tl.store(S + g * s_sg + t, s, mask=ok)
        if W_STAT:
            tl.store(STAT + t, st, mask=ok)


# n_iter is not specialised: on the H100 the K = 1152 backward compiled for n_iter == 1 (as many
# programs as tokens) faulted with an illegal memory access (benchmarks/bwd_diag.py, docs/PERFORMANCE.md).
@triton.jit(do_not_specialize=["n_iter"])
def rotq_bwd_kernel(
    X, GRAD, SIGNS, LEFT, RIGHT, LEFT_T, ALPHA, DX, GA, SCALE, SHIFT, DSCALE, DSHIFT, OUT, NSTAT, STAT,
    M, n_iter, stride_x, stride_g, alpha_sg, alpha_st, grad_sg, tokens_per_sample, stride_mod, chunks,
    ROWS: tl.constexpr, MP: tl.constexpr, P: tl.constexpr,
    QN: tl.constexpr, QP: tl.constexpr, SIGN1: tl.constexpr, MODE: tl.constexpr, G: tl.constexpr,
    ROTATE: tl.constexpr, HAS_LEFT: tl.constexpr, R_FIRST: tl.constexpr,
    SPLIT1: tl.constexpr, SPLIT2: tl.constexpr, DOT_DT: tl.constexpr,
    SQRT_N: tl.constexpr, EPS: tl.constexpr, RELOAD: tl.constexpr, STAGES: tl.constexpr, X16: tl.constexpr,
    GSPLIT: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, LN_EPS: tl.constexpr, W_OUT: tl.constexpr,
    RINT: tl.constexpr, UNROLL: tl.constexpr, R_NSTAT: tl.constexpr, R_STAT: tl.constexpr,
):
    # B (Sylvester) is symmetric, so the transposed rotation is A dy B: no B^T needed.
    # NORM: program pid takes a contiguous run of the tokens of sample pid // chunks, so it sums its
    # scale and shift gradients in registers and writes one partial [K] row each (no atomics).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs, mask, l_offs, r_offs = _token_tile(ROWS, MP, P)
    sg = _load_signs(SIGNS, offs, mask, X16)
    if not RELOAD:
        L, R = _load_factors(LEFT, RIGHT, l_offs, r_offs)
        LT = tl.load(LEFT_T + l_offs)
    K: tl.constexpr = ROWS * P
    sample = pid // chunks
    acc_sc = tl.zeros([MP, P], tl.float32)
    acc_sh = tl.zeros([MP, P], tl.float32)
    if NORM:  # the program's sample's scale and shift, loaded once
        sc = tl.load(SCALE + sample * stride_mod + offs, mask=mask, other=0.0)
        sh = tl.load(SHIFT + sample * stride_mod + offs, mask=mask, other=0.0)
    # STAGES > 1: the next token's loads overlap this one's work; UNROLL: two tokens' chains interleave
    for it in tl.range(0, n_iter, num_stages=STAGES, loop_unroll_factor=UNROLL):
        if NORM:
            t, ok = _sample_token_of(pid, it, chunks, n_iter, tokens_per_sample)
        else:
            t, ok = _token_of(pid, it, nprog, M)
        mtok = mask & ok
        if RELOAD:  # large tiles: keep the factors out of registers (L1/L2-resident reloads)
            L, R = _load_factors(LEFT, RIGHT, l_offs, r_offs)
            LT = tl.load(LEFT_T + l_offs)
        if NORM:  # LayerNorm(x) and rstd stay for the norm's backward below
            if R_NSTAT:  # the forward's mean and rstd: no reductions before the rotation can start
                mean = tl.load(NSTAT + t)
                rstd = tl.load(NSTAT + M + t)
                xr, xhat = _normalized_from(X + t * stride_x + offs, mtok, mean, rstd)
            else:
                xr, xhat, mean, rstd = _normalized(X + t * stride_x + offs, mtok, K, LN_EPS)
            x = _modulated(xr, xhat, sc, sh, sg, X16)
        else:
            x = _signed_token(X + t * stride_x + offs, mtok, sg, X16, ACT)
        y = _rotate(x, L, R, ROTATE, HAS_LEFT, R_FIRST, SPLIT1, SPLIT2, DOT_DT)  # sqrt(n) * the forward's
        if MODE == 2:  # the argmax elements of |y| get the statistic's gradient
            amax = tl.max(tl.max(tl.abs(y), axis=1), axis=0)
            st_raw = amax / SQRT_N  # = _stat(y, 2, K, SQRT_N), the reduction taken once
            hit = (tl.abs(y) == amax) & mask
            cnt = tl.sum(tl.sum(hit.to(tl.float32), axis=1), axis=0)
        elif R_STAT:  # the forward's rms statistic, clamped: above EPS exactly where the raw one was
            st_raw = tl.load(STAT + t)
        else:
            st_raw = _stat(y, MODE, K, SQRT_N)
        st = tl.maximum(st_raw, EPS)
        dy = tl.zeros_like(y)  # the G quantizers' gradients, summed in the rotated basis
        for g in tl.static_range(G):
            alpha, s = _token_step(ALPHA + g * alpha_sg + t * alpha_st, st, MODE)
            v = y * (1.0 / (s * SQRT_N))  # as the forward computes it
            inr = (v >= -QN) & (v <= QP) & mask
            q = _quantize(v, QN, QP, SIGN1, RINT)
            if W_OUT:  # the forward's q * s_t again (same y, same rounding), for the weight gradient
                tl.store(OUT + g * grad_sg + t * K + offs, (q * s).to(OUT.dtype.element_ty), mask=mtok)
            gr = tl.load(GRAD + g * grad_sg + t * stride_g + offs, mask=mtok, other=0.0).to(tl.float32)
            gs = tl.sum(tl.sum(gr * (q - tl.where(inr, v, 0.0)), axis=1), axis=0)
            dy += tl.where(inr, gr, 0.0)
            if MODE == 1:
                coef = tl.where(st_raw > EPS, gs * alpha / (K * st), 0.0)
                dy += (coef / SQRT_N) * y
            elif MODE == 2:
                coef = tl.where(st_raw > EPS, gs * alpha / cnt, 0.0)
                dy += tl.where(hit, tl.where(y >= 0, coef, -coef), 0.0)
            if MODE == 0:
                tl.store(GA + g * M + t, gs, mask=ok)
            else:
                tl.store(GA + g * M + t, gs * st, mask=ok)
        # transpose of the rotation: dx = A dy B^T / sqrt(n), times the signs
        if ROTATE:
            if HAS_LEFT:
                if R_FIRST:
                    dx = _right(_left(LT, dy, GSPLIT, DOT_DT), R, GSPLIT, DOT_DT)
                else:
                    dx = _left(LT, _right(dy, R, GSPLIT, DOT_DT), GSPLIT, DOT_DT)
            else:
                dx = _right(dy, R, GSPLIT, DOT_DT)
            dx = dx * (1.0 / SQRT_N)
        else:
            dx = dy
        dx = dx * sg
        if ACT == 1:  # through the GELU: reload h (L1/L2-resident) rather than hold it in registers
            h = tl.load(X + t * stride_x + offs, mask=mtok, other=0.0).to(tl.float32)
            dx = dx * _gelu_tanh_grad(h)
        if NORM:  # through the modulation and the LayerNorm
            acc_sc += dx * xhat
            acc_sh += dx
            g = dx * (1.0 + sc.to(tl.float32))
            rows_g, rows_gx = tl.reduce((g, g * xhat), 1, _add2)  # both sums in one pass: one exchange across warps
            sum_g, sum_gx = tl.reduce((rows_g, rows_gx), 0, _add2)
            mg, mgx = sum_g / K, sum_gx / K
            dx = rstd * (g - mg - xhat * mgx)
        tl.store(DX + t * stride_x + offs, dx.to(DX.dtype.element_ty), mask=mtok)
    if NORM:  # this program's partial sums: row (pid % chunks, sample) of [chunks, B, K]
        part = ((pid % chunks) * (M // tokens_per_sample) + sample) * K + offs
        tl.store(DSCALE + part, acc_sc, mask=mask)
        tl.store(DSHIFT + part, acc_sh, mask=mask)
