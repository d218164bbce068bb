"""DiT's gated residual update ``x + gate_b * y`` (adaLN-Zero) as one Triton pass.

torch's ``addcmul`` computes it in one kernel too, but the per-sample gate [B, 1, K] broadcasts
over the tokens, which sends TensorIterator to its non-vectorized path: 34 us at DiT-XL/2's
8192 x 1152 on an H100 (docs/PERFORMANCE.md), against ~19 us of memory traffic at the copy rate.
Here each program reads a [ROWS, BLOCK] tile of x and y and the matching gate rows; the math is
addcmul's (fp32, rounded once to the output dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compat import INTERPRET

ROWS, BLOCK = 32, 128  # tokens x channels per program


@triton.jit
def gated_residual_kernel(X, G, Y, OUT, M, K, tokens_per_sample, stride_g, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    sample = rows // tokens_per_sample
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + sample[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None] * y`` for x, y [B, T, K] and gate [B, K] (rows may be strided, as the
    chunks of the adaLN modulation output are). Off CUDA, for other layouts and where autograd
    records (the kernel has no backward), diffusers' own two ops, so results are diffusers'."""
    b, t, k = x.shape if x.dim() == 3 else (0, 0, 0)
    if (not (x.is_cuda or INTERPRET) or x.dim() != 3 or y.shape != x.shape or gate.shape != (b, k)
            or not (x.is_contiguous() and y.is_contiguous()) or gate.stride(1) != 1 or x.dtype != y.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad or y.requires_grad))):
        return gate.unsqueeze(1) * y + x
    out = torch.empty_like(x)
    m = b * t
    if m:
        grid = (triton.cdiv(m, ROWS), triton.cdiv(k, BLOCK))
        gated_residual_kernel[grid](x, gate, y, out, m, k, t, gate.stride(0), ROWS=ROWS, BLOCK=BLOCK)
    return out
