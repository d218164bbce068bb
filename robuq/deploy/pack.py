"""2-bit packing of ternary weights (pure torch, any device).

Layout ("quarter-planar", ``PACK_LAYOUT``): a ternary matrix ``codes`` [N, K] with entries in
{-1, 0, 1} is stored as ``packed`` [N, Kq] uint8 with ``Kq = ceil(K / 4)``. Byte ``j`` of row ``n``
holds the four codes at columns ``j``, ``j + Kq``, ``j + 2 Kq`` and ``j + 3 Kq`` (each stored as
``code + 1`` in {0, 1, 2}) in bit pairs 0-1, 2-3, 4-5 and 6-7; columns at or past ``K`` (the
padding when K is not a multiple of 4) are stored as code 0.

Why quarters rather than four neighbouring columns per byte: a GEMM kernel that walks K in tiles
of ``BK`` bytes unpacks each byte tile into four ready-made [BN, BK] weight tiles (one per bit
pair) that meet four contiguous activation tiles, so no register interleaving is needed.

The per-output-channel scale (absmean) is kept beside the codes in float32; ``w = codes * scale``.
"""

from __future__ import annotations

import torch

PACK_LAYOUT = "quarter-planar-2bit-v1"


def packed_cols(k: int) -> int:
    """Bytes per row for K ternary codes."""
    if k < 1:
        raise ValueError(f"need at least one column to pack, got K={k}")
    return (k + 3) // 4


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in {-1, 0, 1} (any dtype) -> [N, ceil(K/4)] uint8 (see module docstring)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D [out, in] tensor, got shape {tuple(codes.shape)}")
    c = codes.detach()
    if c.is_floating_point():
        if not torch.equal(c, c.round()):
            raise ValueError("pack_ternary: codes must be integers in {-1, 0, 1}")
    c = c.to(torch.int16)
    if c.numel() and (c.min() < -1 or c.max() > 1):
        raise ValueError(f"pack_ternary: codes must be in {{-1, 0, 1}}, got range [{int(c.min())}, {int(c.max())}]")
    n, k = c.shape
    kq = packed_cols(k)
    u = torch.ones(n, 4 * kq, dtype=torch.int16, device=c.device)  # code 0 -> stored 1
    u[:, :k] = c + 1
    u = u.view(n, 4, kq)
    out = u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6)
    return out.to(torch.uint8).contiguous()


def unpack_ternary(packed: torch.Tensor, k: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of ``pack_ternary``: [N, ceil(K/4)] uint8 -> [N, K] codes in {-1, 0, 1} of ``dtype``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary expects a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    kq = packed_cols(k)
    if packed.shape[1] != kq:
        raise ValueError(f"packed tensor has {packed.shape[1]} bytes per row; K={k} needs {kq}")
    p = packed.to(torch.int16)
    planes = [((p >> (2 * q)) & 3) - 1 for q in range(4)]
    codes = torch.cat(planes, dim=1)[:, :k]
    if codes.numel() and codes.max() > 1:
        raise ValueError("unpack_ternary: found the unused bit pattern 0b11 (corrupt or not a ternary pack)")
    return codes.to(dtype)


def pack_weight(weight: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarise a latent weight exactly as ``robuq.quant.TernaryWeight`` does and pack it.

    Returns (packed uint8 [N, ceil(K/4)], scale float32 [N]); the per-tensor scale is broadcast.
    """
    from robuq.quant.ternary import ternary_codes

    codes, scale = ternary_codes(weight.detach(), granularity)
    return pack_ternary(codes), scale.reshape(-1).expand(weight.shape[0]).float().contiguous()


def unpack_weight(packed: torch.Tensor, scale: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``codes * scale`` [N, K] (the fake-quant weight the student used)."""
    return unpack_ternary(packed, k, dtype) * scale.to(dtype)[:, None]
