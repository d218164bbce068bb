"""quant_ops.MAX_REGISTERS reaches the compiler: the kernels compiled offline for sm_90 with
Triton's bundled ptxas (benchmarks/kernel_regs.py, no GPU) stay within the cap."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernel_regs import captured_launches, resource_usage  # noqa: E402
from robuq.kernels import quant_ops  # noqa: E402
from robuq.kernels.rotation import rotation_layout  # noqa: E402


def _registers(usage: str) -> int:
    return int(usage.split(" regs")[0])


def test_register_cap_reaches_the_compiler(monkeypatch):
    k = 1152
    lay = rotation_layout(k, "kronecker", None)
    x = torch.randn(64, k, dtype=torch.bfloat16)
    mod = torch.randn(2, 2 * k, dtype=torch.bfloat16)
    norm = (mod[:, :k], mod[:, k:], 1e-6)
    regs = {}
    monkeypatch.setattr(quant_ops, "NORM_BACKWARD", {})  # no per-launch cap: MAX_REGISTERS alone
    for cap in (None, 96):
        monkeypatch.setitem(quant_ops.MAX_REGISTERS, "backward", cap)
        with captured_launches() as (_, bwd):  # the adaLN backward (fc1's launch)
            quant_ops.rotate_quantize_backward(x, torch.randn_like(x), torch.ones(k), lay, torch.full((1,), 0.5),
                                               2, True, 1, norm=norm, out_dtype=torch.bfloat16)
        assert ("maxnreg" in bwd.call[1]) == (cap is not None)
        regs[cap] = _registers(resource_usage(bwd, None))
    assert regs[96] <= 96 < regs[None]


def test_adaln_backward_launch_settings_reach_the_launch(monkeypatch):
    """quant_ops.NORM_BACKWARD: DiT-XL/2's fc1 adaLN backward (one quantizer) is launched with its
    register cap, the q/k/v one (three) without, and another width's tile without; a cap in
    MAX_REGISTERS wins over them."""
    k = 1152
    lay = rotation_layout(k, "kronecker", None)
    x = torch.randn(64, k, dtype=torch.bfloat16)
    mod = torch.randn(2, 2 * k, dtype=torch.bfloat16)

    def cap_of(g, width=k):
        xw, nw = x[:, :width], (mod[:, :width], mod[:, k:k + width], 1e-6)
        with captured_launches() as (_, bwd):
            quant_ops.rotate_quantize_backward(xw, torch.randn(g, *xw.shape), torch.ones(width),
                                               rotation_layout(width, "kronecker", None), torch.full((g, 1), 0.5),
                                               2, True, 1, norm=nw, out_dtype=torch.bfloat16)
        return bwd.call[1].get("maxnreg")

    assert cap_of(1, 768) is None  # [16, 64] tile: not swept
    assert cap_of(1) == quant_ops.NORM_BACKWARD[lay.MP * lay.P, 1]["maxnreg"] and cap_of(3) is None
    monkeypatch.setitem(quant_ops.MAX_REGISTERS, "backward", 96)
    assert cap_of(1) == 96 and cap_of(3) == 96 and cap_of(1, 768) == 96


def test_forward_launch_settings_reach_the_launch(monkeypatch):
    """quant_ops.FORWARD: DiT-XL/2's out forward (one quantizer, no adaLN, K = 1152) is launched
    with its register cap and compiles within it, storing the rms statistic; fc1's (the adaLN in
    front) and q/k/v's (three quantizers) without; a cap in MAX_REGISTERS wins."""
    k = 1152
    lay = rotation_layout(k, "kronecker", None)
    x = torch.randn(64, k, dtype=torch.bfloat16)
    mod = torch.randn(2, 2 * k, dtype=torch.bfloat16)

    def launch(g, norm):
        with captured_launches() as (fwd, _):
            quant_ops.rotate_quantize(x, torch.ones(k), lay, torch.full((g, 1), 0.5), 2, True, 1, want_f8=True,
                                      want_stat=True, norm=(mod[:, :k], mod[:, k:], 1e-6) if norm else None)
        return fwd

    out = launch(1, False)
    cap = quant_ops.FORWARD[lay.MP * lay.P, 1, False]["maxnreg"]
    assert out.call[1].get("maxnreg") == cap
    usage = resource_usage(out, None)
    assert _registers(usage) <= cap and " 0 B stack" in usage, usage
    assert launch(1, True).call[1].get("maxnreg") is None and launch(3, False).call[1].get("maxnreg") is None
    monkeypatch.setitem(quant_ops.MAX_REGISTERS, "forward", 96)
    assert launch(1, False).call[1].get("maxnreg") == 96 and launch(1, True).call[1].get("maxnreg") == 96


def test_adaln_forward_programs_per_sm_reach_the_grid(monkeypatch):
    """quant_ops.FORWARD's programs per SM size the adaLN forward's grid (DiT-XL/2 at batch 32 on a
    132-SM GPU): runs of one sample's tokens, none empty: 16 runs of 16 tokens per sample at 4
    programs per SM, 32 runs of 8 at the default 8."""
    k, samples, per_sample = 1152, 32, 256
    lay = rotation_layout(k, "kronecker", None)
    tq, grid_on_a_gpu, shipped = quant_ops.tq, quant_ops._grid, quant_ops.FORWARD
    n_iter_at = tq.rotq_fwd_kernel.arg_names.index("n_iter")
    launches = []

    class Launch:  # records (programs, n_iter), launches nothing
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid[0], args[n_iter_at]))

    monkeypatch.setattr(tq, "rotq_fwd_kernel", Launch())
    monkeypatch.setattr(tq, "INTERPRET", False)
    monkeypatch.setattr(quant_ops, "_sm_count", lambda index: 132)
    monkeypatch.setattr(quant_ops, "_grid", lambda m, device, *a, **kw: grid_on_a_gpu(m, torch.device("cuda", 0),
                                                                                       *a, **kw))
    x = torch.empty(samples * per_sample, k, dtype=torch.bfloat16, device="meta")
    mod = torch.empty(samples, 2 * k, dtype=torch.bfloat16, device="meta")
    norm = (mod[:, :k], mod[:, k:], 1e-6)
    for g in (1, 3):
        assert shipped[lay.MP * lay.P, g, True]["programs_per_sm"] == 4
        for table, want in [(shipped, (samples * 16, 16)), ({}, (samples * 32, 8))]:
            monkeypatch.setattr(quant_ops, "FORWARD", table)
            quant_ops.rotate_quantize(x, torch.ones(k, device="meta"), lay, torch.full((g, 1), 0.5, device="meta"),
                                      2, True, 1, want_f8=True, norm=norm)
            assert launches[-1] == want, (g, launches[-1])
