"""Ternary (1.58-bit) weights, BitNet b1.58 "absmean":  w_q = s * clip(round(w / s), -1, 1),
s = mean(|w|) per output channel (or per tensor), with a straight-through gradient to w."""

from __future__ import annotations

import torch
from torch import nn

GRANULARITIES = ("channel", "tensor")


def ternary_codes(w: torch.Tensor, granularity: str = "channel", eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in {-1, 0, 1} (same dtype as w) and the scale s ([out, 1] per channel, [1, 1] per tensor)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"ternary granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if w.dim() != 2:
        raise ValueError(f"ternary weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    a = w.detach().abs()
    s = a.mean(dim=1, keepdim=True) if granularity == "channel" else a.mean().reshape(1, 1)
    s = s.clamp_min(eps)
    return (w.detach() / s).round().clamp_(-1, 1), s


class TernaryWeight(nn.Module):
    """Fake-quantises a latent weight to s * {-1, 0, 1}; backward is the identity (STE)."""

    def __init__(self, granularity: str = "channel", eps: float = 1e-8):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"ternary granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity, self.eps = granularity, eps

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, s = ternary_codes(w, self.granularity, self.eps)
        return codes * s + (w - w.detach())  # exactly s * {-1, 0, 1} forward, identity backward

    def extra_repr(self) -> str:
        return f"granularity={self.granularity}"
