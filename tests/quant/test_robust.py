"""RobustQuantizer: Hadamard rotation + LSQ, and the headline claim that the rotation makes 2-bit
per-token quantization of heavy-tailed activations much more accurate (and costs nothing on
Gaussian ones). Run with ``-s`` to see the measured figures."""

import pytest
import torch

from robuq.quant import RobustQuantizer, hadamard_matrix
from robuq.quant.lsq import LSQQuantizer

# (dim, tokens): about 50k elements each, so the data-driven init stays fast on CPU
SHAPES = [(192, 256), (1152, 48)]


def _gaussian(tokens, dim, g):
    return torch.randn(tokens, dim, generator=g)


def _outlier_channels(tokens, dim, g, k=4, energy=2.0):
    """Gaussian tokens whose k fixed channels are scaled up to carry `energy` x the rest's energy
    (c = sqrt(energy * dim / k): 9.8x at dim 192, 24x at 1152), as LLM/DiT activations show."""
    x = torch.randn(tokens, dim, generator=g)
    channels = torch.randperm(dim, generator=g)[:k]
    x[:, channels] *= (energy * dim / k) ** 0.5
    return x


def _student_t(tokens, dim, df=2.0):
    """i.i.d. Student-t entries (infinite variance at df=2): a few huge entries per token.
    torch's sampler draws from the global generator, which the test seeds."""
    return torch.distributions.StudentT(df).sample((tokens, dim))


def relative_error(x: torch.Tensor, rotation: str, mode: str, bits: int = 2) -> float:
    """Mean over tokens of ||x_hat - x||^2 / ||x||^2, x_hat = Q(x R) R^T back in the input basis."""
    rq = RobustQuantizer(x.shape[-1], bits=bits, rotation=rotation, seed=1, mode=mode)
    with torch.no_grad():
        x_hat = rq(x).double() @ rq.rotation_matrix(x.shape[-1]).T
    err = (x_hat - x.double()).pow(2).sum(-1) / x.double().pow(2).sum(-1)
    return err.mean().item()


def _unit_rms(x):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("dim,tokens", SHAPES)
def test_rotation_cuts_2bit_error_on_heavy_tails_not_on_gaussians(dim, tokens, mode):
    g = torch.Generator().manual_seed(dim)
    torch.manual_seed(dim)
    t2 = _student_t(tokens, dim)
    cases = {
        "gaussian": _gaussian(tokens, dim, g),
        "outlier channels": _outlier_channels(tokens, dim, g),
        # static mode has one step for all tokens and the rotation keeps each token's norm, so
        # the token-to-token scale spread of raw t(2) (orders of magnitude) is out of its reach:
        # static is judged on t(2) tokens of equal RMS, and raw t(2) only must not get worse.
        "student-t df=2": t2 if mode == "dynamic" else _unit_rms(t2),
        "raw student-t df=2": t2,
    }
    ratios = {}
    for name, x in cases.items():
        if mode == "dynamic" and name.startswith("raw"):
            continue
        plain, rotated = relative_error(x, "none", mode), relative_error(x, "kronecker", mode)
        ratios[name] = plain / rotated
        print(
            f"\nA2 {mode:7s} dim={dim:4d} {name:18s}: rel. MSE no rotation {plain:.4f}, "
            f"Hadamard {rotated:.4f}, ratio {ratios[name]:.2f}x",
            end="",
        )
        if name == "gaussian":  # sanity: the 2-bit error of a Gaussian is ~0.15, not ~0 or ~1
            assert 0.08 < rotated < 0.25 and 0.08 < plain < 0.25
    # measured over 8-12 seeds: outliers 3.0-3.7x, t(2) 2.5-3.6x, Gaussian 0.98-1.02x,
    # raw t(2) static 1.0-4.2x (1.0 when one extreme token sets the static step)
    assert ratios["outlier channels"] >= 2.0, ratios
    assert ratios["student-t df=2"] >= 2.0, ratios
    assert 0.9 <= ratios["gaussian"] <= 1.1, ratios
    assert ratios.get("raw student-t df=2", 1.0) >= 0.95, ratios


def test_rotated_tokens_are_gaussianised():
    """The mechanism behind the claim: after H, an outlier token's kurtosis drops to ~3."""
    g = torch.Generator().manual_seed(0)
    x = _outlier_channels(64, 1152, g).double()
    y = RobustQuantizer(1152, bits=2).rotate(x.float()).double()

    def kurtosis(t):
        t = t - t.mean(-1, keepdim=True)
        return (t.pow(4).mean(-1) / t.pow(2).mean(-1).pow(2)).mean().item()

    assert kurtosis(x) > 50
    assert 2.5 < kurtosis(y) < 3.6


# ---- construction and plumbing ----------------------------------------------------------------


@pytest.mark.parametrize("rotation,block", [("kronecker", None), ("block", 64), ("block", None), ("none", None)])
def test_forward_is_quantizer_of_rotation(rotation, block):
    rq = RobustQuantizer(192, bits=2, rotation=rotation, block_size=block, mode="static").double()
    x = torch.randn(4, 7, 192, dtype=torch.float64)
    r = rq.rotation_matrix(192)
    torch.testing.assert_close(rq.rotate(x), x @ r, rtol=0, atol=1e-12)
    ref_q = LSQQuantizer(bits=2, mode="static").double()
    torch.testing.assert_close(rq(x), ref_q(x @ r), rtol=0, atol=1e-12)
    torch.testing.assert_close(rq.quantizer.step, ref_q.step)


def test_block_default_is_largest_power_of_two_divisor():
    rq = RobustQuantizer(1152, rotation="block")
    assert rq.rotation.block_size == 128
    expected = rq.rotation.signs.double()[:, None] * hadamard_matrix(1152, 128)
    torch.testing.assert_close(rq.rotation_matrix(1152), expected)


def test_none_rotation_is_identity():
    rq = RobustQuantizer(10, rotation="none")  # any width works without a rotation
    assert rq.rotation is None
    assert torch.equal(rq.rotation_matrix(10), torch.eye(10, dtype=torch.float64))
    x = torch.randn(3, 10)
    assert torch.equal(rq.rotate(x), x)


def test_lsq_options_are_forwarded():
    rq = RobustQuantizer(192, bits=3, mode="static", stat="absmax", signed=False, groups=2)
    q = rq.quantizer
    assert (q.bits, q.mode, q.stat, q.signed, q.groups) == (3, "static", "absmax", False, 2)


@pytest.mark.parametrize(
    "kwargs,match", [({"rotation": "hadamard"}, "rotation"), ({"bits": 9}, "1..8"), ({"mode": "x"}, "mode")]
)
def test_bad_arguments_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobustQuantizer(192, **kwargs)


def test_unsupported_dimension_refused():
    with pytest.raises(ValueError, match="supported sizes"):
        RobustQuantizer(52, rotation="kronecker")
    with pytest.raises(ValueError, match="power-of-two block size"):
        RobustQuantizer(192, rotation="block", block_size=128)
