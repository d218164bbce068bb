"""Fused QAT path for ``QuantLinear``: one Triton kernel for rotate + per-token LSQ fake-quant
forward, one for its backward, a ternary weight cached per optimizer step, and low-precision
saved tensors.

    y = Q(rotate(x)) @ T(W')^T + b

Forward: the kernel reads x once and writes ``q * s_t`` in the compute dtype (the GEMM input,
kept for the weight gradient as a plain bf16 linear keeps its input) and the per-token step s_t.
Saved for backward: x (shared with every other consumer of the same input: q/k/v share it), the
16-bit GEMM input, s_t, the ternary weight; never the reference's fp32 rotated intermediates.
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

import torch
import torch.nn.functional as F
from torch import nn

from robuq.quant.context import current_timestep_groups
from robuq.quant.linear import QuantLinear
from robuq.quant.lsq import qrange
from robuq.quant.ternary import ternary_codes

from . import triton_quant as tq
from .quant_ops import mode_id, rotate_quantize, rotate_quantize_backward
from .rotation import rotation_kind, rotation_layout
from .ternary import ternary_weight

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _layout(dim: int, kind: str, block_size: int):
    return rotation_layout(dim, kind, block_size or None)


# ---- custom ops (opaque to torch.compile; fake kernels give shapes) ---------------------------


def _rotq_fwd_impl(
    x: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, kind: str, block_size: int,
    bits: int, signed: bool, mode: int, out_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q * s_t [M, K] out_dtype, s_t [M] fp32); alpha [M] or [1]."""
    lay = _layout(x.shape[1], kind, block_size)
    r = rotate_quantize(x, signs, lay, alpha.reshape(1, -1), bits, signed, mode, out="scaled",
                        out_dtype=_DTYPES[out_dtype], round_to_bf16=out_dtype == "bfloat16")
    return r["out"][0], r["s"][0]


rotq_fwd = torch.library.custom_op("robuq::rotq_fwd", _rotq_fwd_impl, mutates_args=())


@rotq_fwd.register_fake
def _(x, signs, alpha, kind, block_size, bits, signed, mode, out_dtype):
    m, k = x.shape
    return x.new_empty(m, k, dtype=_DTYPES[out_dtype]), x.new_empty(m, dtype=torch.float32)


def _rotq_bwd_impl(
    x: torch.Tensor, grad: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, kind: str, block_size: int,
    bits: int, signed: bool, mode: int, out_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [M, K] in x's dtype, per-token dL/dalpha [M] fp32)."""
    lay = _layout(x.shape[1], kind, block_size)
    return rotate_quantize_backward(x, grad, signs, lay, alpha.reshape(-1), bits, signed, mode,
                                    round_to_bf16=out_dtype == "bfloat16")


rotq_bwd = torch.library.custom_op("robuq::rotq_bwd", _rotq_bwd_impl, mutates_args=())


@rotq_bwd.register_fake
def _(x, grad, signs, alpha, kind, block_size, bits, signed, mode, out_dtype):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


# ---- the autograd function -------------------------------------------------------------------


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class FusedQuantLinearFn(torch.autograd.Function):
    """(x2 [M, K], latent weight, bias, LSQ step, cached T(W'), alpha per token, group id per token,
    static spec, rotation signs) -> y [M, N]."""

    @staticmethod
    def forward(ctx, x2, weight, bias, step, wq, alpha_t, group_of_token, spec, signs):
        kind, block_size, bits, signed, mode, groups, cdt = spec
        # eager calls the implementation directly (a custom op costs tens of us of host time per
        # call); under torch.compile the registered op keeps the kernel opaque to the tracer
        fwd = torch.ops.robuq.rotq_fwd if torch.compiler.is_compiling() else _rotq_fwd_impl
        out, _ = fwd(x2, signs, alpha_t, kind, block_size, bits, signed, mode, _dtype_name(cdt))
        y = F.linear(out, wq, None if bias is None else bias.to(cdt))
        ctx.save_for_backward(x2, out, wq, alpha_t, step, group_of_token, signs)
        ctx.spec = spec
        ctx.has_bias = bias is not None
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, out, wq, alpha_t, step, group_of_token, signs = ctx.saved_tensors
        kind, block_size, bits, signed, mode, groups, cdt = ctx.spec
        dy = dy.to(cdt)
        dout = dy @ wq
        dw = dy.t() @ out
        db = dy.sum(0) if ctx.has_bias else None
        bwd = torch.ops.robuq.rotq_bwd if torch.compiler.is_compiling() else _rotq_bwd_impl
        dx, ga = bwd(x2, dout, signs, alpha_t, kind, block_size, bits, signed, mode, _dtype_name(cdt))
        _, qp = qrange(bits, signed)
        g = 1.0 / math.sqrt(x2.numel() / groups * max(qp, 1))
        if groups > 1:
            dalpha = torch.zeros(groups, device=ga.device, dtype=torch.float32).index_add_(0, group_of_token, ga)
        else:
            dalpha = ga.sum().reshape(1)
        sd = step.detach()
        dstep = dalpha * g * torch.sign(sd) * (sd.abs() >= 1e-8)
        wdt, bdt = ctx.dtypes
        db = None if db is None else db.to(bdt)
        return dx, dw.to(wdt), db, dstep.to(step.dtype), None, None, None, None, None


# ---- module glue --------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@torch.no_grad()
def cached_ternary_weight(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """T(W') in ``dtype``, recomputed only when the latent weight changed (once per optimizer step)."""
    w = layer.weight
    key = (w._version, w.data_ptr(), dtype)
    cache = getattr(layer, "_robuq_wq", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    wq = _ternary_weight_uncached(layer, dtype)
    layer._robuq_wq = (key, wq)
    return wq


def _ternary_weight_uncached(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """T(W') in ``dtype``: the one-pass Triton kernel for per-channel scales (eager and CUDA-graph
    capture), torch ops under torch.compile (Inductor fuses them) and for per-tensor scales."""
    w = layer.weight.detach()
    wq_cfg = layer.weight_quant
    if wq_cfg is None:
        return w.to(dtype)
    if wq_cfg.granularity == "channel" and not torch.compiler.is_compiling():
        return ternary_weight(w, dtype, wq_cfg.eps)
    codes, scale = ternary_codes(w, wq_cfg.granularity, wq_cfg.eps)
    return (codes * scale).to(dtype)


def fused_supported(layer: QuantLinear) -> bool:
    q = layer.act.quantizer
    if not q.enabled:
        return False
    kind, bs = rotation_kind(layer.act.rotation)
    return rotation_layout(layer.in_features, kind, bs).supported


def _fused_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    q = self.act.quantizer
    if not (q.initialized and (x.is_cuda or tq.INTERPRET)) or x.shape[-1] != self.in_features:
        return QuantLinear.forward(self, x)
    cdt = _compute_dtype(x)
    if cdt == torch.float32 and not tq.INTERPRET:
        # fp32 training (no autocast) stays on the reference path: on the H100 the fp32 fused
        # backward returned non-finite values at K = 1152 and one fp32 test faulted, probably the
        # n_iter specialisation fault fixed in triton_quant (not re-tested in fp32). The kernels
        # serve 16-bit compute, the setting fast QAT is for (bf16-mixed).
        return QuantLinear.forward(self, x)
    kind, bs = rotation_kind(self.act.rotation)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, self.in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    alpha = q.step.detach().abs().clamp_min(1e-8).float()
    if q.groups > 1:
        ids = q._group_index(x)
        per = x2.shape[0] // x.shape[0]
        group_of_token = ids.repeat_interleave(per)
        alpha_t = alpha[group_of_token]
    else:
        group_of_token = alpha.new_zeros(0, dtype=torch.long)
        alpha_t = alpha[:1]
    # traced or captured code must recompute T(W') each call: a replayed CUDA graph or compiled
    # graph never runs the host-side cache check, so a cached weight would go stale after opt.step()
    traced = torch.compiler.is_compiling() or (x2.is_cuda and torch.cuda.is_current_stream_capturing())
    wq = _ternary_weight_uncached(self, cdt) if traced else cached_ternary_weight(self, cdt)
    signs = self.act.rotation.signs if self.act.rotation is not None else x2.new_ones(self.in_features)
    spec = (kind, bs or 0, q.bits, q.signed, mode_id(q.mode, q.stat), q.groups, cdt)
    y = _apply(x2, self.weight, self.bias, q.step, wq, alpha_t, group_of_token, spec, signs)
    return y.reshape(*lead, self.out_features)


def _apply(x2, weight, bias, step, wq, alpha_t, group_of_token, spec, signs):
    with torch.autocast(x2.device.type, enabled=False):
        return FusedQuantLinearFn.apply(x2, weight, bias, step, wq, alpha_t, group_of_token, spec, signs)


def use_fused_kernels(model: nn.Module, enabled: bool = True) -> dict[str, bool]:
    """Switch the model's QuantLinears to the fused Triton path (or back); returns name -> fused.

    The switch is per instance (``layer.forward`` is overridden), so it survives ``.to()`` and
    ``state_dict`` round trips untouched and needs no change in ``robuq.quant``.
    """
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
