"""Kernel checks run under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton
is imported, so test_kernels_interpret.py runs this file in a subprocess). Prints OK at the end."""

import contextlib
import copy
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from robuq.deploy.pack import pack_ternary  # noqa: E402
from robuq.kernels.gemm import packed_gemm  # noqa: E402
from robuq.kernels.qat import use_fused_kernels  # noqa: E402
from robuq.kernels import quant_ops  # noqa: E402
from robuq.kernels.quant_ops import rotate_quantize, rotate_quantize_backward  # noqa: E402
from robuq.kernels.rotation import reference_rotate, rotation_layout  # noqa: E402
from robuq.kernels.ternary import ternary_weight  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402
from robuq.quant.context import timestep_groups  # noqa: E402
from robuq.quant.hadamard import HadamardRotation  # noqa: E402
from robuq.quant.ternary import ternary_codes  # noqa: E402


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_value_error(call, ok, what):
    """``call()`` raises a ValueError whose message passes ``ok``."""
    try:
        call()
    except ValueError as e:
        assert ok(str(e)), e
    else:
        raise AssertionError(f"no error {what}")


def check_layouts():
    g = torch.Generator().manual_seed(0)
    for dim, kind, bs in [(192, "kronecker", None), (768, "kronecker", None), (1152, "kronecker", None),
                          (256, "kronecker", None), (4608, "kronecker", None), (1152, "block", 128), (192, "none", None)]:
        rot = HadamardRotation(dim, bs) if kind != "none" else None
        signs = rot.signs if rot is not None else torch.ones(dim)
        x = torch.randn(5, dim, generator=g, dtype=torch.float64)
        ref = rot(x) if rot is not None else x
        assert rel(reference_rotate(x, signs, dim, kind, bs), ref) < 1e-12, (dim, kind)
        lay = rotation_layout(dim, kind, bs)
        res = rotate_quantize(x.float(), signs, lay, torch.tensor([[0.5], [0.9]]), 4, True, 1,
                              want_i8=True, want_f8=True, out="scaled", want_stat=True)
        rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
        for gi, a in enumerate([0.5, 0.9]):
            qref = (ref / (a * rms)).clamp(-8, 7).round()
            assert (res["i8"][gi].double() != qref).float().mean() < 1e-3, (dim, kind)
            assert torch.equal(res["f8"][gi].float(), res["i8"][gi].float())
            # (the interpreter's fp32 -> bf16 conversion truncates; the GPU rounds to nearest)
            torch.testing.assert_close(res["out"][gi].float(), res["i8"][gi].float() * res["s"][gi][:, None],
                                       rtol=8e-3, atol=0)
        torch.testing.assert_close(res["stat"].double(), rms[:, 0], rtol=1e-5, atol=0)
    print("layouts ok")


def check_packed_gemm():
    g = torch.Generator().manual_seed(1)
    for m, n, k in [(5, 37, 50), (70, 64, 192), (3, 20, 7)]:
        codes = torch.randint(-1, 2, (n, k), generator=g)
        a = torch.randint(-2, 2, (m, k), generator=g).float()
        sa, sb, b = torch.rand(m, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
        y = packed_gemm(a, pack_ternary(codes), k, sa, sb, b, out_dtype=torch.float32,
                        config=dict(BM=16, BN=16, BK=16, GROUP_M=1))
        torch.testing.assert_close(y, (a @ codes.float().T) * sa[:, None] * sb[None] + b)
    print("packed gemm ok")


def check_ternary():
    g = torch.Generator().manual_seed(2)
    for n, k in [(37, 2500), (5, 7), (3, 1024)]:  # K over, under and at the kernel's block
        w = torch.randn(n, k, generator=g)
        w[0] = 0.0  # an all-zero row: the scale clamps to eps, codes are 0
        codes, scale = ternary_codes(w)
        torch.testing.assert_close(ternary_weight(w, torch.float32), codes * scale, rtol=1e-6, atol=0)
    print("ternary ok")


def check_bad_shapes():
    lay = rotation_layout(192, "kronecker", None)
    signs, alpha = torch.ones(192), torch.ones(1, 1)
    for call, words in [
        (lambda: rotate_quantize(torch.zeros(4, 190), signs, lay, alpha, 2, True, 1), "expects [M, 192]"),
        (lambda: rotate_quantize_backward(torch.zeros(4, 192), torch.zeros(4, 190), signs, lay, alpha[0], 2, True, 1),
         "expects x [M, 192] and grad [M, 192]"),
        (lambda: ternary_weight(torch.zeros(8), torch.float32), "must be 2-D"),
        (lambda: rotate_quantize(torch.zeros(4, 192), signs, lay, alpha, 2, True, 1, act="relu"),
         "unknown fused activation 'relu'; choose one of [None, 'gelu_tanh']"),
    ]:
        assert_value_error(call, lambda msg: words in msg, f"for {words}")
    print("bad shapes ok")


def check_qat():
    torch.manual_seed(0)
    cfgs = [dict(act_bits=2), dict(act_bits=4, act_stat="absmax"), dict(act_bits=3, act_mode="static"),
            dict(act_bits=1), dict(act_bits=2, rotation="block", block_size=64), dict(act_bits=2, timestep_groups=3)]
    for cfg in cfgs:
        net = torch.nn.Sequential(torch.nn.Linear(192, 768))
        quantize_(net, QuantConfig(include=["0"], **cfg))
        net._forward_pre_hooks.clear()  # groups come from the context below, not from a DiT call
        net._forward_hooks.clear()
        x = torch.randn(3, 7, 192) * 3
        ids = torch.tensor([0, 2, 1])
        with timestep_groups(ids):
            net(x)
            ref, fus = copy.deepcopy(net), copy.deepcopy(net)
            assert use_fused_kernels(fus) == {"0": True}
            xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yf = ref(xr), fus(xf)
            gy = torch.randn_like(yr)
            (yr * gy).sum().backward()
            (yf * gy).sum().backward()
        assert rel(yf, yr) < 1e-5, cfg
        assert rel(xf.grad, xr.grad) < 1e-5, cfg
        pr, pf = dict(ref.named_parameters()), dict(fus.named_parameters())
        for name in pr:
            assert rel(pf[name].grad, pr[name].grad) < 1e-5, (cfg, name)
    print("qat ok")


@contextlib.contextmanager
def fp8_forward_on_cpu():
    """robuq.kernels.qat with its fp8 forward GEMM on for CPU tensors (cuBLAS's fp8 matmul has a CPU
    kernel); GEMM_INPUT_IN_BACKWARD is restored on exit."""
    import robuq.kernels.qat as qat

    orig = qat._fp8_forward
    qat._fp8_forward = lambda layer, x2, cdt: layer.weight_quant is not None
    try:
        yield qat
    finally:
        qat._fp8_forward, qat.GEMM_INPUT_IN_BACKWARD = orig, True


def check_gemm_input_in_backward():
    """The backward kernel's q * s_t (qat.GEMM_INPUT_IN_BACKWARD: written there, not saved by the
    forward) equals the forward's bit for bit, for grouped quantizers, a GELU and an adaLN in front;
    and a fused QuantLinear on the fp8 forward path (forced here: cuBLAS fp8 runs on CPU too) gets the
    same gradients either way."""
    torch.manual_seed(8)
    b, t, k = 2, 9, 192
    x = torch.randn(b * t, k) * 2
    lay = rotation_layout(k, "kronecker", None)
    signs = torch.where(torch.rand(k) < 0.5, -1.0, 1.0)
    alpha = torch.tensor([[0.7], [1.1], [0.45]])
    emb = torch.randn(b, 2 * k) * 0.3
    grad = torch.randn(3, b * t, k)
    for kw in [dict(), dict(act="gelu_tanh"), dict(norm=(emb[:, k:], emb[:, :k], 1e-6))]:
        for bits, mode in [(2, 1), (3, 0), (4, 2)]:
            fwd = rotate_quantize(x, signs, lay, alpha, bits, True, mode, out="scaled", out_dtype=torch.float32, **kw)
            res = rotate_quantize_backward(x, grad, signs, lay, alpha, bits, True, mode, out_dtype=torch.float32, **kw)
            plain = rotate_quantize_backward(x, grad, signs, lay, alpha, bits, True, mode, **kw)
            assert torch.equal(res[-1], fwd["out"]), (kw.keys(), bits, mode)
            assert all(torch.equal(a, c) for a, c in zip(res, plain))
    grads = []
    with fp8_forward_on_cpu() as qat:
        net = torch.nn.Sequential(torch.nn.Linear(192, 96))
        quantize_(net, QuantConfig(include=["0"], act_bits=2))
        xi = torch.randn(5, 192) * 2
        net(xi)
        use_fused_kernels(net)
        for in_backward in (False, True):
            qat.GEMM_INPUT_IN_BACKWARD = in_backward
            net.zero_grad()
            xr = xi.clone().requires_grad_()
            net(xr).square().sum().backward()
            grads.append([xr.grad] + [p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, c) for a, c in zip(*grads))
    print("gemm input in backward ok")


def check_compiled_fused_path():
    """torch.compile traces the fused path through its custom ops (their fake kernels give the
    shapes) on the fp8 forward path (forced: cuBLAS fp8 runs on CPU), with the weight gradient's
    input written by the backward or kept from the forward: output and gradients as eager."""
    with fp8_forward_on_cpu() as qat:
        torch.manual_seed(9)
        net = torch.nn.Sequential(torch.nn.Linear(192, 768), torch.nn.GELU(), torch.nn.Linear(768, 192))
        quantize_(net, QuantConfig(include=["0", "2"], act_bits=2))
        x = torch.randn(2, 5, 192)
        net(x)
        use_fused_kernels(net)

        def run(f):
            xi = x.clone().requires_grad_()
            y = f(xi)
            y.square().mean().backward()
            out = [y, xi.grad] + [p.grad.clone() for p in net.parameters()]
            net.zero_grad(set_to_none=True)
            return out

        for in_backward in (True, False):
            qat.GEMM_INPUT_IN_BACKWARD = in_backward
            eager, compiled = run(net), run(torch.compile(net))
            torch._dynamo.reset()
            assert all(rel(c, e) < 1e-5 for c, e in zip(compiled, eager)), in_backward
    compiled_dit_block_norms()
    fakes_match_the_kernels()
    print("compiled fused path ok")


def fakes_match_the_kernels():
    """torch.library.opcheck: each custom op's fake kernel (what torch.compile plans with) gives the
    shapes, dtypes and strides of the real outputs, incl. the adaLN gradients' partial sums (in the
    number of chunks the caller asks for)."""
    import robuq.kernels.qat as qat

    torch.manual_seed(11)
    k, b, t = 192, 3, 8
    x, signs = torch.randn(b * t, k), torch.where(torch.rand(k) < 0.5, -1.0, 1.0)
    alpha, grad, emb = torch.full((2, 1), 0.6), torch.randn(2, b * t, k), torch.randn(b, 2 * k) * 0.3
    for scale, shift in [(None, None), (emb[:, :k], emb[:, k:])]:
        fwd_args = (x, signs, alpha, "kronecker", 0, 2, True, 1, "float32", True, "", scale, shift, 1e-6, True, False)
        torch.library.opcheck(qat.rotq_fwd, fwd_args, test_utils="test_faketensor")
        nstat, stat = qat.rotq_fwd(*fwd_args)[3:]
        torch.library.opcheck(qat.rotq_bwd, (x, grad, signs, alpha, "kronecker", 0, 2, True, 1, "float32", "",
                                             scale, shift, 1e-6, True, 2, None if scale is None else nstat, stat,
                                             True),
                              test_utils="test_faketensor")
    torch.library.opcheck(qat.ternary_fp8, (torch.randn(40, k), "bfloat16", 1e-8), test_utils="test_faketensor")


@contextlib.contextmanager
def launch_splits():
    """The ``split`` (exact rotation) of every forward and backward launch of the fused QAT path."""
    import robuq.kernels.qat as qat

    seen, orig = [], (qat.rotate_quantize, qat.rotate_quantize_backward)

    def spy(fn, way):
        def call(*args, split=True, **kw):
            seen.append((way, split))
            return fn(*args, split=split, **kw)
        return call

    qat.rotate_quantize, qat.rotate_quantize_backward = spy(orig[0], "fwd"), spy(orig[1], "bwd")
    try:
        yield seen
    finally:
        qat.rotate_quantize, qat.rotate_quantize_backward = orig


def compiled_dit_block_norms():
    """A QAT DiT block with the adaLN inside the kernels, compiled: the backward op's fake gives the
    shape of the adaLN gradients' partial sums (summed in the graph), and the ternary weights come
    from the ``robuq::ternary_fp8`` op; output and gradients as eager. The block runs with the
    one-rounding rotation (``exact_rotation=False``), which reaches every launch, eager and compiled:
    the q/k/v and fc1 launches with the adaLN, out and fc2 (exact in fp32 here, the interpreter's
    products being fp32)."""
    from diffusers import DiTTransformer2DModel

    from robuq.models import disable_label_dropout

    with fp8_forward_on_cpu(), launch_splits() as splits:
        torch.manual_seed(10)
        model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=48, in_channels=1, out_channels=1,
                                      num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        disable_label_dropout(model)
        quantize_(model, QuantConfig(act_bits=2))
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 3])
        model(x, timestep=t, class_labels=y)
        use_fused_kernels(model, fuse_norms=True, exact_rotation=False)
        block = model.transformer_blocks[0]
        outs = []
        splits.clear()
        for compiled in (False, True):
            model.transformer_blocks[0] = torch.compile(block) if compiled else block
            xi = x.clone().requires_grad_()
            out = model(xi, timestep=t, class_labels=y).sample
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            outs.append(dict(grads, out=out, dx=xi.grad))
            model.zero_grad(set_to_none=True)
        model.transformer_blocks[0] = block
        torch._dynamo.reset()
        # 4 launches per direction in each of the two runs (compiled: the custom ops' real kernels)
        assert len(splits) >= 16 and {s for _, s in splits} == {False}, splits
        assert sum(w == "bwd" for w, _ in splits) >= 8, splits
        eager, comp = outs
        assert eager.keys() == comp.keys()
        for name, e in eager.items():  # (to_k's bias has a zero gradient: only rounding noise is left)
            assert rel(comp[name], e) < 1e-5 or (comp[name] - e).norm() < 1e-6, (name, rel(comp[name], e))


def check_fused_qkv():
    """q, k and v of a diffusers Attention as one fused group (one launch each way, three LSQ
    quantizers) against the reference layers: outputs and every gradient."""
    from diffusers.models.attention_processor import Attention

    from robuq.kernels.attention import SharedQKVAttnProcessor

    for cfg in [dict(act_bits=3), dict(act_bits=2, timestep_groups=2)]:
        torch.manual_seed(1)
        attn = Attention(query_dim=192, heads=4, dim_head=48, bias=True)
        quantize_(attn, QuantConfig(include=["to_q", "to_k", "to_v", "to_out.0"], **cfg))
        attn._forward_pre_hooks.clear()  # groups come from the context below, not from a DiT call
        attn._forward_hooks.clear()
        x = torch.randn(2, 5, 192)
        with timestep_groups(torch.tensor([1, 0])):
            attn(x)
            ref, fus = copy.deepcopy(attn), copy.deepcopy(attn)
            use_fused_kernels(fus)
            assert isinstance(fus.processor, SharedQKVAttnProcessor)
            with torch.no_grad():  # distinct steps, so each quantizer's own step must be used
                fus.to_k.act.quantizer.step.mul_(1.5)
                ref.to_k.act.quantizer.step.mul_(1.5)
            xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yf = ref(xr), fus(xf)
            gy = torch.randn_like(yr)
            (yr * gy).sum().backward()
            (yf * gy).sum().backward()
        assert rel(yf, yr) < 1e-5 and rel(xf.grad, xr.grad) < 1e-5, cfg
        pr, pf = dict(ref.named_parameters()), dict(fus.named_parameters())
        for name in pr:  # (the key bias gets no gradient: softmax ignores a shift of every key)
            assert rel(pf[name].grad, pr[name].grad) < 1e-5 or (pf[name].grad - pr[name].grad).norm() < 1e-5, name
        use_fused_kernels(fus, False)
        assert not isinstance(fus.processor, SharedQKVAttnProcessor)
    print("fused qkv ok")


def check_fused_gelu():
    """A DiT MLP with its GELU inside fc2's kernels (forward and backward) against the reference
    modules; and the kernel's GELU against torch's on a pre-activation."""
    from diffusers.models.attention import FeedForward

    h = torch.randn(64, 192) * 3
    lay = rotation_layout(192, "kronecker", None)
    signs = torch.ones(192)
    one = torch.ones(1, 1)
    fused = rotate_quantize(h, signs, lay, one, 8, True, 0, out="scaled", out_dtype=torch.float32, act="gelu_tanh")
    ref = rotate_quantize(torch.nn.functional.gelu(h, approximate="tanh"), signs, lay, one, 8, True, 0,
                          out="scaled", out_dtype=torch.float32)
    assert torch.equal(fused["out"], ref["out"])
    for cfg in [dict(act_bits=2), dict(act_bits=4, act_stat="absmax")]:
        torch.manual_seed(2)
        ff = FeedForward(192, mult=4, activation_fn="gelu-approximate")
        quantize_(ff, QuantConfig(include=["net.0.proj", "net.2"], **cfg))
        x = torch.randn(2, 5, 192)
        ff(x)
        ref, fus = copy.deepcopy(ff), copy.deepcopy(ff)
        use_fused_kernels(fus, fuse_activations=True)
        assert "forward" in fus.__dict__
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref(xr), fus(xf)
        gy = torch.randn_like(yr)
        (yr * gy).sum().backward()
        (yf * gy).sum().backward()
        assert rel(yf, yr) < 1e-5 and rel(xf.grad, xr.grad) < 1e-5, (cfg, rel(yf, yr), rel(xf.grad, xr.grad))
        pr, pf = dict(ref.named_parameters()), dict(fus.named_parameters())
        for name in pr:  # (a step's gradient sums terms of both signs: fp32 sums differ more)
            assert rel(pf[name].grad, pr[name].grad) < (1e-4 if name.endswith("step") else 1e-5), (cfg, name)
        use_fused_kernels(fus, False)
        assert "forward" not in fus.__dict__
    print("fused gelu ok")


def check_fused_norm():
    """The adaLN inside the forward kernel (inference): LayerNorm(x) * (1 + scale_b) + shift_b with
    strided scale/shift rows (chunks of the modulation output) against torch's ops, then the kernel."""
    from robuq.models import modulate

    torch.manual_seed(3)
    b, t, k = 3, 5, 192
    x = torch.randn(b, t, k) * 2 + 0.5
    emb = torch.randn(b, 6 * k) * 0.3
    shift, scale = emb[:, :k], emb[:, k:2 * k]
    lay = rotation_layout(k, "kronecker", None)
    signs = torch.where(torch.rand(k) < 0.5, -1.0, 1.0)
    alpha = torch.full((2, 1), 0.8)
    alpha[1] = 1.3
    fused = rotate_quantize(x.reshape(-1, k), signs, lay, alpha, 3, True, 1, out="scaled", out_dtype=torch.float32,
                            norm=(scale, shift, 1e-6))
    ref = rotate_quantize(modulate(x, (scale, shift, 1e-6)).reshape(-1, k), signs, lay, alpha, 3, True, 1,
                          out="scaled", out_dtype=torch.float32)
    assert rel(fused["out"], ref["out"]) < 1e-5 and rel(fused["s"], ref["s"]) < 1e-5, rel(fused["out"], ref["out"])
    # programs in runs of one sample's tokens: with 7 programs' worth of grid, two runs of 3 per
    # sample, the second with one step past the sample's end; every token written once, same bits
    grid = quant_ops._grid
    quant_ops._grid = lambda *a, **kw: (7,)
    try:
        runs = rotate_quantize(x.reshape(-1, k), signs, lay, alpha, 3, True, 1, out="scaled", out_dtype=torch.float32,
                               norm=(scale, shift, 1e-6))
    finally:
        quant_ops._grid = grid
    assert all(torch.equal(runs[n], fused[n]) for n in ("out", "s"))
    # backward: the kernel's gradients through the modulation and the LayerNorm against autograd of
    # torch's ops fed the kernel's own gradient of the modulated input
    for mode, a in [(1, alpha), (0, alpha * 0.3), (2, alpha)]:
        grad = torch.randn(2, b * t, k)
        dx, ga, dsc, dsh = rotate_quantize_backward(x.reshape(-1, k), grad, signs, lay, a, 3, True, mode,
                                                    norm=(scale, shift, 1e-6))
        xr, scr, shr = (v.clone().requires_grad_() for v in (x, scale, shift))
        u = modulate(xr, (scr, shr, 1e-6))
        du, ga_ref = rotate_quantize_backward(u.detach().reshape(-1, k), grad, signs, lay, a, 3, True, mode)
        gx, gsc, gsh = torch.autograd.grad(u, (xr, scr, shr), du.reshape(u.shape))
        for got, want in [(dx, gx.reshape(-1, k)), (ga, ga_ref), (dsc, gsc), (dsh, gsh)]:
            assert got.shape == want.shape and rel(got, want) < 1e-5, (mode, got.shape, rel(got, want))
    # the forward's LayerNorm statistics, read by the backward instead of recomputed: under the
    # interpreter the same gradients bit for bit; statistics of another shape (or without the norm) are refused
    xs, norm = x.reshape(-1, k), (scale, shift, 1e-6)
    stats = rotate_quantize(xs, signs, lay, alpha, 3, True, 1, want_i8=True, norm=norm, want_norm_stats=True)["norm_stats"]
    var, mean = torch.var_mean(xs, dim=1, unbiased=False)
    assert rel(stats[0], mean) < 1e-6 and rel(stats[1], torch.rsqrt(var + 1e-6)) < 1e-5
    for mode in (0, 1, 2):
        recomputed = rotate_quantize_backward(xs, grad, signs, lay, alpha, 3, True, mode, norm=norm,
                                              out_dtype=torch.float32)
        read = rotate_quantize_backward(xs, grad, signs, lay, alpha, 3, True, mode, norm=norm,
                                        out_dtype=torch.float32, norm_stats=stats)
        assert all(torch.equal(u, v) for u, v in zip(recomputed, read)), mode
    # the forward's rms statistic, read by the backward (with and without the adaLN): under the interpreter the same bits
    for kw in (dict(norm=norm), {}):
        st = rotate_quantize(xs, signs, lay, alpha, 3, True, 1, want_i8=True, want_stat=True, **kw)["stat"]
        recomputed = rotate_quantize_backward(xs, grad, signs, lay, alpha, 3, True, 1, out_dtype=torch.float32, **kw)
        read = rotate_quantize_backward(xs, grad, signs, lay, alpha, 3, True, 1, out_dtype=torch.float32, stat=st,
                                        **kw)
        assert all(torch.equal(u, v) for u, v in zip(recomputed, read)), kw
    for call, name in [(lambda: rotate_quantize_backward(xs, grad, signs, lay, alpha, 3, True, 1, norm=norm,
                                                         norm_stats=stats[:, 1:]), "rotate_quantize_backward"),
                       (lambda: rotate_quantize(xs, signs, lay, alpha, 3, True, 1, want_norm_stats=True),
                        "rotate_quantize"),
                       (lambda: rotate_quantize_backward(xs, grad, signs, lay, alpha, 3, True, 2, stat=st),
                        "rotate_quantize_backward")]:
        assert_value_error(call, lambda msg: msg.startswith(f"{name}: "), f"from {name} for bad statistics")
    for bad in [(scale[:2], shift[:2], 1e-6), (scale[:, :100], shift[:, :100], 1e-6)]:
        calls = [("rotate_quantize", lambda: rotate_quantize(x.reshape(-1, k), signs, lay, alpha, 3, True, 1,
                                                             want_i8=True, norm=bad)),
                 ("rotate_quantize_backward", lambda: rotate_quantize_backward(x.reshape(-1, k), grad, signs, lay,
                                                                               alpha, 3, True, 1, norm=bad))]
        for name, call in calls:  # the error names the function that was called
            assert_value_error(call, lambda msg: msg.startswith(f"{name}: norm scale and shift must be [B, 192]"),
                               f"from {name} for a bad norm")
    # no tokens at all: empty codes, zero adaLN gradients (and their partial sums)
    empty = x.reshape(-1, k)[:0]
    norm = (scale, shift, 1e-6)
    assert rotate_quantize(empty, signs, lay, alpha, 3, True, 1, want_i8=True, norm=norm)["i8"].numel() == 0
    for partials in (False, True):
        dx, ga, dsc, dsh = rotate_quantize_backward(empty, grad[:, :0], signs, lay, alpha, 3, True, 1, norm=norm,
                                                    norm_partials=partials)
        assert dx.shape == empty.shape and ga.shape == (2, 0)
        assert dsc.shape[-2:] == scale.shape and not dsc.any() and not dsh.any()
    print("fused norm ok")


def check_qat_fused_norms():
    """QAT DiT blocks with the adaLN inside the q/k/v and fc1 kernels (forward and backward)
    against the same blocks on the reference path: the output and every parameter's gradient,
    with timestep groups, and with the GELU inside fc2's kernels as well."""
    from diffusers import DiTTransformer2DModel

    from robuq.models import disable_label_dropout

    for cfg, gelu in [(dict(act_bits=3), False), (dict(act_bits=2, timestep_groups=2), True)]:
        torch.manual_seed(6)
        model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=48, in_channels=1, out_channels=1,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        disable_label_dropout(model)  # the same labels in both runs
        quantize_(model, QuantConfig(**cfg))
        x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([10, 700, 3, 999]), torch.tensor([1, 3, 10, 0])
        model(x, timestep=t, class_labels=y)  # initialise the LSQ steps
        ref, fus = copy.deepcopy(model), copy.deepcopy(model)
        use_fused_kernels(fus, fuse_activations=gelu, fuse_norms=True)
        assert all("forward" in b.__dict__ for b in fus.transformer_blocks)
        outs = []
        for m in (ref, fus):
            xi = x.clone().requires_grad_()
            out = m(xi, timestep=t, class_labels=y).sample
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            outs.append((out, xi.grad))
        assert rel(outs[1][0], outs[0][0]) < 1e-5 and rel(outs[1][1], outs[0][1]) < 1e-5, cfg
        pr, pf = dict(ref.named_parameters()), dict(fus.named_parameters())
        for name in pr:  # (a step's gradient sums terms of both signs: fp32 sums differ more)
            if pr[name].grad is None:
                assert pf[name].grad is None or not pf[name].grad.any(), name
                continue
            tol = 1e-4 if name.endswith("step") else 1e-5
            assert rel(pf[name].grad, pr[name].grad) < tol or (pf[name].grad - pr[name].grad).norm() < 1e-6, (
                cfg, name, rel(pf[name].grad, pr[name].grad))
        use_fused_kernels(fus, False)
        assert not any("forward" in b.__dict__ for b in fus.transformer_blocks)
    print("qat fused norms ok")


def check_gated_residual():
    """x + gate_b * y with strided gate rows (a chunk of the modulation output), tokens and
    channels not multiples of the tile, against torch.addcmul."""
    from robuq.kernels.residual import gated_residual

    torch.manual_seed(4)
    x, y = torch.randn(3, 37, 200), torch.randn(3, 37, 200)
    gate = torch.randn(3, 1200)[:, 400:600]
    # (addcmul fuses the multiply-add on CPU: equal to the last bit or two of fp32)
    torch.testing.assert_close(gated_residual(x, gate, y), torch.addcmul(x, gate.unsqueeze(1), y), rtol=1e-6, atol=1e-6)
    print("gated residual ok")


CHECKS = [check_layouts, check_packed_gemm, check_ternary, check_bad_shapes, check_qat, check_gemm_input_in_backward,
          check_compiled_fused_path, check_fused_qkv, check_fused_gelu, check_fused_norm, check_gated_residual,
          check_qat_fused_norms]

if __name__ == "__main__":  # the named checks (default: all), then OK
    by_name = {c.__name__: c for c in CHECKS}
    unknown = [n for n in sys.argv[1:] if n not in by_name]
    if unknown:
        sys.exit(f"interpret_checks: unknown checks {unknown}; known: {list(by_name)}")
    for name in sys.argv[1:] or list(by_name):
        by_name[name]()
    print("OK")
    sys.exit(0)
