"""A diffusers ``FeedForward`` whose GELU runs inside the rotate+quantize kernels of its output
projection: ``fc2(GELU(fc1(x)))`` with the kernel reading fc1's output h and quantizing GELU(h),
and the backward kernel multiplying by GELU'(h). In QAT this stops autograd from saving GELU(h)
(8192 x 4608 bf16 per block of DiT-XL/2 at batch 32: 2.1 GiB over 28 blocks). It is not faster
(H100, docs/PERFORMANCE.md): the kernel computes the GELU on its padded [64, 128] tiles (220 us
against 177 us without it, for a 54 us bf16 pass saved), and GELU + fc2 as a whole measured 303
against 294 us, the QAT step 120.2 against 117.9 ms. So the exported model keeps the separate pass
and QAT uses this only when asked (``use_fused_kernels(..., fuse_activations=True)``)."""

from __future__ import annotations

import types
from collections.abc import Callable

from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import nn


def _gelu_mlp(ff: FeedForward) -> bool:
    """``[GELU(tanh) projection, Dropout(0) ..., output projection]``: the DiT MLP."""
    net = list(ff.net)
    return (len(net) >= 3 and isinstance(net[0], GELU) and net[0].approximate == "tanh"
            and all(isinstance(m, nn.Dropout) and m.p == 0 for m in net[1:2] + net[3:]))


def _fused_forward(self: FeedForward, hidden_states, *args, **kwargs):
    return self._robuq_linears([self.net[2]], self.net[0].proj(hidden_states), act="gelu_tanh")[0]


def fuse_gelu(model: nn.Module, can_fuse: Callable, linears: Callable, enabled: bool = True) -> list[str]:
    """Run the GELU of every DiT-style ``FeedForward`` of ``model`` whose output projection
    ``can_fuse([layer])`` inside ``linears([layer], h, act="gelu_tanh")`` (``enabled=False``: restore
    diffusers' forward). Returns the names of the fused MLPs. The modules and their parameters are
    unchanged; only ``forward`` is overridden on the instance."""
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, FeedForward):
            continue
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_robuq_linears", None)
        if enabled and _gelu_mlp(m) and can_fuse([m.net[2]]):
            m.__dict__["_robuq_linears"] = linears
            m.forward = types.MethodType(_fused_forward, m)
            names.append(name)
    return names
