"""Learned step size quantization (LSQ, Esser et al., ICLR 2020) for activations.

    x_q = s * clip(round(x / s), -Q_n, Q_p),    dL/ds scaled by g = 1 / sqrt(numel * Q_p)

with a straight-through estimator through round. Signed b-bit: Q_n = 2^(b-1), Q_p = 2^(b-1) - 1;
signed 1-bit is sign(x) * s. Unsigned b-bit: Q_n = 0, Q_p = 2^b - 1.

Modes:
  * ``static``: one learned step per layer, or per timestep group (``groups > 1``; the group of
    each sample is read from ``robuq.quant.context``);
  * ``dynamic``: per-token step s_t = alpha * stat(x_t) with stat the token's RMS or absmax over
    the feature dim and alpha learned (per layer or per timestep group).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .context import current_timestep_groups

MODES = ("static", "dynamic")
STATS = ("rms", "absmax")
FULL_PRECISION = 16  # act_bits value meaning "do not quantize"


def check_bits(bits: int, where: str = "activation bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 8 or bits == FULL_PRECISION):
        raise ValueError(f"{where} must be an integer in 1..8 (or {FULL_PRECISION} for full precision), got {bits!r}")
    return bits


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_n, Q_p): the grid is the integers in [-Q_n, Q_p]."""
    if signed:
        return (1, 1) if bits == 1 else (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return 0, 2**bits - 1


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by g."""
    return (x - x * g).detach() + x * g


class _FakeQuantize(torch.autograd.Function):
    """s * clip(round(x / s), -Q_n, Q_p) with LSQ's gradients, in closed form:
    dy/dx = 1 inside the clip range else 0;  dy/ds = round(v) - v inside, -Q_n below, Q_p above."""

    @staticmethod
    def forward(ctx, x, step, qn, qp, binary):
        v = (x / step).clamp(-qn, qp)
        r = torch.where(v >= 0, 1.0, -1.0).to(v.dtype) if binary else v.round()
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp, ctx.binary = qn, qp, binary
        return r * step

    @staticmethod
    def backward(ctx, grad):
        x, step = ctx.saved_tensors
        v = x / step
        inside = (v >= -ctx.qn) & (v <= ctx.qp)
        vc = v.clamp(-ctx.qn, ctx.qp)
        r = torch.where(vc >= 0, 1.0, -1.0).to(v.dtype) if ctx.binary else vc.round()
        grad_x = grad * inside
        grad_step = grad * (r - torch.where(inside, v, 0.0))
        grad_step = _reduce_to(grad_step, step.shape)
        return grad_x, grad_step, None, None, None


def _reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    lead = g.dim() - len(shape)
    g = g.sum(dim=tuple(range(lead))) if lead else g
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and g.shape[d] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def fake_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """s * clip(round(x / s), -Q_n, Q_p) with the LSQ straight-through gradient; ``step`` broadcasts against x."""
    qn, qp = qrange(bits, signed)
    return _FakeQuantize.apply(x, step, qn, qp, signed and bits == 1)


def token_stat(x: torch.Tensor, stat: str, eps: float = 1e-6) -> torch.Tensor:
    """Per-token RMS or absmax over the last dim, keepdim, at least eps.

    The RMS clamps before the sqrt: sqrt's gradient at 0 is inf, and clamping after it turns an
    all-zero token's gradient into 0 * inf = NaN."""
    if stat == "rms":
        return x.pow(2).mean(-1, keepdim=True).clamp_min(eps * eps).sqrt()
    return x.abs().amax(-1, keepdim=True).clamp_min(eps)


class LSQQuantizer(nn.Module):
    """Learned-step fake quantizer for activations (see module docstring for the equations)."""

    def __init__(self, bits: int = 2, signed: bool = True, mode: str = "dynamic", stat: str = "rms", groups: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"LSQ mode must be one of {MODES}, got {mode!r}")
        if stat not in STATS:
            raise ValueError(f"LSQ stat must be one of {STATS}, got {stat!r}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"timestep groups must be a positive integer, got {groups!r}")
        self.bits = check_bits(bits)
        self.signed, self.mode, self.stat, self.groups = signed, mode, stat, groups
        # static: the step s; dynamic: the factor alpha in s_t = alpha * stat(x_t)
        self.step = nn.Parameter(torch.ones(groups))
        self.initialized = False

    @property
    def enabled(self) -> bool:
        return self.bits != FULL_PRECISION

    def set_bits(self, bits: int, reinit: bool = True) -> None:
        """Change the width (AMPN); with ``reinit`` the step is re-initialised from the next batch."""
        self.bits = check_bits(bits)
        if reinit:
            self.initialized = False

    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "initialized": self.initialized}

    def set_extra_state(self, state: dict) -> None:
        self.bits = check_bits(int(state["bits"]))
        self.initialized = bool(state["initialized"])

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x / token_stat(x, self.stat) if self.mode == "dynamic" else x

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """MSE-optimal step on this batch: a grid search over s (or alpha), averaged over DDP ranks."""
        z = self._normalise(x.detach().float()).flatten()
        if z.numel() > 1 << 15:  # a fixed-stride subsample is plenty to place one step
            z = z[:: z.numel() // (1 << 15)]
        z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        qn, qp = qrange(self.bits, self.signed)
        scale = z.abs().max().clamp_min(1e-8) / max(qn, qp, 1)
        candidates = scale * torch.logspace(-3, 0.5, 96, device=z.device)
        err = torch.stack([(fake_quantize(z, s, self.bits, self.signed) - z).pow(2).mean() for s in candidates])
        best = candidates[err.argmin()]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(best)
            best /= dist.get_world_size()
        self.step.fill_(best.item())
        self.initialized = True

    def _group_index(self, x: torch.Tensor) -> torch.Tensor:
        ids = current_timestep_groups()
        if ids is None:
            raise RuntimeError(
                f"this quantizer has {self.groups} timestep-group steps but no group ids were set: "
                "run the model inside `with robuq.quant.timestep_groups(ids):`"
            )
        if ids.shape != (x.shape[0],):
            raise ValueError(f"timestep-group ids of shape {tuple(ids.shape)} do not match batch size {x.shape[0]}")
        return ids.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or x.numel() == 0:
            return x
        if not self.initialized:
            self.initialize(x)
        _, qp = qrange(self.bits, self.signed)
        g = 1.0 / math.sqrt(x.numel() / self.groups * max(qp, 1))
        step = grad_scale(self.step, g).abs().clamp_min(1e-8).to(x.dtype)
        if self.groups > 1:
            step = step[self._group_index(x)].reshape(-1, *([1] * (x.dim() - 1)))
        else:
            step = step.reshape([1] * x.dim())
        if self.mode == "dynamic":
            step = step * token_stat(x, self.stat)
        return fake_quantize(x, step, self.bits, self.signed)

    def extra_repr(self) -> str:
        g = f", groups={self.groups}" if self.groups > 1 else ""
        return f"bits={self.bits}, signed={self.signed}, mode={self.mode}, stat={self.stat}{g}"
