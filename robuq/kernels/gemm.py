"""GEMMs for ternary weights x integer activation codes, with per-token x per-channel scales.

* ``scaled_mm_rowwise``: cuBLAS fp8 through ``torch._scaled_mm`` on e4m3 codes (integers in
  [-16, 16] are exact in e4m3) and e4m3 ternary weights {-1, 0, 1}; fp32 accumulation, then
  ``acc * s_t[m] * w_scale[n] (+ bias)`` in the epilogue (rowwise scales).
* ``packed_gemm``: a Triton kernel that reads the 2-bit packed weights (``robuq.deploy.pack``,
  quarter-planar layout) and unpacks them to the activation dtype (e4m3 or bf16) in registers
  right before the tensor-core product: 8x fewer weight bytes than bf16, which is what counts
  when few tokens go through a layer (small batches, the adaLN modulation with one row per
  sample).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._compat import INTERPRET  # noqa: F401  (patches the CPU interpreter when it is on)

# ---- cuBLAS fp8 -------------------------------------------------------------------------------

_BIAS_IN_SCALED_MM: bool | None = None  # learned on first use: some builds refuse bias with rowwise scales


def scaled_mm_rowwise(
    a_f8: torch.Tensor,
    w_f8: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """a_f8 [M, K] e4m3 (row-major) x w_f8 [N, K] e4m3 (row-major) -> [M, N] out_dtype."""
    global _BIAS_IN_SCALED_MM
    sa = scale_a.reshape(-1, 1).float()
    sb = scale_b.reshape(1, -1).float()
    b = w_f8.t()
    if bias is not None and _BIAS_IN_SCALED_MM is not False:
        if torch.compiler.is_compiling():  # no try in a traced graph: trust the eager probe, or the op
            return torch._scaled_mm(a_f8, b, scale_a=sa, scale_b=sb, bias=bias.to(out_dtype), out_dtype=out_dtype,
                                    use_fast_accum=use_fast_accum)
        try:
            y = torch._scaled_mm(a_f8, b, scale_a=sa, scale_b=sb, bias=bias.to(out_dtype), out_dtype=out_dtype,
                                 use_fast_accum=use_fast_accum)
            _BIAS_IN_SCALED_MM = True
            return y
        except RuntimeError:
            _BIAS_IN_SCALED_MM = False
    y = torch._scaled_mm(a_f8, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=use_fast_accum)
    return y if bias is None else y + bias.to(out_dtype)


def raw_fp8_accumulate(a_f8: torch.Tensor, w_f8: torch.Tensor, use_fast_accum: bool = False) -> torch.Tensor:
    """The fp32 accumulator of the fp8 GEMM (unit scales, fp32 out): for checking exactness."""
    one = torch.ones((), device=a_f8.device, dtype=torch.float32)
    return torch._scaled_mm(a_f8, w_f8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                            use_fast_accum=use_fast_accum)


# ---- Triton packed-weight GEMM ---------------------------------------------------------------


@triton.jit
def packed_gemm_kernel(
    A, WP, SA, SB, BIAS, C,
    M, N, K, KQ,
    stride_am, stride_wn, stride_cm,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mrow = rm < M
    ncol = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, KQ, BK):
        kq = kk + rk
        wmask = (kq[:, None] < KQ) & ncol[None, :]
        wp = tl.load(WP + rn[None, :] * stride_wn + kq[:, None], mask=wmask, other=0x55)  # [BK, BN] uint8
        for q in tl.static_range(4):
            col = q * KQ + kq
            amask = mrow[:, None] & ((kq < KQ) & (col < K))[None, :]
            a = tl.load(A + rm[:, None] * stride_am + col[None, :], mask=amask, other=0.0)
            w = (((wp >> (2 * q)) & 3).to(tl.float16) - 1.0).to(A.dtype.element_ty)
            acc = tl.dot(a, w, acc)
    sa = tl.load(SA + rm, mask=mrow, other=0.0)
    sb = tl.load(SB + rn, mask=ncol, other=0.0)
    out = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + rn, mask=ncol, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], out.to(C.dtype.element_ty), mask=mrow[:, None] & ncol[None, :])


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Tile candidates that ptxas compiles for sm_90a without register spills (checked offline with
# ptxas -v); benchmarks/inference.py times them all and the defaults below follow its results.
PACKED_CONFIGS = [
    dict(BM=16, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=4),
    dict(BM=16, BN=64, BK=64, GROUP_M=1, num_warps=4, num_stages=3),
    dict(BM=16, BN=128, BK=32, GROUP_M=1, num_warps=4, num_stages=3),
    dict(BM=16, BN=64, BK=128, GROUP_M=1, num_warps=8, num_stages=3),
    dict(BM=32, BN=64, BK=64, GROUP_M=1, num_warps=4, num_stages=3),
    dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BM=128, BN=128, BK=32, GROUP_M=8, num_warps=8, num_stages=3),
]


def _packed_config(m: int, n: int, kq: int, sms: int) -> dict:
    """Tile choice by size (no autotuning, so no tuning pass at first call)."""
    if m <= 16:
        return dict(PACKED_CONFIGS[1])
    if m <= 64:
        return dict(PACKED_CONFIGS[4])
    if m <= 512:
        return dict(PACKED_CONFIGS[5])
    return dict(PACKED_CONFIGS[6])


def packed_gemm(
    a: torch.Tensor,
    packed: torch.Tensor,
    k: int,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict | None = None,
) -> torch.Tensor:
    """a [M, K] (e4m3 or bf16 integer codes) x unpack(packed [N, ceil(K/4)])^T, scaled, + bias."""
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"packed_gemm: a must be [M, {k}], got {tuple(a.shape)}")
    a = a.contiguous()
    m = a.shape[0]
    n, kq = packed.shape
    c = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if m == 0:
        return c
    cfg = dict(config or _packed_config(m, n, kq, _sm_count(a.device.index or 0)))
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    packed_gemm_kernel[grid](
        a, packed, scale_a.reshape(-1).float().contiguous(), scale_b.reshape(-1).float().contiguous(),
        bias if bias is not None else c, c,
        m, n, k, kq, a.stride(0), packed.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, **cfg,
    )
    return c
