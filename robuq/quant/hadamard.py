"""Orthonormal Hadamard transforms for any width n = m * 2^k.

The dense reference is ``hadamard_matrix(n)``; the fast path ``hadamard_transform`` computes
``x @ hadamard_matrix(n)`` as a Kronecker product ``H_m (x) H_{2^k}``: a fast Walsh-Hadamard
butterfly on the power-of-two factor (O(n log n)) and a small dense m x m matmul. The m x m
factors come from Paley's constructions (as QuaRot does for 12, 20, 28, 36, 40, ...). A
block-diagonal mode applies H_b on contiguous power-of-two blocks instead.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

_MAX_BASE = 256  # largest non-power-of-two Kronecker factor we build


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Paley I, prime q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]], order q + 1."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Paley II, prime q = 1 mod 4: C (x) [[1,-1],[-1,-1]] + I (x) [[1,1],[1,-1]], order 2(q + 1)."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


@functools.cache
def _base_constructions() -> dict[int, tuple[str, int]]:
    """Non-power-of-two orders m <= _MAX_BASE we can build, -> (construction, prime q)."""
    table: dict[int, tuple[str, int]] = {}
    for q in range(3, _MAX_BASE):
        if not _is_prime(q):
            continue
        m, kind = (q + 1, "paley1") if q % 4 == 3 else (2 * (q + 1), "paley2")
        if m <= _MAX_BASE and not _is_pow2(m) and m not in table:
            table[m] = (kind, q)
    # drop orders reachable as a smaller base times a power of two (24 = 12 * 2)
    bases = sorted(table)
    return {m: table[m] for m in bases if not any(m % b == 0 and _is_pow2(m // b) for b in bases if b < m)}


def supported_bases() -> list[int]:
    """The m in n = m * 2^k that ``factorize`` accepts (1 = pure power of two)."""
    return [1, *_base_constructions()]


def factorize(n: int) -> tuple[int, int]:
    """Split n into (m, 2^k) with m the smallest supported base; ValueError if impossible."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    for m in supported_bases():
        if n % m == 0 and _is_pow2(n // m):
            return m, n // m
    raise ValueError(
        f"no Hadamard transform of size {n}: supported sizes are m * 2^k with m in "
        f"{supported_bases()} (e.g. 1152 = 36*32, 4608 = 36*128, 192 = 12*16). "
        "Use rotation='block' with a power-of-two block size that divides n, or rotation='none'."
    )


@functools.cache
def _base_matrix(m: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix of order m (m = 1 or a Paley order)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _base_constructions()[m]
    h = _paley1(q) if kind == "paley1" else _paley2(q)
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)), f"bad Hadamard order {m}"
    return h


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, block_size: int | None = None) -> torch.Tensor:
    """Dense orthonormal H (float64) with ``hadamard_transform(x) == x @ H`` (reference only)."""
    if block_size is not None:
        _check_block(n, block_size)
        return torch.block_diag(*[_sylvester(block_size)] * (n // block_size)) / math.sqrt(block_size)
    m, p = factorize(n)
    return torch.kron(_base_matrix(m), _sylvester(p)) / math.sqrt(n)


def _check_block(n: int, block_size: int) -> None:
    if not _is_pow2(block_size) or n % block_size:
        raise ValueError(
            f"block Hadamard needs a power-of-two block size dividing {n}, got {block_size}; "
            f"the largest one is {largest_pow2_divisor(n)}"
        )


def largest_pow2_divisor(n: int) -> int:
    return n & -n


# Butterfly size of the Walsh-Hadamard stages: radix 16 on CPU; on GPUs fewer, larger GEMMs win
# (a 2^k x 2^k stage up to 256, so 1152 = 36 x 32 and 4608 = 36 x 128 are two small GEMMs).
RADIX = {"cpu": 16}
DEFAULT_RADIX = 256


@functools.cache
def _stage_matrices(n: int, block_size: int | None, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Unnormalised factors whose Kronecker product is H_n: the m x m Paley factor, then
    Sylvester butterflies for the power-of-two part (on CPU radix 16: H_{2^k} = H_16 (x) ... (x) H_r)."""
    radix = RADIX.get(device.type, DEFAULT_RADIX)
    m, p = (1, block_size) if block_size is not None else factorize(n)
    factors = [_base_matrix(m)] if m > 1 else []
    while p > 1:
        f = min(p, radix)
        factors.append(_sylvester(f))
        p //= f
    return tuple(f.to(device=device, dtype=dtype) for f in factors)


def _kron_matmul(x: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x @ (F_1 (x) F_2 (x) ...) along the last dim: one small batched GEMM per factor,
    each contracting one axis of x viewed as [..., f_1, f_2, ...] (O(n * sum f_i) work)."""
    n, lead = x.shape[-1], x.numel() // x.shape[-1]
    y, right = x, n
    for f in factors:
        size = f.shape[0]
        right //= size
        if right == 1:
            y = y.reshape(-1, size) @ f
        else:
            y = f.T @ y.reshape(lead * (n // (size * right)), size, right)
    return y.reshape(x.shape)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform (Sylvester order) along the last dim."""
    return _kron_matmul(x, _stage_matrices(x.shape[-1], x.shape[-1], x.device, x.dtype))


def hadamard_transform(x: torch.Tensor, dim: int = -1, block_size: int | None = None) -> torch.Tensor:
    """Orthonormal ``x @ H_n`` along ``dim``: H_m (x) H_{2^k}, or block-diagonal H_b if block_size."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    if block_size is not None:
        _check_block(n, block_size)
        y = _kron_matmul(x.reshape(*x.shape[:-1], n // block_size, block_size),
                         _stage_matrices(n, block_size, x.device, x.dtype)).reshape(x.shape)
        y = y / math.sqrt(block_size)
    else:
        y = _kron_matmul(x, _stage_matrices(n, None, x.device, x.dtype)) / math.sqrt(n)
    return y.movedim(-1, dim)


class HadamardRotation(nn.Module):
    """x -> (x * d) @ H: an orthonormal rotation of the last dim, d a fixed seeded random sign vector.

    ``matrix()`` is the dense R = diag(d) H, so a linear layer's weight moves into the rotated
    basis as W' = W R and ``rotate(x) @ W'^T == x @ W^T``.
    """

    def __init__(self, dim: int, block_size: int | None = None, random_signs: bool = True, seed: int = 0):
        super().__init__()
        if block_size is None:
            factorize(dim)
        else:
            _check_block(dim, block_size)
        self.dim, self.block_size = dim, block_size
        if random_signs:
            g = torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1
        else:
            signs = torch.ones(dim)
        self.register_buffer("signs", signs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"HadamardRotation of size {self.dim} got input with last dim {x.shape[-1]}")
        return hadamard_transform(x * self.signs.to(x.dtype), block_size=self.block_size)

    def matrix(self) -> torch.Tensor:
        return self.signs.double()[:, None] * hadamard_matrix(self.dim, self.block_size).to(self.signs.device)

    def extra_repr(self) -> str:
        kind = "kronecker" if self.block_size is None else f"block={self.block_size}"
        return f"dim={self.dim}, {kind}"
