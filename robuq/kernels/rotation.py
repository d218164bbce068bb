"""Host-side description of a RobustQuantizer rotation as two small dense factors (no Triton here).

A token of width n is viewed as a matrix X [rows, P] (element ``i * P + j``); the rotation
``(x * d) @ H`` with ``H = kron(A, B) / sqrt(n)`` is then ``Y = A^T (X * D) B / sqrt(n)``, so a
kernel does two small matrix products per token on tensor cores:

* Kronecker ``H_m (x) H_{2^k}``: A = H_m (Paley, +-1), B = Sylvester H_{2^k}; for a pure power of
  two, A and B are two Sylvester factors (H_{2^(a+b)} = H_{2^a} (x) H_{2^b}).
* block-diagonal ``H_b``: A = identity (no left product), B = H_b.
* none: no products, the layout only tiles the token.

``rows`` is padded to ``MP`` (a power of two, at least 16) with zero rows/columns in A^T.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from robuq.quant.hadamard import _base_matrix, _sylvester, factorize

MIN_DOT = 16  # smallest tl.dot dimension
MAX_TILE = 8192  # MP * P elements of fp32 held per token by one program


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class RotationLayout:
    dim: int
    rows: int  # valid rows of the token matrix
    P: int  # columns (power of two)
    MP: int  # padded rows (power of two >= 16)
    kind: str  # "kronecker" | "block" | "none"
    has_left: bool
    sqrt_n: float

    @property
    def supported(self) -> bool:
        if self.MP * self.P > MAX_TILE:
            return False
        return self.kind == "none" or self.P >= MIN_DOT

    @property
    def r_first(self) -> bool:
        """Do the right (B) product first: the first product is the exact one (bf16 input, +-1
        factor), so give it the larger factor and leave the smaller one to the hi/lo split."""
        return self.P >= self.MP


@functools.lru_cache(maxsize=None)
def rotation_layout(dim: int, kind: str, block_size: int | None) -> RotationLayout:
    if kind == "block":
        p = block_size
        return RotationLayout(dim, dim // p, p, max(MIN_DOT, _next_pow2(dim // p)), kind, False, math.sqrt(p))
    if kind == "none":
        p = min(dim & -dim, 128)
        return RotationLayout(dim, dim // p, p, max(MIN_DOT, _next_pow2(dim // p)), kind, False, 1.0)
    m, p = factorize(dim)
    if m == 1:  # pure power of two: split into two Sylvester factors, P at most 64
        P = min(p, 64)
        rows = p // P
        return RotationLayout(dim, rows, P, max(MIN_DOT, _next_pow2(rows)), kind, rows > 1, math.sqrt(dim))
    return RotationLayout(dim, m, p, max(MIN_DOT, _next_pow2(m)), kind, True, math.sqrt(dim))


def rotation_kind(rotation_module) -> tuple[str, int | None]:
    """('kronecker' | 'block' | 'none', block_size) of a RobustQuantizer's ``rotation`` attribute."""
    if rotation_module is None:
        return "none", None
    if rotation_module.block_size is None:
        return "kronecker", None
    return "block", int(rotation_module.block_size)


@functools.lru_cache(maxsize=64)
def _factors_cpu(dim: int, kind: str, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A padded [MP, MP], B [P, P]) in float64 (unnormalised +-1; A identity-free when unused)."""
    lay = rotation_layout(dim, kind, block_size)
    a = torch.zeros(lay.MP, lay.MP, dtype=torch.float64)
    if lay.has_left:
        m, _ = factorize(dim)
        base = _base_matrix(m) if m > 1 else _sylvester(lay.rows)
        a[: lay.rows, : lay.rows] = base
    b = _sylvester(lay.P) if kind != "none" else torch.eye(lay.P, dtype=torch.float64)
    assert torch.equal(b, b.T)  # the backward kernel relies on B = B^T (Sylvester)
    return a, b


_DEVICE_CACHE: dict = {}


def rotation_factors(dim: int, kind: str, block_size: int | None, device, dtype) -> dict[str, torch.Tensor]:
    """Device tensors: left = A^T, left_t = A, right = B, right_t = B^T (all exact +-1/0 in ``dtype``)."""
    key = (dim, kind, block_size, str(device), dtype)
    hit = _DEVICE_CACHE.get(key)
    if hit is None:
        a, b = _factors_cpu(dim, kind, block_size)
        hit = {
            "left": a.T.contiguous().to(device=device, dtype=dtype),
            "left_t": a.contiguous().to(device=device, dtype=dtype),
            "right": b.contiguous().to(device=device, dtype=dtype),
            "right_t": b.T.contiguous().to(device=device, dtype=dtype),
        }
        _DEVICE_CACHE[key] = hit
    return hit


def reference_rotate(x: torch.Tensor, signs: torch.Tensor, dim: int, kind: str, block_size: int | None) -> torch.Tensor:
    """The two-factor formula in plain torch (float64 check of the layout; not used at run time)."""
    lay = rotation_layout(dim, kind, block_size)
    a, b = _factors_cpu(dim, kind, block_size)
    X = (x.double() * signs.double()).reshape(-1, lay.rows, lay.P)
    if kind == "none":
        return X.reshape(x.shape)
    a = a[: lay.rows, : lay.rows] if lay.has_left else torch.eye(lay.rows, dtype=torch.float64)
    Y = a.T.to(x.device) @ X @ b.to(x.device)
    return (Y / lay.sqrt_n).reshape(x.shape)


def reference_rms_backward(x, dy, signs, dim: int, alpha: float, bits: int = 2, eps: float = 1e-6):
    """(dx, dL/dalpha per token) of the signed per-token rms LSQ straight-through backward of a
    Kronecker rotation (``triton_quant``'s docstring), in float64 (checks and diagnostics only)."""
    lay = rotation_layout(dim, "kronecker", None)
    y = reference_rotate(x.double(), signs.double(), dim, "kronecker", None)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    st = y.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(eps)
    v = y / (alpha * st)
    inr = (v >= -qn) & (v <= qp)
    q = torch.round(v.clamp(-qn, qp))
    g = dy.double()
    gs = (g * (q - torch.where(inr, v, 0))).sum(-1, keepdim=True)
    d = torch.where(inr, g, 0) + gs * alpha / (dim * st) * y
    a, b = _factors_cpu(dim, "kronecker", None)
    a, b = a[: lay.rows, : lay.rows].to(x.device), b.to(x.device)
    dx = (a @ d.reshape(-1, lay.rows, lay.P) @ b.T).reshape(d.shape) / lay.sqrt_n * signs.double()
    return dx, (gs * st)[:, 0]
