"""Ternary weight fake-quant in one Triton pass per output channel (BitNet b1.58 absmean):

    s = max(mean_j |w_ij|, eps),    T(w)_ij = s * clip(round(w_ij / s), -1, 1)   (in the compute dtype)

The torch reference (``robuq.quant.ternary.ternary_codes``) makes ~7 passes over the fp32 weight
(abs, mean, divide, round, clamp, scale, cast); this kernel reads each row twice (the second read
hits L2) and writes the 16-bit weight once. A QAT step calls it once per layer after the weights
change.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compat import INTERPRET
from .triton_quant import _round_half_even

BLOCK = 1024


@triton.jit
def ternary_rows_kernel(W, OUT, CODES, SCALE, K, stride_w, stride_o, EPS: tl.constexpr, BLOCK: tl.constexpr,
                        W_CODES: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        w = tl.load(W + row * stride_w + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        acc += tl.abs(w)
    s = tl.maximum(tl.sum(acc, axis=0) / K, EPS)
    if W_CODES:  # the scale as the compute dtype rounds it: OUT = q * SCALE exactly
        tl.store(SCALE + row, s.to(OUT.dtype.element_ty).to(tl.float32))
    for k0 in range(0, K, BLOCK):
        m = k0 + cols < K
        w = tl.load(W + row * stride_w + k0 + cols, mask=m, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(w / s), -1.0), 1.0)
        tl.store(OUT + row * stride_o + k0 + cols, (q * s).to(OUT.dtype.element_ty), mask=m)
        if W_CODES:
            tl.store(CODES + row * K + k0 + cols, q.to(tl.float8e4nv), mask=m)


def ternary_weight(w: torch.Tensor, dtype: torch.dtype, eps: float = 1e-8, codes: bool = False):
    """T(w) [out, in] in ``dtype`` with a per-output-channel absmean scale (no gradient).

    ``codes=True`` returns (T(w), codes [out, in] e4m3 in {-1, 0, 1}, scale [out] fp32) with
    T(w) = codes * scale exactly (the scale as ``dtype`` rounds it), for the fp8 GEMM.
    """
    if w.dim() != 2:
        raise ValueError(f"ternary weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not (w.is_cuda or INTERPRET):
        raise ValueError("ternary_weight runs on a CUDA tensor (or under TRITON_INTERPRET=1)")
    w = w.detach()
    if w.stride(1) != 1:
        w = w.contiguous()
    out = torch.empty(w.shape, device=w.device, dtype=dtype)
    c = torch.empty(w.shape if codes else (0,), device=w.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(w.shape[0] if codes else 0, device=w.device, dtype=torch.float32)
    if w.numel():
        ternary_rows_kernel[(w.shape[0],)](w, out, c, scale, w.shape[1], w.stride(0), out.stride(0), EPS=eps,
                                            BLOCK=BLOCK, W_CODES=codes, num_warps=4)
    return (out, c, scale) if codes else out
