"""RobustQuantizer: a Hadamard rotation followed by an LSQ quantizer.

Rotating each token by an orthonormal H spreads outlier channels over all features; by the
CLT-style argument of RobuQ every rotated token is close to N(0, sigma_t^2), so one grid
(static) or one grid per token scale (dynamic) fits all tokens. ``rotation="none"`` keeps the
same code path with the identity, for ablations.
"""

from __future__ import annotations

import torch
from torch import nn

from .hadamard import HadamardRotation
from .lsq import LSQQuantizer

ROTATIONS = ("kronecker", "block", "none")


class RobustQuantizer(nn.Module):
    def __init__(
        self,
        dim: int,
        bits: int = 2,
        rotation: str = "kronecker",
        block_size: int | None = None,
        random_signs: bool = True,
        seed: int = 0,
        **lsq_kwargs,
    ):
        super().__init__()
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if rotation == "block" and block_size is None:
            block_size = dim & -dim
        self.rotation = (
            None
            if rotation == "none"
            else HadamardRotation(dim, block_size if rotation == "block" else None, random_signs, seed)
        )
        self.quantizer = LSQQuantizer(bits=bits, **lsq_kwargs)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rotation is None else self.rotation(x)

    def rotation_matrix(self, dim: int) -> torch.Tensor:
        """Dense float64 R with rotate(x) == x @ R."""
        return torch.eye(dim, dtype=torch.float64) if self.rotation is None else self.rotation.matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.rotate(x))
