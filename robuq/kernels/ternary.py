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
def ternary_rows_kernel(W, OUT, K, stride_w, stride_o, EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        w = tl.load(W + row * stride_w + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        acc += tl.abs(w)
    s = tl.maximum(tl.sum(acc, axis=0) / K, EPS)
    for k0 in range(0, K, BLOCK):
        m = k0 + cols < K
        w = tl.load(W + row * stride_w + k0 + cols, mask=m, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(w / s), -1.0), 1.0)
        tl.store(OUT + row * stride_o + k0 + cols, (q * s).to(OUT.dtype.element_ty), mask=m)


def ternary_weight(w: torch.Tensor, dtype: torch.dtype, eps: float = 1e-8) -> torch.Tensor:
    """T(w) [out, in] in ``dtype`` with a per-output-channel absmean scale (no gradient)."""
    if w.dim() != 2:
        raise ValueError(f"ternary weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not (w.is_cuda or INTERPRET):
        raise ValueError("ternary_weight runs on a CUDA tensor (or under TRITON_INTERPRET=1)")
    w = w.detach()
    if w.stride(1) != 1:
        w = w.contiguous()
    out = torch.empty(w.shape, device=w.device, dtype=dtype)
    if w.numel():
        ternary_rows_kernel[(w.shape[0],)](w, out, w.shape[1], w.stride(0), out.stride(0), EPS=eps, BLOCK=BLOCK,
                                            num_warps=4)
    return out
