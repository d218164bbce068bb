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

``CapturedStep`` is that whole step, for one GPU. ``GraphedBlocks`` is PyTorch's partial-network
capture instead: each transformer block's forward and backward as graphs behind one autograd node,
with autograd, the optimizer and DDP's all-reduce outside them, so multi-GPU runs can use it;
``CapturedForward`` is a frozen model's forward (the teacher) as one graph.
"""

from __future__ import annotations

import contextlib
import types
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
        return _same_kind(inputs, self.static)

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


def _same_kind(inputs: Sequence[torch.Tensor], static: Sequence[torch.Tensor]) -> bool:
    return len(inputs) == len(static) and all(
        x.shape == s.shape and x.dtype == s.dtype and x.device == s.device for x, s in zip(inputs, static))


class CapturedForward:
    """``fn(*inputs)`` without autograd (a frozen teacher's forward) as one CUDA graph, replayed on
    inputs of the captured shapes, dtypes and device under the captured autocast state; a call on
    any other returns None (the caller runs ``fn`` eagerly). The result is a copy. ``fn`` must
    not draw random numbers or synchronise with the host."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], warmup: int = 1):
        self.static = [x.detach().clone() for x in inputs]
        self.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), autocast_without_cache():
            for _ in range(warmup):
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), torch.no_grad(), autocast_without_cache():
            self.output = fn(*self.static)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | None:
        if not _same_kind(inputs, self.static) or (
                torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) != self.autocast:
            return None
        for s, x in zip(self.static, inputs):
            s.copy_(x)
        self.graph.replay()
        return self.output.clone()


class GraphedBlocks:
    """Each of ``blocks`` (a DiT's transformer blocks) replayed as two CUDA graphs, its forward and its
    backward, while the rest of the step stays eager (PyTorch's partial-network capture, as
    ``torch.cuda.make_graphed_callables`` does it).

    Where ``CapturedStep`` graphs the whole step for one GPU, this keeps autograd, the gradient
    accumulation and anything hooked onto it outside the graphs: DDP's bucketed all-reduce overlaps
    the backward as usual, so a multi-GPU run gets the graphs too. The host then issues two replays
    per block instead of each block's hundreds of launches (the fused QAT path's Python, Triton
    launches and small ops; docs/PERFORMANCE.md section 3.3).

    ``run()`` runs the forward the blocks will see (grad enabled, the step's autocast); each block's
    inputs are recorded there and its graphs captured for exactly those: the same shapes, strides,
    dtypes, ``requires_grad``, non-tensor arguments, autocast state and training mode. Any other
    call (a smaller last batch, validation under ``no_grad``, eval mode) runs the block's own
    forward. The capture runs each block on stand-ins of its parameters (same storage), so it never
    meets the autograd nodes that earlier steps, or DDP, keep for the parameters themselves (those
    live on the default stream, which a capture must not wait on; ``make_graphed_callables`` fails
    there). The graphs' outputs, saved activations and gradients live in one memory pool and are
    rewritten by the next replay, so a step must finish its backward before the next forward, and the
    gradients must be dropped between steps (``zero_grad(set_to_none=True)``, torch's and Lightning's
    default; no accumulation over several forwards): a parameter's ``.grad`` may alias the pool.
    Autocast must run without its weight cache (``autocast_without_cache``), no block may draw
    random numbers on the host or synchronise with it, and the optimizer must update the
    parameters in place. ``restore()`` gives the blocks their forwards back.
    """

    def __init__(self, blocks: Sequence[nn.Module], run: Callable[[], object], warmup: int = 3):
        if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
            raise ValueError("GraphedBlocks: autocast's weight cache would keep one step's bf16 weights in the "
                             "graphs; run under autocast_without_cache()")
        self.blocks = list(blocks)
        inputs: list[tuple[tuple, dict] | None] = [None] * len(self.blocks)

        def record(i):
            def hook(module, args, kwargs):
                if inputs[i] is None:
                    inputs[i] = _detached_copy((args, kwargs))
            return hook

        handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in inputs):
            raise RuntimeError("GraphedBlocks: run() did not call every block; nothing to capture for the others")
        self.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        self._saved_forwards = [b.__dict__.get("forward") for b in self.blocks]
        self.graphs = [_BlockGraph(b, b.forward, args, kwargs) for b, (args, kwargs) in zip(self.blocks, inputs)]
        self._capture(warmup)
        for i, block in enumerate(self.blocks):
            block.forward = types.MethodType(_graphed_block_forward(self, i, block.forward), block)

    def _capture(self, warmup: int) -> None:
        side, pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up and captures on one stream, in the live run's order
            for g in self.graphs:
                for _ in range(warmup):
                    g.warm_up()
            for g in self.graphs:
                g.capture_forward(pool, side)
            for g in reversed(self.graphs):
                g.capture_backward(pool, side)
        torch.cuda.current_stream().wait_stream(side)

    def matches(self, i: int, leaves: list, spec) -> bool:
        g = self.graphs[i]
        if spec != g.spec or self.blocks[i].training != g.training or not torch.is_grad_enabled():
            return False
        if (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) != self.autocast:
            return False
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if len(tensors) != len(g.inputs) or any(_meta(t) != _meta(s) for t, s in zip(tensors, g.inputs)):
            return False
        return all(c is _TENSOR or (not isinstance(x, torch.Tensor) and x == c) for x, c in zip(leaves, g.consts))

    def restore(self) -> None:
        for block, fwd in zip(self.blocks, self._saved_forwards):
            block.__dict__.pop("forward", None)
            if fwd is not None:
                block.forward = fwd


_TENSOR = object()  # where a tensor argument stands among a call's fixed arguments


def _meta(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device, t.requires_grad


def _detached_copy(tree):
    def copy(x):
        return x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
    return torch.utils._pytree.tree_map(copy, tree)


class _BlockGraph:
    """One block's forward and backward graphs over static inputs (the recorded ones) and stand-ins of
    its trainable parameters (``detach()``: the same storage, their own autograd leaves)."""

    def __init__(self, block: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        leaves, self.spec = torch.utils._pytree.tree_flatten((args, kwargs))
        self.consts = [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
        self.inputs = [x for x in leaves if isinstance(x, torch.Tensor)]
        self.block, self.forward, self.training = block, forward, block.training
        named = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.stand_ins = {n: p.detach().requires_grad_() for n, p in named}
        self.needs_grad = [x for x in self.inputs if x.requires_grad] + list(self.stand_ins.values())

    def _run(self):
        it = iter(self.inputs)
        args, kwargs = torch.utils._pytree.tree_unflatten([next(it) if c is _TENSOR else c for c in self.consts],
                                                          self.spec)
        # the block's own forward (not block(...): that dispatches to the replay once installed) on the stand-ins
        with torch.nn.utils.stateless._reparametrize_module(self.block, self.stand_ins):
            out = self.forward(*args, **kwargs)
        outs, self.out_spec = torch.utils._pytree.tree_flatten(out)
        return outs

    def _grads(self, outs, grad_outputs):
        return torch.autograd.grad([o for o in outs if o.requires_grad], self.needs_grad, grad_outputs,
                                   allow_unused=True)

    def warm_up(self) -> None:
        outs = self._run()
        self._grads(outs, [torch.zeros_like(o) for o in outs if o.requires_grad])

    def capture_forward(self, pool, stream) -> None:
        self.fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=pool, stream=stream):
            self.outputs = self._run()

    def capture_backward(self, pool, stream) -> None:
        self.grad_outputs = [torch.empty_like(o) for o in self.outputs if o.requires_grad]
        self.bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.bwd, pool=pool, stream=stream):
            self.grads = self._grads(self.outputs, self.grad_outputs)
        self.out_requires_grad = [o.requires_grad for o in self.outputs]
        self.outputs = [o.detach() for o in self.outputs]  # free the captured autograd graph


class _Replay(torch.autograd.Function):
    """A block as one autograd node: forward replays its forward graph; backward its backward graph,
    returning the gradients of its tensor inputs and of its parameters (the real ones: their
    accumulation, and DDP's hooks on it, happen as after any eager node)."""

    @staticmethod
    def forward(ctx, g: _BlockGraph, *tensors: torch.Tensor):
        for s, x in zip(g.inputs, tensors):
            if s.data_ptr() != x.data_ptr():
                s.copy_(x)
        g.fwd.replay()
        ctx.g = g
        return tuple(o.detach() for o in g.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        g = ctx.g
        for s, d in zip(g.grad_outputs, [d for d, r in zip(grads, g.out_requires_grad) if r]):
            if d is None:
                s.zero_()
            elif s.data_ptr() != d.data_ptr():
                s.copy_(d)
        g.bwd.replay()
        it = iter(g.grads)
        ins = [(next(it) if x.requires_grad else None) for x in g.inputs]
        return (None, *[None if d is None else d.detach() for d in [*ins, *it]])


def _graphed_block_forward(owner: GraphedBlocks, i: int, eager: Callable):
    g = owner.graphs[i]

    def forward(self, *args, **kwargs):
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        if owner.matches(i, leaves, spec):
            outs = _Replay.apply(g, *[x for x in leaves if isinstance(x, torch.Tensor)], *g.params)
            return torch.utils._pytree.tree_unflatten(list(outs), g.out_spec)
        return eager(*args, **kwargs)
    return forward
