"""``GraphedBlocks``' and ``CapturedForward``'s dispatch on the CPU: which calls replay and which run
eagerly, what the replay node returns to autograd, and ``restore``. The captures themselves need a
CUDA GPU (tests/training/test_cuda_graph_gpu.py); here they are stubbed and the "replay" re-runs the
recorded forward on the parameters' stand-ins, so values and gradients can be compared with eager."""

import contextlib

import pytest
import torch
from diffusers import DiTTransformer2DModel

from robuq.cuda_graph import CapturedForward, GraphedBlocks, _BlockGraph, _Replay
from robuq.models import disable_label_dropout


class _FakeGraph:
    """Stands in for a captured graph: replay() runs what the capture would have recorded."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def _capture_by_rerunning(self, warmup):
    """GraphedBlocks._capture without CUDA: each "graph" re-runs the block on its static inputs."""
    for g in self.graphs:
        g.outputs = g._run()
        g.out_requires_grad = [o.requires_grad for o in g.outputs]
        g.grad_outputs = [torch.zeros_like(o) for o in g.outputs if o.requires_grad]

        def forward(g=g):
            with torch.enable_grad():  # (a Function's forward runs without grad; the real graph holds its own)
                outs = g._run()
            for o, new in zip(g.outputs, outs):
                o.detach().copy_(new.detach())
            g.live = outs

        def backward(g=g):
            g.grads = g._grads(g.live, g.grad_outputs)

        g.fwd, g.bwd = _FakeGraph(forward), _FakeGraph(backward)


@pytest.fixture
def model(monkeypatch):
    monkeypatch.setattr(GraphedBlocks, "_capture", _capture_by_rerunning)
    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    disable_label_dropout(m)
    return m


def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)


def _replays(monkeypatch):
    calls = []
    apply = _Replay.apply
    monkeypatch.setattr(_Replay, "apply", lambda g, *t: calls.append(g) or apply(g, *t))
    return calls


def test_replayed_blocks_give_eager_outputs_and_gradients(model, monkeypatch):
    x, t, y = _batch()
    eager_out = model(x, timestep=t, class_labels=y).sample
    eager_out.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    blocks = GraphedBlocks(model.transformer_blocks, lambda: model(x, timestep=t, class_labels=y))
    calls = _replays(monkeypatch)
    x2, t2, y2 = _batch(seed=0)  # new tensors, same values
    out = model(x2, timestep=t2, class_labels=y2).sample
    assert len(calls) == 2  # both blocks replayed
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    out.square().mean().backward()
    for n, p in model.named_parameters():  # the real parameters get the gradients, not the stand-ins
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-6, atol=1e-7, msg=n)
    assert all(s.grad is None for g in blocks.graphs for s in g.stand_ins.values())


def test_calls_that_do_not_fit_run_the_blocks_own_forward(model, monkeypatch):
    x, t, y = _batch()
    blocks = GraphedBlocks(model.transformer_blocks, lambda: model(x, timestep=t, class_labels=y))
    calls = _replays(monkeypatch)
    x3, t3, y3 = _batch(3)
    model(x3, timestep=t3, class_labels=y3)  # another batch size
    with torch.no_grad():  # validation
        model(x, timestep=t, class_labels=y)
    model.eval()
    model(x, timestep=t, class_labels=y)
    model.train()
    model(x, timestep=t.float(), class_labels=y)  # another dtype of an argument
    assert calls == []
    model(x, timestep=t, class_labels=y)
    assert len(calls) == 2
    blocks.restore()
    assert all("forward" not in b.__dict__ for b in model.transformer_blocks)
    calls.clear()
    model(x, timestep=t, class_labels=y)
    assert calls == []


def test_restore_gives_back_an_instance_forward(model):
    x, t, y = _batch()
    block = model.transformer_blocks[0]
    own = block.forward.__func__.__get__(block)  # an instance override, as the fused kernels install
    block.forward = own
    blocks = GraphedBlocks(model.transformer_blocks, lambda: model(x, timestep=t, class_labels=y))
    assert block.forward is not own
    blocks.restore()
    assert block.forward is own and "forward" not in model.transformer_blocks[1].__dict__


def test_a_block_that_run_never_calls_is_refused(model):
    x, t, y = _batch()
    with pytest.raises(RuntimeError, match="did not call every block"):
        GraphedBlocks(model.transformer_blocks, lambda: model.transformer_blocks[0])
    assert all(not b._forward_pre_hooks for b in model.transformer_blocks)  # the recording hooks are gone


def test_stand_ins_share_the_parameters_storage(model):
    block = model.transformer_blocks[0]
    g = _BlockGraph(block, block.forward, (torch.zeros(1, 4, 16),), {})
    for name, p in block.named_parameters():
        s = g.stand_ins[name]
        assert s.data_ptr() == p.data_ptr() and s.requires_grad and s is not p


def test_captured_forward_replays_only_what_it_was_captured_for(monkeypatch):
    """A frozen forward's graph (stubbed: the capture computes it, a replay re-runs it on the static
    inputs) answers inputs of the captured shapes and dtypes with a copy, anything else with None."""
    replays = []

    class Graph:
        def replay(self):
            replays.append(1)
            cf.output.copy_(fn(*cf.static))

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kw: contextlib.nullcontext())
    lin = torch.nn.Linear(4, 3)

    def fn(x, t):
        return lin(x) * t[:, None]

    x, t = torch.randn(2, 4), torch.tensor([1.0, 2.0])
    cf = CapturedForward(fn, (x, t))
    x2, t2 = torch.randn(2, 4), torch.tensor([3.0, 4.0])
    out = cf(x2, t2)
    with torch.no_grad():
        torch.testing.assert_close(out, fn(x2, t2))
    assert replays == [1] and out.data_ptr() != cf.output.data_ptr()  # a copy: the next replay cannot change it
    assert cf(torch.randn(3, 4), torch.ones(3)) is None  # another batch size
    assert cf(x2.double(), t2) is None  # another dtype
    assert replays == [1]
