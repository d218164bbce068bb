"""Per-sample timestep-group ids, set by the model wrapper and read by quantizers.

Quantizers with per-timestep-group steps (``LSQQuantizer(groups=G)``) index their step by the
group of each sample's diffusion timestep: ``g = floor(t * G / T)``.
"""

from __future__ import annotations

import contextlib

import torch

_current: torch.Tensor | None = None


def timestep_group_ids(t: torch.Tensor, groups: int, num_timesteps: int = 1000) -> torch.Tensor:
    """Group id in [0, groups) of each integer timestep in [0, num_timesteps)."""
    return (t.long() * groups // num_timesteps).clamp_(0, groups - 1)


@contextlib.contextmanager
def timestep_groups(ids: torch.Tensor | None):
    """Run the model inside this so group-indexed quantizers see each sample's group id."""
    previous = set_timestep_groups(ids)
    try:
        yield
    finally:
        set_timestep_groups(previous)


def set_timestep_groups(ids: torch.Tensor | None) -> torch.Tensor | None:
    """Set the current group ids; returns the previous ones (for restoring)."""
    global _current
    previous, _current = _current, ids
    return previous


def current_timestep_groups() -> torch.Tensor | None:
    return _current
