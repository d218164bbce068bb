"""A training step's forward and backward captured once as a CUDA graph and replayed.

Eager PyTorch launches each of a DiT step's thousands of kernels from Python; on a slow host that,
not the GPU, sets the step time (docs/PERFORMANCE.md section 3.2). A CUDA graph records the kernels
once and replays them with one launch. The recipe is PyTorch's whole-network capture: inputs copied
into static buffers, warm-up on a side stream, autocast without its weight cache (the bf16 casts of
the weights must be recomputed by every replay, since the optimizer changes the weights), and
gradients that live in the graph's memory pool and are overwritten (not accumulated) by each
replay. The gradients are the graph's outputs (``torch.autograd.grad``), not accumulated into
``.grad`` by autograd: accumulation would run on the stream where an earlier, eager step first
touched each parameter, outside the capture. The optimizer step stays outside the graph: it is a
few fused launches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def autocast_without_cache(device_type: str = "cuda"):
    """The caller's autocast state (on or off, same dtype) with the weight-cast cache off.

    Besides capture, this changes one rounding: a weight used twice in a step (DiT's final layer
    reuses block 0's timestep embedder) gets a bf16 copy per use, whose gradients are summed in
    fp32, where the cache's shared copy sums them in bf16. ``DiTModule`` runs its eager steps this
    way too. Eager and replayed steps then agree bit for bit, on the reference and on the fused
    path (GPU test; docs/PERFORMANCE.md 3.2)."""
    with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                        enabled=torch.is_autocast_enabled(device_type), cache_enabled=False):
        yield


class CapturedStep:
    """``fn(*inputs)`` (a dict of scalar losses with the key ``"loss"``) and ``loss.backward()`` as one
    CUDA graph over ``params``' gradients.

    Built from one step's inputs (``warmup`` passes on a side stream, then the capture; neither
    changes a weight); each call copies its inputs into the static buffers and replays. A call
    whose inputs differ in shape, dtype or device returns None, and the caller runs that step
    eagerly. ``fn`` must not draw random numbers or synchronise with the host (draw outside, pass
    the draws in).
    """

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], params: Sequence[nn.Parameter],
                 inputs: Sequence[torch.Tensor], warmup: int = 1):
        self.params = [p for p in params if p.requires_grad]
        self.static = [x.detach().clone() for x in inputs]
        for p in self.params:  # free the eager steps' gradients and their cached blocks before the
            p.grad = None  # graph takes its own memory pool
        torch.cuda.empty_cache()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast_without_cache():
            for _ in range(warmup):  # lazy initialisation (cuBLAS, Triton, compile) outside the capture
                self._gradients(fn(*self.static))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's threads may touch CUDA (pinned memory) while we capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), autocast_without_cache():
            outputs = fn(*self.static)
            self.grads = self._gradients(outputs)  # live in the graph's pool, rewritten by each replay
        # detached: holding the captured autograd graph would keep its nodes (and their streams) alive
        self.outputs = {k: v.detach() for k, v in outputs.items()}

    def _gradients(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(outputs["loss"], self.params, allow_unused=True)

    def matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        return len(inputs) == len(self.static) and all(
            x.shape == s.shape and x.dtype == s.dtype and x.device == s.device for x, s in zip(inputs, self.static))

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Run one step on ``inputs``: the losses (copies), with the gradients in each parameter's
        ``.grad``; None if the inputs do not fit the captured ones."""
        if not self.matches(inputs):
            return None
        for s, x in zip(self.static, inputs):
            s.copy_(x)
        for p, g in zip(self.params, self.grads):  # the replay writes these: make them the gradients
            p.grad = g
        self.graph.replay()
        return {k: v.detach().clone() for k, v in self.outputs.items()}
