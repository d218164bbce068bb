"""The training step replayed from a CUDA graph (``DiTModule(cuda_graph=True)``) against eager steps:
the same run, step for step. Needs a CUDA GPU (skipped in CPU CI; run by the GPU stage)."""

import lightning as L
import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch.utils.data import DataLoader, TensorDataset

from robuq.cuda_graph import CapturedForward, CapturedStep, GraphedBlocks
from robuq.kernels.block import _fused_forward as fused_block_forward
from robuq.module import DiTModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _recorded(monkeypatch, cls, name: str, keep=lambda out: out) -> list:
    """Patch ``cls.name`` to record ``keep(result)`` of each call in the returned list."""
    calls, method = [], getattr(cls, name)

    def recording(self, *args):
        out = method(self, *args)
        calls.append(keep(out))
        return out

    monkeypatch.setattr(cls, name, recording)
    return calls


@pytest.fixture
def replays(monkeypatch):
    """Whether each CapturedStep call replayed (True) or left the step to eager (False)."""
    return _recorded(monkeypatch, CapturedStep, "__call__", lambda out: out is not None)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "dit"  # hidden 192 = 12 * 16: a layout the fused kernels serve
    DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=1, out_channels=2, num_layers=2,
                          sample_size=16, patch_size=2, num_embeds_ada_norm=10).save_pretrained(path)
    return str(path)


def _fit(teacher, cuda_graph, fused=False, nan_batch=None, **module_args):
    torch.manual_seed(0)
    # 5 batches of 8 and a last one of 4 (it does not fit the captured shapes: an eager step), two epochs
    x = torch.randn(44, 1, 16, 16)
    if nan_batch is not None:
        x[8 * nan_batch] = float("nan")
    data = TensorDataset(x, torch.randint(0, 10, (44,)))
    module = DiTModule(teacher=teacher, lr=3e-3, quant_lr=3e-3, ema_decay=0.9, fused_kernels=fused,
                       cuda_graph=cuda_graph, diffusion_weight=0.5, **module_args)
    losses = _Losses()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=2, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[losses])
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module, losses.losses


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_cuda_graph_steps_match_eager_steps(teacher, replays, fused):
    """12 steps: eager vs the first eager and the rest replayed (bar the two smaller last batches):
    the same losses, weights and EMA bit for bit, on the reference and on the fused path (H200,
    P50; the fused path's bias gradients had to be summed in fp32 for that, robuq.kernels.qat)."""
    if fused:
        pytest.importorskip("triton")
    eager, eager_losses = _fit(teacher, False, fused)
    replays.clear()
    graph, graph_losses = _fit(teacher, True, fused)
    # step 0 eager; steps 1-4 replayed; 5 (4 samples) eager; 6-10 replayed; 11 eager
    assert replays == [True] * 4 + [False] + [True] * 5 + [False]
    assert len(eager_losses) == len(graph_losses) == 12
    diff = [abs(g - e) / abs(e) for g, e in zip(graph_losses, eager_losses)]
    print("relative loss difference, graph vs eager, per step:", " ".join(f"{d:.1e}" for d in diff))
    assert graph_losses == eager_losses
    moved = 0.0
    for (name, p), p0 in zip(graph.student.named_parameters(), DiTModule(teacher=teacher).student.parameters()):
        if not name.endswith("quantizer.step"):  # (steps start uninitialised in a fresh module)
            moved = max(moved, float((p.detach().cpu() - p0).abs().max()))
        assert torch.equal(p, dict(eager.student.named_parameters())[name]), name
    assert moved > 0.02  # the runs trained: 0.036 on an H100
    for a, b in zip(eager.ema.parameters(), graph.ema.parameters()):
        assert torch.equal(b, a)


def test_cuda_graph_skips_or_stops_at_a_non_finite_step(teacher, replays):
    """A NaN sample in a replayed step: the fused AdamW skips the update on the GPU; the host finds out
    one step later and warns (nan_policy=skip) or stops (stop), and no weight is ever non-finite."""
    with pytest.warns(UserWarning, match="non-finite loss or gradient at step 3"):
        skipped, losses = _fit(teacher, True, nan_batch=3, nan_policy="skip")
    assert replays[2] and len(losses) == 12 and not torch.isfinite(torch.tensor(losses[3]))
    assert all(torch.isfinite(p).all() for p in skipped.student.parameters())
    assert all(torch.isfinite(p).all() for p in skipped.ema.parameters())
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 3"):
        _fit(teacher, True, nan_batch=3, nan_policy="stop")


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
def test_fused_fit_is_deterministic(teacher, cuda_graph):
    """The same fused fit twice gives the same losses and weights bit for bit (no atomics in the
    kernels' reductions): a resumed or repeated run can be compared number for number."""
    pytest.importorskip("triton")
    first, first_losses = _fit(teacher, cuda_graph, fused=True)
    second, second_losses = _fit(teacher, cuda_graph, fused=True)
    assert first_losses == second_losses
    for a, b in zip(first.student.parameters(), second.student.parameters()):
        assert torch.equal(a, b)


@pytest.fixture
def block_replays(monkeypatch):
    """Per call of a graphed block: whether it replayed (True) or ran its own forward (False)."""
    return _recorded(monkeypatch, GraphedBlocks, "matches")


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_graphed_blocks_match_eager_steps(teacher, block_replays, monkeypatch, fused):
    """graph_blocks: each block replayed as CUDA graphs from the second step on, and the teacher's
    forward as one graph, the rest of the step and autograd eager: the same losses, weights and EMA
    as the eager fit, bit for bit. The 4-sample batches run the blocks' own forwards."""
    if fused:
        pytest.importorskip("triton")
    teacher_replays = _recorded(monkeypatch, CapturedForward, "__call__", lambda out: out is not None)
    eager, eager_losses = _fit(teacher, False, fused)
    graphed, graphed_losses = _fit(teacher, False, fused, graph_blocks=True)
    assert len(graphed_losses) == 12
    # 2 blocks per forward: steps 1-4 and 6-10 replay (9 steps), steps 5 and 11 (4 samples) do not
    assert sum(block_replays) == 9 * 2 and block_replays.count(False) >= 2 * 2
    assert teacher_replays == [True] * 4 + [False] + [True] * 5 + [False]
    diff = [abs(g - e) / abs(e) for g, e in zip(graphed_losses, eager_losses)]
    print("relative loss difference, graphed blocks vs eager, per step:", " ".join(f"{d:.1e}" for d in diff))
    assert graphed_losses == eager_losses
    for (name, p), q in zip(graphed.student.named_parameters(), eager.student.parameters()):
        assert torch.equal(p, q), name
    for a, b in zip(eager.ema.parameters(), graphed.ema.parameters()):
        assert torch.equal(b, a)
    fwd = graphed.student.transformer_blocks[0].__dict__.get("forward")  # restored after the fit
    assert (fwd is None) if not fused else (fwd.__func__ is fused_block_forward)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_graphed_blocks_under_ddp_match_eager(tmp_path, block_replays, fused):
    """DDP (one process, gloo) keeps references to the parameters' autograd nodes, made on the default
    stream, and so does a loss kept from the last step: the capture must not wait on them
    (torch.cuda.make_graphed_callables fails there). Four steps, the last three with graphed
    blocks, give the same weights as four eager steps under DDP, bit for bit."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from robuq.cuda_graph import autocast_without_cache
    from robuq.kernels.qat import use_fused_kernels
    from robuq.models import disable_label_dropout
    from robuq.quant import QuantConfig, quantize_

    if fused:
        pytest.importorskip("triton")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        weights = []
        for graphed in (False, True):
            torch.manual_seed(0)
            model = DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=1, out_channels=2,
                                          num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10).cuda()
            disable_label_dropout(model)
            g = torch.Generator(device="cuda").manual_seed(1)
            batches = [(torch.randn(8, 1, 16, 16, device="cuda", generator=g),
                        torch.randint(0, 1000, (8,), device="cuda", generator=g),
                        torch.randint(0, 10, (8,), device="cuda", generator=g)) for _ in range(4)]
            if fused:
                quantize_(model, QuantConfig(act_bits=2))
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    model(batches[0][0], timestep=batches[0][1], class_labels=batches[0][2])
                use_fused_kernels(model)
            ddp = DistributedDataParallel(model, device_ids=[0])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            blocks = None
            for i, (x, t, y) in enumerate(batches):
                with torch.autocast("cuda", dtype=torch.bfloat16), autocast_without_cache():
                    if graphed and i == 1:
                        blocks = GraphedBlocks(model.transformer_blocks,
                                               lambda: model(x, timestep=t, class_labels=y))  # noqa: B023
                    loss = ddp(x, timestep=t, class_labels=y).sample.float().square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert (blocks is not None) == graphed
            assert block_replays == [True] * (6 if graphed else 0)  # steps 1-3, two blocks each
            weights.append([p.detach().clone() for p in model.parameters()])
        for (name, _), a, b in zip(model.named_parameters(), *weights):
            assert torch.equal(a, b), name
    finally:
        dist.destroy_process_group()
