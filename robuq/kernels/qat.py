"""Fused QAT path for ``QuantLinear``: one Triton kernel for rotate + per-token LSQ fake-quant
forward, one for its backward, a ternary weight cached per optimizer step, and low-precision
saved tensors.

    y = Q(rotate(x)) @ T(W')^T + b  =  s_t * s_w * (q @ t^T) + b      (q, t integers)

Forward: the kernel reads x once and writes the per-token step s_t and, on fp8 GPUs (sm_89+,
``FP8_FORWARD``), the codes q in e4m3; the forward GEMM runs on fp8 tensor cores: codes |q| <= 16
and ternary t are exact in e4m3 and accumulate in fp32, so the product is the exact integer one,
scaled per token and per channel (and biased) in cuBLAS's epilogue. The weight gradient's input
``q * s_t`` (compute dtype) is then written by the backward kernel, which recomputes q anyway
(``GEMM_INPUT_IN_BACKWARD``), so it is not kept from forward to backward. Elsewhere the forward
kernel writes ``q * s_t``, the forward multiplies it, and it is saved for the weight gradient, as
a plain bf16 linear saves its input. Layers that read the same input through the same
rotation (q, k, v of an attention) run as one group: one kernel launch rotates x once and
quantizes it with each layer's own LSQ step; the backward kernel takes their three gradients and
rotates their sum back once (on DiT-XL/2 this took the step from 1.24x to 1.19x a bf16 step).
In a DiT block the q/k/v and fc1 launches can also take the residual stream and compute the
block's adaLN (LayerNorm and modulation) themselves, forward and backward (``norm=``,
``robuq.kernels.block``: 1.19x -> 1.05x as a CUDA graph, docs/PERFORMANCE.md section 3.1).
Saved for backward: x (shared with every other consumer of the same input), s_t, the ternary
weight (and the 16-bit GEMM input off the fp8 path); never the reference's fp32 rotated
intermediates.
Backward recomputes the rotation from x inside the backward kernel. Under bf16 autocast an fp32
input (a LayerNorm output) is rounded to bf16 as the kernel loads it, which is what autocast does
to any linear's input, and runs the kernels' faster bf16 tile. (Saving int8 codes instead of
the GEMM input saves 1 byte per element but costs a dequantize pass per layer in backward: on the
H100 that pass was ~15 ms of a 164 ms DiT-XL/2 step, docs/PERFORMANCE.md.)

Gradients are those of the pure-torch reference (``robuq.quant``): STE through round, clamp mask,
LSQ step gradient with the gradient scale ``1/sqrt(numel * Qp)``, the per-token statistic's own
gradient in dynamic mode, and the latent weight gets the STE gradient ``dL/dT(W')``.

Use ``use_fused_kernels(model)`` to switch every eligible QuantLinear of a model to this path and
``use_fused_kernels(model, False)`` to switch back. Layers stay on the reference path when the
fused path cannot serve them: activations in full precision, a rotation layout without a kernel
(see ``rotation.RotationLayout.supported``), a CPU tensor (unless TRITON_INTERPRET=1), fp32 compute
on the GPU (no autocast), or an LSQ step not yet initialised (the reference forward initialises it
on its first call).
"""

from __future__ import annotations

import math
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from robuq.models import modulate
from robuq.quant.linear import QuantLinear
from robuq.quant.lsq import qrange
from robuq.quant.ternary import ternary_codes

from . import triton_quant as tq
from .attention import share_qkv
from .block import fuse_block_norms
from .gemm import scaled_mm_rowwise
from .mlp import fuse_gelu
from .quant_ops import MODE_IDS, act_id, mode_id, norm_chunks, rotate_quantize, rotate_quantize_backward
from .rotation import rotation_kind, rotation_layout
from .ternary import ternary_weight

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_RMS = MODE_IDS["rms"]  # the kernels' mode id of the per-token rms statistic
# Forward GEMM of bf16-autocast layers on fp8 tensor cores where the GPU has them (see the module
# docstring); False multiplies the bf16 fake-quant tensors instead (benchmarks compare both).
FP8_FORWARD = True
# With the fp8 forward GEMM, the forward kernel writes only the e4m3 codes and the backward kernel,
# which recomputes the codes anyway, writes the weight gradient's input q * s_t (the same bits):
# nothing of size [G, M, K] is kept between forward and backward. False: the forward writes and
# saves q * s_t (benchmarks compare both).
GEMM_INPUT_IN_BACKWARD = True


def _layout(dim: int, kind: str, block_size: int):
    return rotation_layout(dim, kind, block_size or None)


# ---- custom ops (opaque to torch.compile; fake kernels give shapes) ---------------------------


def _norm(scale: torch.Tensor | None, shift: torch.Tensor | None, ln_eps: float):
    return None if scale is None else (scale, shift, ln_eps)


def _rotq_fwd_impl(
    x: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, kind: str, block_size: int,
    bits: int, signed: bool, mode: int, out_dtype: str, want_f8: bool, act: str,
    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], ln_eps: float, want_out: bool, split: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K], alpha [G, M or 1] -> (q * s_t [G, M, K] out_dtype (if want_out, else empty), q [G, M, K]
    e4m3 (if want_f8, else empty), s_t [G, M] fp32, and for the backward the LayerNorm's mean and rstd
    [2, M] fp32 (empty without the adaLN) and the rms statistic [M] fp32 (empty in other modes)) of
    act(x) (act "": x itself), or of the adaLN of x (scale, shift [B, K]). ``split``: the exact rotation
    (False: the one-rounding rotation, see ``use_fused_kernels``)."""
    lay = _layout(x.shape[1], kind, block_size)
    r = rotate_quantize(x, signs, lay, alpha, bits, signed, mode, out="scaled" if want_out else None, want_f8=want_f8,
                        out_dtype=_DTYPES[out_dtype], round_to_bf16=out_dtype == "bfloat16", act=act or None,
                        norm=_norm(scale, shift, ln_eps), want_norm_stats=scale is not None, want_stat=mode == _RMS,
                        split=split)
    none = x.new_empty(0, dtype=torch.float32)
    return (r["out"] if want_out else x.new_empty(0, dtype=_DTYPES[out_dtype]),
            r["f8"] if want_f8 else x.new_empty(0, dtype=torch.float8_e4m3fn), r["s"],
            r["norm_stats"] if scale is not None else none, r["stat"] if mode == _RMS else none)


rotq_fwd = torch.library.custom_op("robuq::rotq_fwd", _rotq_fwd_impl, mutates_args=())


@rotq_fwd.register_fake
def _(x, signs, alpha, kind, block_size, bits, signed, mode, out_dtype, want_f8, act, scale, shift, ln_eps, want_out,
      split):
    (m, k), g = x.shape, alpha.shape[0]
    f8 = x.new_empty((g, m, k) if want_f8 else (0,), dtype=torch.float8_e4m3fn)
    out = x.new_empty((g, m, k) if want_out else (0,), dtype=_DTYPES[out_dtype])
    nstat = x.new_empty((2, m) if scale is not None else (0,), dtype=torch.float32)
    stat = x.new_empty((m,) if mode == _RMS else (0,), dtype=torch.float32)
    return out, f8, x.new_empty(g, m, dtype=torch.float32), nstat, stat


def _rotq_bwd_impl(
    x: torch.Tensor, grad: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, kind: str, block_size: int,
    bits: int, signed: bool, mode: int, out_dtype: str, act: str,
    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], ln_eps: float, want_out: bool, chunks: int,
    norm_stats: Optional[torch.Tensor], stat: Optional[torch.Tensor], split: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad [G, M, K], alpha [G, M or 1] -> (dx [M, K] in x's dtype, per-token dL/dalpha [G, M] fp32,
    the partial sums of dL/dscale and dL/dshift [chunks, B, K] fp32 (empty without the adaLN; summed
    by the caller, so that a compiled graph fuses the sum with its consumer), the forward's q * s_t
    [G, M, K] out_dtype (if want_out, else empty)). ``chunks`` (``quant_ops.norm_chunks``; ignored
    without the adaLN) is an argument so that a compiled graph's shapes, and the key Inductor caches
    it under, follow the launch settings: a cached graph built under other settings is not reused.
    ``norm_stats``, ``stat``: rotq_fwd's LayerNorm and rms statistics (or None: recomputed); ``split``:
    the forward's."""
    lay = _layout(x.shape[1], kind, block_size)
    dt = _DTYPES[out_dtype]
    r = rotate_quantize_backward(x, grad, signs, lay, alpha, bits, signed, mode, round_to_bf16=out_dtype == "bfloat16",
                                 act=act or None, norm=_norm(scale, shift, ln_eps), out_dtype=dt if want_out else None,
                                 norm_partials=True, chunks=chunks, norm_stats=norm_stats, stat=stat, split=split)
    if scale is None:
        r = (*r[:2], x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32), *r[2:])
    return r if want_out else (*r, x.new_empty(0, dtype=dt))


rotq_bwd = torch.library.custom_op("robuq::rotq_bwd", _rotq_bwd_impl, mutates_args=())


@rotq_bwd.register_fake
def _(x, grad, signs, alpha, kind, block_size, bits, signed, mode, out_dtype, act, scale, shift, ln_eps, want_out,
      chunks, norm_stats, stat, split):
    dn = (0,) if scale is None else (chunks, *scale.shape)
    out = x.new_empty(grad.shape if want_out else (0,), dtype=_DTYPES[out_dtype])
    return (torch.empty_like(x), x.new_empty(grad.shape[0], x.shape[0], dtype=torch.float32),
            x.new_empty(dn, dtype=torch.float32), x.new_empty(dn, dtype=torch.float32), out)


def _ternary_fp8_impl(w: torch.Tensor, dtype: str, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T(w) [N, K] in dtype, e4m3 codes [N, K], fp32 scale [N]): ``ternary.ternary_weight(codes=True)``."""
    return ternary_weight(w, _DTYPES[dtype], eps, codes=True)


ternary_fp8 = torch.library.custom_op("robuq::ternary_fp8", _ternary_fp8_impl, mutates_args=())


@ternary_fp8.register_fake
def _(w, dtype, eps):
    return (w.new_empty(w.shape, dtype=_DTYPES[dtype]), w.new_empty(w.shape, dtype=torch.float8_e4m3fn),
            w.new_empty(w.shape[0], dtype=torch.float32))


# ---- the autograd function -------------------------------------------------------------------


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class FusedQuantLinearFn(torch.autograd.Function):
    """G quantized linears that read the same input x2 [M, K] (G = 1, or q/k/v of an attention):
    one rotate+quantize launch with G quantizers, G GEMMs; backward: G GEMM pairs, one launch.
    With an activation in the spec (``"gelu_tanh"``), x2 is the pre-activation and the layers read
    act(x2); dx is then the pre-activation's gradient.

    With scale and shift ([B, K], spec's ln_eps), x2 is the residual stream and the layers read its
    adaLN ``LayerNorm(x2) * (1 + scale_b) + shift_b``; scale and shift get their gradients.

    apply(x2, alpha_t [G, M or 1], group id per token, static spec, rotation signs, T(W') per layer,
    e4m3 codes and scales of T(W') per layer (None: bf16 forward GEMM), scale, shift (or None, None),
    *(G latent weights, G biases, G LSQ steps)) -> G outputs [M, N_g].
    """

    @staticmethod
    def forward(ctx, x2, alpha_t, group_of_token, spec, signs, wq, w8, w_scale, scale, shift, *params):
        kind, block_size, bits, signed, mode, groups, cdt, act, ln_eps, split = spec
        n = len(wq)
        weights, biases = params[:n], params[n:2 * n]
        # eager calls the implementation directly (a custom op costs tens of us of host time per
        # call); under torch.compile the registered op keeps the kernel opaque to the tracer
        fwd = torch.ops.robuq.rotq_fwd if torch.compiler.is_compiling() else _rotq_fwd_impl
        fp8 = w8[0] is not None
        keep_out = not (fp8 and GEMM_INPUT_IN_BACKWARD)  # (off the fp8 path the forward GEMM reads q * s_t)
        out, q8, s, nstat, stat = fwd(x2, signs, alpha_t, kind, block_size, bits, signed, mode, _dtype_name(cdt), fp8,
                                      act, scale, shift, ln_eps, keep_out, split)
        ys = []
        for i in range(n):
            b = None if biases[i] is None else biases[i].to(cdt)
            ys.append(scaled_mm_rowwise(q8[i], w8[i], s[i], w_scale[i], b, out_dtype=cdt) if fp8
                      else F.linear(out[i], wq[i], b))
        ctx.save_for_backward(x2, out if keep_out else None, alpha_t, group_of_token, signs, scale, shift,
                              nstat if scale is not None else None, stat if mode == _RMS else None, *wq,
                              *params[2 * n:])
        ctx.spec = spec
        ctx.bias_dtypes = [None if bi is None else bi.dtype for bi in biases]
        ctx.weight_dtypes = [w.dtype for w in weights]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x2, out, alpha_t, group_of_token, signs, scale, shift, nstat, stat, *rest = ctx.saved_tensors
        kind, block_size, bits, signed, mode, groups, cdt, act, ln_eps, split = ctx.spec
        n = len(dys)
        wq, steps = rest[:n], rest[n:]
        dys = [torch.zeros(x2.shape[0], w.shape[0], device=x2.device, dtype=cdt) if dy is None else dy.to(cdt)
               for dy, w in zip(dys, wq)]
        if n == 1:
            dout = (dys[0] @ wq[0]).unsqueeze(0)
        elif torch.compiler.is_compiling():
            dout = torch.stack([dy @ w for dy, w in zip(dys, wq)])
        else:  # straight into the [G, M, K] input of the backward kernel
            dout = x2.new_empty(n, *x2.shape, dtype=cdt)
            for i in range(n):
                torch.mm(dys[i], wq[i], out=dout[i])
        bwd = torch.ops.robuq.rotq_bwd if torch.compiler.is_compiling() else _rotq_bwd_impl
        chunks = 1 if scale is None else norm_chunks(x2.shape[0], scale.shape[0], x2.device,
                                                     _layout(x2.shape[1], kind, block_size), n)
        dx, ga, dscale, dshift, out_again = bwd(x2, dout, signs, alpha_t, kind, block_size, bits, signed, mode,
                                                _dtype_name(cdt), act, scale, shift, ln_eps, out is None, chunks,
                                                nstat, stat, split)
        out = out_again if out is None else out
        dws = [(dy.t() @ out[i]).to(wdt) for i, (dy, wdt) in enumerate(zip(dys, ctx.weight_dtypes))]
        # summed in fp32: a bf16-output sum gave eager and CUDA-graph-replayed steps different bias
        # gradients (P50, not traced further); in fp32 the two agree bit for bit
        dbs = [None if bdt is None else dy.sum(0, dtype=torch.float32).to(bdt) for dy, bdt in zip(dys, ctx.bias_dtypes)]
        if scale is None:
            dscale = dshift = None
        else:
            dscale, dshift = dscale.sum(0).to(scale.dtype), dshift.sum(0).to(shift.dtype)
        _, qp = qrange(bits, signed)
        g = 1.0 / math.sqrt(x2.numel() / groups * max(qp, 1))
        if groups > 1:
            dalpha = torch.zeros(n, groups, device=ga.device, dtype=torch.float32).index_add_(1, group_of_token, ga)
        else:
            dalpha = ga.sum(1, keepdim=True)
        dsteps = []
        for i, step in enumerate(steps):
            sd = step.detach()
            dsteps.append((dalpha[i] * g * torch.sign(sd) * (sd.abs() >= 1e-8)).to(step.dtype))
        return (dx, None, None, None, None, None, None, None, dscale, dshift, *dws, *dbs, *dsteps)


# ---- module glue --------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_OPTIMIZER_STEPS = [0]  # steps taken by any torch.optim optimizer in this process


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


# Fused optimizers (AdamW(fused=True)) update the weights without bumping their version counter,
# so the cache below keys on the optimizer steps taken as well.
register_optimizer_step_post_hook(_count_optimizer_step)


@torch.no_grad()
def cached_ternary_weight(layer: QuantLinear, dtype: torch.dtype, fp8: bool = False):
    """``_ternary_weight_uncached``, recomputed only when the latent weight changed: after any
    optimizer step or other in-place change."""
    w = layer.weight
    key = (w._version, _OPTIMIZER_STEPS[0], w.data_ptr(), dtype, fp8)
    cache = getattr(layer, "_robuq_wq", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    wq = _ternary_weight_uncached(layer, dtype, fp8)
    layer._robuq_wq = (key, wq)
    return wq


def _ternary_weight_uncached(layer: QuantLinear, dtype: torch.dtype, fp8: bool = False):
    """(T(W') in ``dtype``, e4m3 codes [N, K], scale [N] fp32) with T(W') = codes * scale exactly; the
    last two only for ``fp8``, else None. The one-pass Triton kernel for per-channel scales (eager,
    CUDA-graph capture, and under torch.compile on the fp8 path as the custom op ``robuq::ternary_fp8``:
    Inductor's fusion of the torch ops reads the fp32 weight twice from memory, DiT-XL/2 3.4 ms per
    step on an H200), torch ops otherwise (Inductor fuses them) and per tensor."""
    w = layer.weight.detach()
    wq_cfg = layer.weight_quant
    if wq_cfg is None:
        return w.to(dtype), None, None
    if wq_cfg.granularity == "channel":
        if fp8:
            op = torch.ops.robuq.ternary_fp8 if torch.compiler.is_compiling() else _ternary_fp8_impl
            return op(w, _dtype_name(dtype), float(wq_cfg.eps))
        if not torch.compiler.is_compiling():
            return ternary_weight(w, dtype, wq_cfg.eps), None, None
    codes, scale = ternary_codes(w, wq_cfg.granularity, wq_cfg.eps)
    scale = scale.to(dtype)
    if not fp8:
        return (codes * scale).to(dtype), None, None
    return (codes * scale).to(dtype), codes.to(torch.float8_e4m3fn), scale.float().expand(w.shape[0], 1).reshape(-1)


_FP8_GPUS: dict[int, bool] = {}  # device index -> has fp8 tensor cores (a plain dict: torch.compile traces it)


def _has_fp8(index: int) -> bool:
    if index not in _FP8_GPUS:
        _FP8_GPUS[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return _FP8_GPUS[index]


def _fp8_forward(layer: QuantLinear, x2: torch.Tensor, cdt: torch.dtype) -> bool:
    """Whether the forward GEMM runs exactly on fp8 tensor cores: ternary weights, codes within
    [-16, 16] (exact in e4m3), bf16 compute, dims that cuBLAS fp8 takes (multiples of 16)."""
    q = layer.act.quantizer
    qn, qp = qrange(q.bits, q.signed)
    return (FP8_FORWARD and x2.is_cuda and cdt == torch.bfloat16 and layer.weight_quant is not None
            and max(qn, qp) <= 16 and layer.in_features % 16 == 0 and layer.out_features % 16 == 0
            and _has_fp8(x2.device.index or 0))


def fused_supported(layer: QuantLinear) -> bool:
    q = layer.act.quantizer
    if not q.enabled:
        return False
    kind, bs = rotation_kind(layer.act.rotation)
    return rotation_layout(layer.in_features, kind, bs).supported


def _quant_spec(layer: QuantLinear) -> tuple:
    """What the G layers of one launch must share: input width, quantizer, rotation (and its signs)."""
    q = layer.act.quantizer
    kind, bs = rotation_kind(layer.act.rotation)
    return (layer.in_features, q.bits, q.signed, q.mode, q.stat, q.groups, kind, bs, layer.exact_rotation)


def can_share_input(layers) -> bool:
    """Whether ``layers`` (e.g. q, k, v) can run as one fused group: all fused-capable, with the
    same input width, quantizer settings and rotation (the same random signs)."""
    first = layers[0]
    if not all(isinstance(m, QuantLinear) and fused_supported(m) for m in layers):
        return False
    if any(_quant_spec(m) != _quant_spec(first) for m in layers):
        return False
    rots = [m.act.rotation for m in layers]
    return all(r is None for r in rots) or all(r is not None and torch.equal(r.signs, rots[0].signs) for r in rots)


def fused_linears(layers, x: torch.Tensor, act: str | None = None,
                  norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> list[torch.Tensor]:
    """``[layer(act(x)) for layer in layers]`` for fused QuantLinears that ``can_share_input``, with
    one rotate+quantize launch (and one in backward) for all of them; each layer's own forward where
    the fused path cannot serve them (see the module docstring). ``act``: None, or ``"gelu_tanh"``
    (``F.gelu(x, approximate="tanh")``, computed inside the kernels). ``norm = (scale [B, K], shift
    [B, K], eps)`` for x [B, T, K]: the layers read ``modulate(x, norm)``, computed inside the
    kernels (forward and backward)."""
    first = layers[0]
    act_id(act)
    if norm is not None and x.dim() != 3:
        raise ValueError(f"fused_linears: norm (the adaLN) needs x of shape [B, T, K], got {tuple(x.shape)}")
    qs = [m.act.quantizer for m in layers]
    cdt = _compute_dtype(x)
    if (not (all(q.initialized for q in qs) and (x.is_cuda or tq.INTERPRET)) or x.shape[-1] != first.in_features
            or (cdt == torch.float32 and not tq.INTERPRET)):
        # fp32 training (no autocast) stays on the reference path: on the H100 the fp32 fused
        # backward returned non-finite values at K = 1152 and one fp32 test faulted, probably the
        # n_iter specialisation fault fixed in triton_quant (not re-tested in fp32). The kernels
        # serve 16-bit compute, the setting fast QAT is for (bf16-mixed).
        if act == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        if norm is not None:
            x = modulate(x, norm)
        return [QuantLinear.forward(m, x) for m in layers]
    q = qs[0]
    kind, bs = rotation_kind(first.act.rotation)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, first.in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    steps = [qi.step.detach().abs().clamp_min(1e-8).float() for qi in qs]
    alpha = steps[0][None] if len(steps) == 1 else torch.stack(steps)  # [G, groups]
    if q.groups > 1:
        ids = q._group_index(x)
        per = x2.shape[0] // x.shape[0]
        group_of_token = ids.repeat_interleave(per)
        alpha_t = alpha[:, group_of_token]
    else:
        group_of_token = alpha.new_zeros(0, dtype=torch.long)
        alpha_t = alpha[:, :1]
    # traced or captured code must recompute T(W') each call: a replayed CUDA graph or compiled
    # graph never runs the host-side cache check, so a cached weight would go stale after opt.step()
    traced = torch.compiler.is_compiling() or (x2.is_cuda and torch.cuda.is_current_stream_capturing())
    fp8 = all(_fp8_forward(m, x2, cdt) for m in layers)
    wq, w8, w_scale = zip(*[(_ternary_weight_uncached if traced else cached_ternary_weight)(m, cdt, fp8)
                            for m in layers])
    signs = first.act.rotation.signs if first.act.rotation is not None else x2.new_ones(first.in_features)
    scale, shift, ln_eps = (None, None, 0.0) if norm is None else norm
    spec = (kind, bs or 0, q.bits, q.signed, mode_id(q.mode, q.stat), q.groups, cdt, act or "", float(ln_eps),
            first.exact_rotation)
    params = [m.weight for m in layers] + [m.bias for m in layers] + [qi.step for qi in qs]
    with torch.autocast(x2.device.type, enabled=False):
        ys = FusedQuantLinearFn.apply(x2, alpha_t, group_of_token, spec, signs, wq, w8, w_scale, scale, shift, *params)
    return [y.reshape(*lead, m.out_features) for y, m in zip(ys, layers)]


def _fused_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return fused_linears([self], x)[0]


def use_fused_kernels(model: nn.Module, enabled: bool = True, fuse_activations: bool = False,
                      fuse_norms: bool = True, exact_rotation: bool = True) -> dict[str, bool]:
    """Switch the model's QuantLinears to the fused Triton path (or back); returns name -> fused.

    The switch is per instance (``layer.forward`` is overridden), so it survives ``.to()`` and
    ``state_dict`` round trips untouched; of ``robuq.quant`` it sets only
    ``QuantLinear.exact_rotation``. Attention modules whose q, k and v projections can share one
    launch (``can_share_input``) get a ``SharedQKVAttnProcessor`` over ``fused_linears``. ``fuse_activations``: DiT MLPs run their
    GELU inside the kernels of the output projection (``robuq.kernels.mlp.fuse_gelu``), which saves
    the GELU output for backward no longer (DiT-XL/2, batch 32: 2.1 GiB less peak memory, the step
    2% slower on an H100, docs/PERFORMANCE.md). ``fuse_norms``: DiT blocks compute their adaLN
    (LayerNorm and modulation) inside the q/k/v and fc1 kernels, forward and backward
    (``robuq.kernels.block``; DiT-XL/2 batch 32 on an H100 as a CUDA graph: 117.4 -> 103.2 ms per
    step, 29.4 -> 24.5 GiB). ``exact_rotation=False``: the kernels round the fp32 intermediate
    between the rotation's two products to bf16 once instead of carrying it exactly as a hi/lo
    pair: one tensor-core product fewer per token, forward and backward (DiT-XL/2 on an H200: 2 ms
    of a 75 ms compiled step), while ~0.1% of A2 codes move by one step against a float64 rotation.
    The deployed model computes the same integers (``robuq.deploy.export`` records the choice).
    Switching back restores all of them.
    """
    if not isinstance(exact_rotation, bool):
        raise TypeError(f"exact_rotation must be True or False, got {exact_rotation!r}")
    for m in model.modules():  # before the groups below: layers of one launch share their rotation
        if isinstance(m, QuantLinear):
            m.exact_rotation = exact_rotation or not enabled
    share_qkv(model, can_share_input, fused_linears, enabled)
    fuse_gelu(model, can_share_input, fused_linears, enabled and fuse_activations)
    fuse_block_norms(model, can_share_input, enabled and fuse_norms)
    done = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if "forward" in m.__dict__:
            del m.forward
        m.__dict__.pop("_robuq_wq", None)
        ok = enabled and fused_supported(m)
        if ok:
            m.forward = types.MethodType(_fused_forward, m)
        done[name] = ok
    return done
