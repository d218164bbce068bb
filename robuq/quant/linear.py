"""QuantLinear: y = Q_a(x R) T(W')^T + b with W' = W R, R = D H the RobustQuantizer's rotation.

The latent weight lives in the rotated basis (computed once at conversion, in float64), so with
both quantizers off the layer equals the original ``nn.Linear``: (x R)(W R)^T = x R R^T W^T = x W^T.

``exact_rotation`` says which rotation the layer's codes come from: this pure-torch forward always
rotates exactly; the fused kernels (``robuq.kernels.qat.use_fused_kernels(exact_rotation=False)``)
may round once to bf16 inside the rotation, and export then records that (``robuq.deploy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .robust import RobustQuantizer
from .ternary import TernaryWeight


class QuantLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: RobustQuantizer, weight_quant: TernaryWeight | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.act = act.to(weight.device)
        self.weight_quant = weight_quant
        self.exact_rotation = True

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, act: RobustQuantizer, weight_quant: TernaryWeight | None) -> "QuantLinear":
        w = linear.weight
        rotated = (w.double() @ act.rotation_matrix(linear.in_features).to(w.device)).to(w.dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(rotated, bias, act, weight_quant)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects inputs with last dim {self.in_features}, got shape {tuple(x.shape)}")
        return F.linear(self.act(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
