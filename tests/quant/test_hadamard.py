"""The fast Hadamard transform against dense float64 references."""

import math

import pytest
import scipy.linalg
import torch

from robuq.quant import HadamardRotation, hadamard_matrix, hadamard_transform, supported_bases
from robuq.quant.hadamard import factorize, fwht

# every Kronecker base the DiT widths need (40 = 20 * 2 goes through factorize) times a few 2^k
BASES = [1, 12, 20, 28, 36, 40]
POW2 = [1, 2, 4, 32]
SIZES = sorted({m * p for m in BASES for p in POW2 if m * p > 1} | {192, 768, 1152, 4608})
UNSUPPORTED = [3, 6, 10, 14, 52, 92, 100, 92 * 64]


def _is_orthonormal(h: torch.Tensor) -> bool:
    """H H^T = I; above 1024 probed with random vectors (the full n^3 product is too slow)."""
    n = h.shape[0]
    if n <= 1024:
        return torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), rtol=0, atol=1e-10)
    v = torch.randn(n, 8, dtype=h.dtype)
    return torch.allclose(h @ (h.T @ v), v, rtol=0, atol=1e-10) and torch.allclose(h.T @ (h @ v), v, rtol=0, atol=1e-10)


def _is_hadamard(h: torch.Tensor) -> bool:
    """Entries +-1/sqrt(n) and orthonormal rows: a genuine normalised Hadamard matrix."""
    n = h.shape[0]
    entries_ok = torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-12)
    return entries_ok and _is_orthonormal(h)


@pytest.mark.parametrize("n", SIZES)
def test_matches_dense_reference(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert _is_hadamard(h), f"hadamard_matrix({n}) is not a normalised Hadamard matrix"
    x = torch.randn(5, 3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ h, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [192, 1152, 4608])
def test_float32_close_to_float64_reference(n):
    x = torch.randn(7, n, dtype=torch.float64)
    y = hadamard_transform(x.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x @ hadamard_matrix(n), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [192, 1152, 4608])
def test_kronecker_mixes_every_feature(n):
    """A unit vector spreads over all n outputs with magnitude 1/sqrt(n) (no block structure)."""
    e = torch.zeros(n, dtype=torch.float64)
    e[n // 3] = 1.0
    torch.testing.assert_close(hadamard_transform(e).abs(), torch.full((n,), n**-0.5, dtype=torch.float64))


def test_every_supported_base_is_a_hadamard_matrix():
    bases = supported_bases()
    assert bases[0] == 1 and {12, 20, 28, 36} <= set(bases)
    for m in bases[1:]:
        assert factorize(m) == (m, 1)
        assert _is_hadamard(hadamard_matrix(m)), m
        assert _is_hadamard(hadamard_matrix(4 * m)), 4 * m


@pytest.mark.parametrize("n", [2, 8, 64, 1024])
def test_power_of_two_is_sylvester_symmetric_involution(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h, torch.from_numpy(scipy.linalg.hadamard(n)).double() / math.sqrt(n), rtol=0, atol=0)
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
    torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x, rtol=0, atol=1e-12)


def test_fwht_is_unnormalised_sylvester():
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ torch.from_numpy(scipy.linalg.hadamard(32)).double(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [12, 192, 1152, 4608])
def test_orthonormal_and_norm_preserving(n):
    h = hadamard_matrix(n)
    assert _is_orthonormal(h)
    x = torch.randn(16, n, dtype=torch.float64) * torch.logspace(-3, 3, 16, dtype=torch.float64)[:, None]
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    # the inverse is the transpose: x = y H^T
    torch.testing.assert_close(y @ h.T, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim", [0, 1, -2, 2, -1])
def test_dim_argument(dim):
    shape = [4, 6, 5]
    n = 24
    shape[dim] = n
    x = torch.randn(*shape, dtype=torch.float64)
    ref = (x.movedim(dim, -1) @ hadamard_matrix(n)).movedim(-1, dim)
    y = hadamard_transform(x, dim=dim)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,block", [(192, 64), (192, 16), (1152, 128), (768, 256), (4608, 512), (96, 1)])
def test_block_mode_matches_block_diagonal_reference(n, block):
    hb = torch.from_numpy(scipy.linalg.hadamard(block)).double() / math.sqrt(block)
    ref = torch.block_diag(*[hb] * (n // block))
    torch.testing.assert_close(hadamard_matrix(n, block_size=block), ref, rtol=0, atol=0)
    x = torch.randn(3, n, dtype=torch.float64)
    y = hadamard_transform(x, block_size=block)
    torch.testing.assert_close(y, x @ ref, rtol=0, atol=1e-12)
    # block mode never mixes features across blocks
    e = torch.zeros(n, dtype=torch.float64)
    e[block] = 1.0
    assert torch.count_nonzero(hadamard_transform(e, block_size=block)) == block


@pytest.mark.parametrize("n,block", [(192, 48), (192, 128), (1152, 3), (64, 0)])
def test_block_mode_refuses_bad_block(n, block):
    with pytest.raises(ValueError, match="power-of-two block size"):
        hadamard_transform(torch.randn(2, n), block_size=block)
    with pytest.raises(ValueError, match="power-of-two block size"):
        HadamardRotation(n, block_size=block)


@pytest.mark.parametrize("n,block", [(1152, None), (96, None), (192, 64)])
def test_gradient_is_transpose_of_dense_reference(n, block):
    h = hadamard_matrix(n, block)
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, n, dtype=torch.float64)
    (hadamard_transform(x, block_size=block) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ((x_ref @ h) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, g @ h.T, rtol=0, atol=1e-12)


def test_gradcheck_small():
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hadamard_transform, (x,))


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_size_raises_with_supported_bases(n):
    with pytest.raises(ValueError) as info:
        factorize(n)
    message = str(info.value)
    assert str(n) in message and str(supported_bases()) in message
    with pytest.raises(ValueError, match="supported sizes"):
        hadamard_transform(torch.randn(2, n))
    with pytest.raises(ValueError, match="supported sizes"):
        hadamard_matrix(n)
    with pytest.raises(ValueError, match="supported sizes"):
        HadamardRotation(n)


@pytest.mark.parametrize("n", [0, -4])
def test_non_positive_size_raises(n):
    with pytest.raises(ValueError, match="positive"):
        factorize(n)


@pytest.mark.parametrize("n", [192, 1152])
def test_bfloat16_input(n):
    x = torch.randn(8, n, dtype=torch.float64)
    y = hadamard_transform(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    ref = x.bfloat16().double() @ hadamard_matrix(n)
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


# ---- HadamardRotation ------------------------------------------------------------------------


@pytest.mark.parametrize("n,block", [(192, None), (1152, None), (192, 64), (768, 128)])
def test_rotation_matrix_is_orthonormal_and_matches_forward(n, block):
    rot = HadamardRotation(n, block_size=block, seed=3)
    r = rot.matrix()
    assert r.dtype == torch.float64
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(r, rot.signs.double()[:, None] * hadamard_matrix(n, block), rtol=0, atol=0)
    x = torch.randn(2, 5, n, dtype=torch.float64)
    torch.testing.assert_close(rot(x), x @ r, rtol=0, atol=1e-12)


def test_rotation_signs_are_seeded():
    a, b, c = HadamardRotation(192, seed=0), HadamardRotation(192, seed=0), HadamardRotation(192, seed=1)
    assert set(a.signs.tolist()) == {-1.0, 1.0}
    assert torch.equal(a.signs, b.signs)
    assert not torch.equal(a.signs, c.signs)
    # roughly balanced signs (a broken generator giving all +1 would fail)
    assert 40 < int((a.signs > 0).sum()) < 152
    plain = HadamardRotation(192, random_signs=False)
    assert torch.equal(plain.signs, torch.ones(192))
    torch.testing.assert_close(plain.matrix(), hadamard_matrix(192), rtol=0, atol=0)


def test_rotation_signs_live_in_state_dict():
    a, c = HadamardRotation(192, seed=0), HadamardRotation(192, seed=1)
    sd = a.state_dict()
    assert set(sd) == {"signs"} and torch.equal(sd["signs"], a.signs)
    c.load_state_dict(sd)
    assert torch.equal(c.signs, a.signs)
    x = torch.randn(3, 192)
    torch.testing.assert_close(c(x), a(x), rtol=0, atol=0)


def test_rotation_refuses_wrong_width():
    with pytest.raises(ValueError, match="192"):
        HadamardRotation(192)(torch.randn(2, 96))
