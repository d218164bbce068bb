"""GPU checks of the Triton kernels and the fp8 GEMM (skipped without CUDA)."""

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    from robuq.deploy.modules import PackedTernaryLinear
    from robuq.deploy.pack import pack_ternary
    from robuq.kernels.gemm import packed_gemm, raw_fp8_accumulate, scaled_mm_rowwise
    from robuq.kernels.qat import use_fused_kernels
    from robuq.kernels import quant_ops
    from robuq.kernels.quant_ops import rotate_quantize, rotate_quantize_backward
    from robuq.kernels.rotation import reference_rms_backward, rotation_layout
    from robuq.kernels.ternary import ternary_weight
    from robuq.quant import QuantConfig, quantize_
    from robuq.quant.hadamard import HadamardRotation
    from robuq.quant.ternary import ternary_codes

DEV = "cuda"


@pytest.fixture(autouse=True)
def poisoned_allocator():
    """Fill the caching allocator's free memory with 0xFF bytes before each test (NaN in every
    floating dtype here, -1 in int8), so an output element a kernel fails to write shows up instead
    of a stale value left by an earlier call."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    large = torch.full((1 << 28,), -1, dtype=torch.int32, device=DEV)  # 1 GiB, split for large tensors
    small = [torch.full((1 << 17,), -1, dtype=torch.int32, device=DEV) for _ in range(32)]  # small pool
    torch.cuda.synchronize()
    del large, small
    yield


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dim,kind,bs", [(1152, "kronecker", None), (4608, "kronecker", None), (192, "kronecker", None),
                                         (768, "kronecker", None), (1152, "block", 128), (4096, "kronecker", None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,mode", [(2, 1), (4, 2), (3, 0)])
def test_rotate_quantize_vs_float64(dim, kind, bs, dtype, bits, mode):
    torch.manual_seed(dim + bits)
    rot = HadamardRotation(dim, bs).to(DEV)
    x = (torch.randn(777, dim, device=DEV) * torch.rand(777, 1, device=DEV) * 4).to(dtype)
    x[:, :7] *= 30  # outlier channels
    lay = rotation_layout(dim, kind, bs)
    alpha = torch.tensor([[0.8], [1.3]], device=DEV)
    res = rotate_quantize(x, rot.signs, lay, alpha, bits, True, mode, want_i8=True, want_f8=True, out="scaled",
                          want_stat=True)
    r = rot(x.double())
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    stat = {0: torch.ones(777, 1, device=DEV, dtype=torch.float64), 1: r.pow(2).mean(-1, keepdim=True).sqrt(),
            2: r.abs().amax(-1, keepdim=True)}[mode]
    if mode:
        torch.testing.assert_close(res["stat"].double(), stat[:, 0], rtol=2e-5, atol=0)
    for g, a in enumerate(alpha[:, 0].tolist()):
        q = (r / (a * stat)).clamp(-qn, qp).round()
        mismatch = (res["i8"][g].double() != q)
        assert mismatch.float().mean().item() < 2e-4, mismatch.float().mean().item()
        assert (res["i8"][g].double() - q).abs().max() <= 1
        assert torch.equal(res["f8"][g].float(), res["i8"][g].float())
        s = res["s"][g]
        torch.testing.assert_close(s.double(), a * stat[:, 0], rtol=2e-5, atol=0)
        torch.testing.assert_close(res["out"][g], (res["i8"][g].float() * s[:, None]).bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1152, 4608, 192, 4096])
@pytest.mark.parametrize("grad_split,dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)])
def test_rotate_quantize_backward_vs_float64(k, grad_split, dtype, monkeypatch):
    """The LSQ backward kernel against float64: bf16 input with the gradient rotated back by bf16
    products (the default) or the exact split (dx returned in bf16 either way); fp32 input (always
    the exact split, dx in fp32)."""
    monkeypatch.setattr(quant_ops, "GRAD_SPLIT", grad_split)
    torch.manual_seed(0)
    x = torch.randn(300, k, device=DEV).to(dtype)
    dy = torch.randn_like(x)
    signs = torch.where(torch.rand(k, device=DEV) < 0.5, -1.0, 1.0)
    alpha = torch.full((1,), 0.5, device=DEV)
    dx, ga = rotate_quantize_backward(x, dy, signs, rotation_layout(k, "kronecker", None), alpha, 2, True, 1)
    rdx, rga = reference_rms_backward(x, dy, signs, k, 0.5, eps=quant_ops.EPS)
    assert torch.isfinite(dx).all() and torch.isfinite(ga).all()
    assert rel(dx, rdx) < (4e-3 if grad_split else 8e-3)
    # dL/dalpha per token sums over the token's codes: a code on a rounding boundary (at the fp32
    # rotation's ~1e-5 precision) may round the other way, so a few tokens differ by more
    close = (ga.double() - rga).abs() <= 1e-3 * rga.abs() + 1e-3
    assert close.float().mean() >= 0.97
    assert rel(ga, rga) < 1e-2


@pytest.mark.parametrize("k,norm", [(1152, False), (1152, True), (4608, False), (192, True)])
def test_backward_writes_the_forwards_gemm_input(k, norm):
    """qat.GEMM_INPUT_IN_BACKWARD: the backward kernel's q * s_t equals the forward kernel's bit for
    bit (three quantizers of one input, bf16 input, the default launch settings of each kernel)."""
    torch.manual_seed(k)
    x = (torch.randn(2048, k, device=DEV) * 2).bfloat16()
    signs = torch.where(torch.rand(k, device=DEV) < 0.5, -1.0, 1.0)
    lay = rotation_layout(k, "kronecker", None)
    alpha = torch.tensor([[0.7], [1.1], [0.45]], device=DEV)
    mod = torch.randn(4, 2 * k, device=DEV) * 0.3
    kw = dict(norm=(mod[:, :k], mod[:, k:], 1e-6)) if norm else {}
    fwd = rotate_quantize(x, signs, lay, alpha, 2, True, 1, out="scaled", **kw)
    grad = torch.randn(3, 2048, k, device=DEV).bfloat16()
    res = rotate_quantize_backward(x, grad, signs, lay, alpha, 2, True, 1, out_dtype=torch.bfloat16, **kw)
    assert torch.equal(res[-1], fwd["out"])


def assert_reads_the_forwards_codes(fwd, recomputed, read):
    """A backward that reads the forward's statistics sees the forward's codes: its q * s_t is the
    forward's bit for bit. The one that recomputes them may not: the two kernels reduce a token in
    different orders and contract other products into FMAs, so on the GPU a statistic can differ in
    its last bit (P68; bit for bit under the interpreter, tests/kernels/interpret_checks.py). The
    gradients then agree to that rounding: dx and the adaLN partial sums within 1e-3, dL/dalpha,
    which sums a token's codes and so sees a code on a rounding boundary flip, within 1e-2 (as
    against float64 above; P68 measured up to 4e-4 and 3.6e-3)."""
    assert torch.equal(read[-1].reshape(fwd["out"].shape), fwd["out"])  # [M, K] from one quantizer
    for i, (u, v) in enumerate(zip(recomputed[:-1], read[:-1])):
        assert u.shape == v.shape and torch.isfinite(v).all()
        err = rel(v, u)
        assert err < (1e-2 if i == 1 else 1e-3), f"result {i} {tuple(u.shape)}: relative error {err:.2e}"


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("mode", [1, 2])
def test_backward_from_the_forwards_norm_stats(g, mode):
    """The adaLN backward reading the forward's LayerNorm mean and rstd (norm_stats) sees the
    forward's codes and gives the recomputing one's gradients (DiT-XL/2's q/k/v and fc1 launches)."""
    torch.manual_seed(g + 10 * mode)
    k, b = 1152, 8
    x = (torch.randn(b * 256, k, device=DEV) * 2 + 0.3).bfloat16()
    signs = torch.where(torch.rand(k, device=DEV) < 0.5, -1.0, 1.0)
    lay = rotation_layout(k, "kronecker", None)
    alpha = torch.linspace(0.5, 1.1, g, device=DEV).reshape(g, 1)
    mod = (torch.randn(b, 2 * k, device=DEV) * 0.3).bfloat16()
    norm = (mod[:, :k], mod[:, k:], 1e-6)
    fwd = rotate_quantize(x, signs, lay, alpha, 2, True, mode, out="scaled", norm=norm, want_norm_stats=True)
    grad = torch.randn(g, b * 256, k, device=DEV).bfloat16()
    kw = dict(norm=norm, out_dtype=torch.bfloat16, norm_partials=True)
    recomputed = rotate_quantize_backward(x, grad, signs, lay, alpha, 2, True, mode, **kw)
    read = rotate_quantize_backward(x, grad, signs, lay, alpha, 2, True, mode, norm_stats=fwd["norm_stats"], **kw)
    assert_reads_the_forwards_codes(fwd, recomputed, read)


@pytest.mark.parametrize("k,norm", [(1152, True), (1152, False), (4608, False)])
def test_backward_from_the_forwards_rms_stat(k, norm):
    """The backward reading the forward's per-token rms statistic (and, with the adaLN, its
    LayerNorm statistics) sees the forward's codes and gives the recomputing one's gradients."""
    torch.manual_seed(k + norm)
    b = 8
    x = (torch.randn(b * 256, k, device=DEV) * 2 + 0.3).bfloat16()
    signs = torch.where(torch.rand(k, device=DEV) < 0.5, -1.0, 1.0)
    lay = rotation_layout(k, "kronecker", None)
    alpha = torch.full((1, 1), 0.8, device=DEV)
    mod = (torch.randn(b, 2 * k, device=DEV) * 0.3).bfloat16()
    kw = dict(norm=(mod[:, :k], mod[:, k:], 1e-6)) if norm else {}
    fwd = rotate_quantize(x, signs, lay, alpha, 2, True, 1, out="scaled", want_stat=True, want_norm_stats=norm, **kw)
    grad = torch.randn(b * 256, k, device=DEV).bfloat16()
    recomputed = rotate_quantize_backward(x, grad, signs, lay, alpha[0], 2, True, 1, out_dtype=torch.bfloat16, **kw)
    read = rotate_quantize_backward(x, grad, signs, lay, alpha[0], 2, True, 1, out_dtype=torch.bfloat16,
                                    stat=fwd["stat"], norm_stats=fwd.get("norm_stats"), **kw)
    assert_reads_the_forwards_codes(fwd, recomputed, read)


@pytest.mark.parametrize("k", [1152, 4608])
def test_rint_rounding_equals_the_tie_fixup(k, monkeypatch):
    """quant_ops.RINT_ROUNDING (one cvt.rni per code) gives the codes of floor and a tie fix-up, ties
    included (tokens of half-integers through no rotation and a static step of 1), forward and backward."""
    torch.manual_seed(k)
    x = (torch.randn(4096, k, device=DEV) * 2).bfloat16()
    x[:8] = (torch.randint(-5, 5, (8, k), device=DEV) * 0.5).bfloat16()
    dy = torch.randn_like(x)
    signs = torch.where(torch.rand(k, device=DEV) < 0.5, -1.0, 1.0)
    res = {}
    for rint in (False, True):
        monkeypatch.setattr(quant_ops, "RINT_ROUNDING", rint)
        for kind in ("kronecker", "none"):
            lay = rotation_layout(k, kind, None)
            one = torch.ones(1, 1, device=DEV)
            res[rint, kind] = (rotate_quantize(x, signs, lay, one, 4, True, 0, want_i8=True)["i8"],
                               *rotate_quantize_backward(x, dy, signs, lay, one[0], 4, True, 0))
    for kind in ("kronecker", "none"):
        assert all(torch.equal(a, b) for a, b in zip(res[True, kind], res[False, kind])), kind


@pytest.mark.parametrize("k,n,qmax", [(1152, 1152, 2), (4608, 1152, 8), (1152, 4608, 16), (4608, 3456, 16)])
@pytest.mark.parametrize("fast", [False, True])
def test_fp8_gemm_exact(k, n, qmax, fast):
    """e4m3 integer codes x e4m3 ternary: the fp32 accumulator equals the exact integer product."""
    torch.manual_seed(k + n)
    m = 1024
    a = torch.randint(-qmax, qmax, (m, k), device=DEV).float()
    a[:, :64] = -qmax  # worst-case same-sign runs
    w = torch.randint(-1, 2, (n, k), device=DEV).float()
    w[:, :64] = 1
    ref = a.double() @ w.double().t()
    acc = raw_fp8_accumulate(a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), use_fast_accum=fast)
    assert torch.equal(acc.double(), ref), f"max err {(acc.double() - ref).abs().max().item()} (fast_accum={fast})"


def test_scaled_mm_rowwise_epilogue():
    torch.manual_seed(0)
    m, k, n = 512, 1152, 4608
    a = torch.randint(-2, 2, (m, k), device=DEV).float()
    w = torch.randint(-1, 2, (n, k), device=DEV).float()
    sa, sb = torch.rand(m, device=DEV) + 0.1, torch.rand(n, device=DEV) * 0.01
    b = torch.randn(n, device=DEV)
    y = scaled_mm_rowwise(a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), sa, sb, b, out_dtype=torch.bfloat16)
    ref = (a.double() @ w.double().t()) * sa.double()[:, None] * sb.double()[None] + b.double()
    assert rel(y, ref) < 4e-3  # bf16 output rounding only


@pytest.mark.parametrize("m", [1, 8, 32, 256, 2048])
@pytest.mark.parametrize("k,n", [(1152, 6912), (4608, 1152), (192, 768)])
@pytest.mark.parametrize("adt", [torch.float8_e4m3fn, torch.bfloat16])
def test_packed_gemm_exact(m, k, n, adt):
    torch.manual_seed(m + k)
    codes = torch.randint(-1, 2, (n, k), device=DEV)
    a = torch.randint(-8, 8, (m, k), device=DEV).float()
    sa, sb = torch.rand(m, device=DEV) + 0.5, torch.rand(n, device=DEV) + 0.5
    b = torch.randn(n, device=DEV)
    y = packed_gemm(a.to(adt), pack_ternary(codes), k, sa, sb, b, out_dtype=torch.float32)
    ref = (a.double() @ codes.double().t()) * sa.double()[:, None] * sb.double()[None] + b.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "one_rounding"])
@pytest.mark.parametrize("k,n", [(1152, 4608), (4608, 1152)])
@pytest.mark.parametrize("cfg", [dict(act_bits=2), dict(act_bits=4, act_stat="absmax"), dict(act_bits=3, act_mode="static")])
def test_fused_qat_matches_reference(cfg, k, n, exact):
    """The fused layer under bf16 autocast against the reference layer in fp32 on the same bf16
    input. (Against the reference under autocast the comparison would be dominated by the
    reference's own bf16 rotation: at A2 it flips ~1% of codes, a ~10% output difference.) With
    the one-rounding rotation (``exact_rotation=False``) ~0.1% of codes move by one step, within
    5% of the outputs and the x and weight gradients; the LSQ step's gradient sums terms that
    cancel, and a moved code flips its term, so that one is checked away from the rounding
    boundaries (``test_one_rounding_qat_off_the_boundaries``)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(k, n)).to(DEV)
    quantize_(net, QuantConfig(include=["0"], **cfg))
    x = torch.randn(4, 64, k, device=DEV).bfloat16()
    net(x.float())
    gy = torch.randn(4, 64, n, device=DEV).bfloat16()
    runs = fused_and_reference(net, x, gy, exact)
    tol = 2e-2 if exact else 5e-2  # bf16 GEMM operands and outputs
    for name, (fused, ref) in runs.items():
        if exact or name != "0.act.quantizer.step":
            assert rel(fused, ref) < tol, name
    assert torch.isfinite(runs["0.act.quantizer.step"][0]).all()


def fused_and_reference(net, x, gy, exact):
    """{"y", "dx", parameter name: (fused layer's, reference's)}: a copy of ``net`` on the fused path
    (bf16 autocast, ``exact_rotation=exact``) and one on the reference path in fp32, on the same bf16
    input ``x`` and output gradient ``gy``."""
    ref, fus = copy.deepcopy(net), copy.deepcopy(net)
    assert all(use_fused_kernels(fus, exact_rotation=exact).values())
    xr, xf = x.float().requires_grad_(), x.clone().requires_grad_()
    yr = ref(xr)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yf = fus(xf)
    assert yf.dtype == torch.bfloat16
    (yr * gy.float()).sum().backward()
    (yf.float() * gy.float()).sum().backward()
    pr, pf = dict(ref.named_parameters()), dict(fus.named_parameters())
    return {"y": (yf, yr), "dx": (xf.grad, xr.grad), **{name: (pf[name].grad, pr[name].grad) for name in pr}}


@pytest.mark.parametrize("k", [1152, 4608, 192, 4096])
@pytest.mark.parametrize("bits,mode", [(2, 1), (4, 2)])
def test_one_rounding_rotation_vs_float64(k, bits, mode):
    """``split=False`` (the one-rounding rotation) against a float64 rotation: at most 1% of codes
    move, each by one step; and the backward's recompute gives the forward's q * s_t bit for bit."""
    torch.manual_seed(k + bits)
    rot = HadamardRotation(k).to(DEV)
    x = (torch.randn(1024, k, device=DEV) * torch.rand(1024, 1, device=DEV) * 4).bfloat16()
    x[:, :7] *= 30  # outlier channels
    lay = rotation_layout(k, "kronecker", None)
    alpha = torch.tensor([[0.7]], device=DEV)
    res = rotate_quantize(x, rot.signs, lay, alpha, bits, True, mode, want_i8=True, out="scaled", split=False)
    r = rot(x.double())
    stat = r.pow(2).mean(-1, keepdim=True).sqrt() if mode == 1 else r.abs().amax(-1, keepdim=True)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    q = (r / (0.7 * stat)).clamp(-qn, qp).round()
    moved = (res["i8"][0].double() != q).float().mean().item()
    assert moved < 1e-2, moved
    assert (res["i8"][0].double() - q).abs().max() <= 1
    grad = torch.randn(1, *x.shape, device=DEV).bfloat16()
    again = rotate_quantize_backward(x, grad, rot.signs, lay, alpha, bits, True, mode, split=False,
                                     out_dtype=torch.bfloat16)[-1]
    assert torch.equal(again, res["out"])


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "one_rounding"])
@pytest.mark.parametrize("k,n", [(1152, 4608), (4608, 1152)])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_one_rounding_qat_off_the_boundaries(mode, k, n, exact):
    """On inputs whose rotated values sit a quarter step from every rounding and clipping boundary,
    no rounding of the rotation moves a code: the fused layer with either rotation gets the
    reference's outputs and gradients, the LSQ step's included. The values are v = q - sign(g) / 4
    in step units (g: the layer's gradient with respect to its quantized input), so that every term
    g (q - v) of the step's gradient is positive and none cancels; in dynamic (rms) mode a few
    clipped elements per token bring each token's statistic to 1 / alpha."""
    torch.manual_seed(k + (mode == "static"))
    net = torch.nn.Sequential(torch.nn.Linear(k, n)).to(DEV)
    quantize_(net, QuantConfig(include=["0"], act_bits=2, act_mode=mode))
    m = 256
    net(torch.randn(m, k, device=DEV))  # initialise the step, then set it
    layer = net[0]
    alpha = 0.4
    with torch.no_grad():
        layer.act.quantizer.step.fill_(alpha)
    gy = torch.randn(m, n, device=DEV).bfloat16()
    from robuq.kernels.qat import _ternary_weight_uncached

    g = gy.double() @ _ternary_weight_uncached(layer, torch.float32)[0].double()  # dL/d(quantized input)
    q = torch.randint(-2, 2, (m, k), device=DEV).double()
    u = q - torch.sign(g) / 4
    if mode == "dynamic":  # the last 8 elements of each token: clipped (far above Q_p), rms(u) = 1 / alpha
        u[:, -8:] = ((k / alpha**2 - u[:, :-8].square().sum(1, keepdim=True)) / 8).sqrt()
        assert (u[:, -8:] > 10).all()
        v = u * torch.rand(m, 1, device=DEV, dtype=torch.float64).add(0.5)  # any per-token scale
    else:
        v = u * alpha
    x = (v @ layer.act.rotation.matrix().T).bfloat16()  # rotate(x) = x @ R
    for name, (fused, ref) in fused_and_reference(net, x, gy, exact).items():
        assert rel(fused, ref) < 2e-2, (name, rel(fused, ref))


@pytest.mark.parametrize("k,n,bits", [(1152, 4608, 2), (4608, 1152, 4), (1152, 3456, 5)])
def test_fused_qat_fp8_forward_is_the_exact_integer_product(k, n, bits, monkeypatch):
    """On fp8 GPUs the fused forward GEMM runs on e4m3 codes and ternary weights: its output is the
    exact integer product s_t * s_w * (q @ t^T) + b rounded once to bf16; the bf16 forward it
    replaces rounds q * s_t first. The backward is untouched: the same gradients bit for bit."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 tensor cores (sm_89+)")
    from robuq.kernels import qat

    torch.manual_seed(bits)
    net = torch.nn.Sequential(torch.nn.Linear(k, n)).to(DEV)
    quantize_(net, QuantConfig(include=["0"], act_bits=bits))
    x = torch.randn(4, 64, k, device=DEV).bfloat16()
    net(x.float())
    use_fused_kernels(net)
    layer = net[0]
    runs = {}
    for fp8 in (True, False):
        monkeypatch.setattr(qat, "FP8_FORWARD", fp8)
        net.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(xi)
        assert qat._fp8_forward(layer, xi.reshape(-1, k), torch.bfloat16) == fp8
        gy = torch.randn(y.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(1)).bfloat16()
        y.backward(gy)
        runs[fp8] = (y, xi.grad, *(p.grad for p in net.parameters()))
    q = layer.act.quantizer
    lay = rotation_layout(k, "kronecker", None)
    r = rotate_quantize(x.reshape(-1, k), layer.act.rotation.signs, lay, q.step.detach().abs().reshape(1, 1).float(),
                        bits, q.signed, 1, want_i8=True)
    _, w8, ws = qat._ternary_weight_uncached(layer, torch.bfloat16, fp8=True)
    bias = layer.bias.bfloat16().double()  # autocast's bias, as in any bf16 linear
    exact = (r["i8"][0].double() @ w8.double().T) * r["s"][0].double()[:, None] * ws.double() + bias
    y8, y16 = runs[True][0].reshape(exact.shape), runs[False][0].reshape(exact.shape)
    # the epilogue scales in fp32, then rounds to bf16: the exact result rounded once, but for values
    # within an fp32 rounding of a bf16 boundary
    off = (y8 != exact.bfloat16()).float().mean().item()
    assert off < 1e-3, (off, rel(y8, exact), rel(y16, exact))
    assert rel(y8, exact) < 2e-3 and rel(y16, exact) < 1e-2, (rel(y8, exact), rel(y16, exact))
    for i, (a, b) in enumerate(zip(runs[True][1:], runs[False][1:])):
        assert torch.equal(a, b), (i, rel(a, b))


def test_fused_qkv_group_matches_separate_launches():
    """DiT-XL/2 attention: q, k, v through one rotate+quantize launch each way give the outputs and
    parameter gradients of three separate fused layers bit for bit; dx (their gradients rotated
    back once, summed first) matches to bf16 rounding."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from robuq.kernels.attention import SharedQKVAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=1152, heads=16, dim_head=72, bias=True).to(DEV)
    quantize_(attn, QuantConfig(include=["to_q", "to_k", "to_v", "to_out.0"], act_bits=2))
    x = torch.randn(4, 256, 1152, device=DEV)
    attn(x)
    grouped, separate = copy.deepcopy(attn), copy.deepcopy(attn)
    use_fused_kernels(grouped)
    use_fused_kernels(separate)
    assert isinstance(grouped.processor, SharedQKVAttnProcessor)
    separate.set_processor(AttnProcessor2_0())
    outs = []
    for net in (grouped, separate):
        xi = x.bfloat16().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(xi)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, dict(net.named_parameters())))
    (yg, dxg, pg), (ys, dxs, ps) = outs
    assert torch.equal(yg, ys)
    assert rel(dxg.float(), dxs.float()) < 1e-2
    for name in pg:
        assert torch.equal(pg[name].grad, ps[name].grad), name


@pytest.mark.parametrize("bits", [2, 8])
def test_packed_qkv_one_launch_matches_three(bits):
    """Deployment: q, k, v of a packed attention quantized by one launch give the outputs of three
    separate launches bit for bit (e4m3 codes for A2, bf16 codes for A8)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from robuq.deploy.modules import pack_model
    from robuq.kernels.attention import SharedQKVAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=1152, heads=16, dim_head=72, bias=True).to(DEV)
    quantize_(attn, QuantConfig(include=["to_q", "to_k", "to_v", "to_out.0"], act_bits=bits))
    x = torch.randn(4, 256, 1152, device=DEV)
    attn(x)
    pack_model(attn)
    assert isinstance(attn.processor, SharedQKVAttnProcessor)
    xb = x.bfloat16()
    attn.bfloat16()
    with torch.no_grad():
        shared = attn(xb)
        attn.set_processor(AttnProcessor2_0())
        apart = attn(xb)
    assert torch.equal(shared, apart)


def test_fused_gelu_mlp_matches_a_separate_gelu():
    """DiT-XL/2 MLP under bf16 autocast: fc2's kernels computing the GELU (forward and backward)
    against diffusers' GELU pass feeding the same fused fc2. The kernel's GELU may differ from
    torch's by one bf16 rounding now and then, flipping an A2 code; everything else is the same."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(1152, mult=4, activation_fn="gelu-approximate").to(DEV)
    quantize_(ff, QuantConfig(include=["net.0.proj", "net.2"], act_bits=2))
    x = torch.randn(4, 256, 1152, device=DEV)
    ff(x)
    fused, apart = copy.deepcopy(ff), copy.deepcopy(ff)
    use_fused_kernels(fused, fuse_activations=True)
    use_fused_kernels(apart)
    assert "forward" in fused.__dict__ and "forward" not in apart.__dict__
    outs = []
    for net in (fused, apart):
        xi = x.bfloat16().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(xi)
        y.float().square().mean().backward()
        outs.append((y, xi.grad, dict(net.named_parameters())))
    (yf, dxf, pf), (ya, dxa, pa) = outs
    assert rel(yf, ya) < 1e-2 and rel(dxf, dxa) < 2e-2, (rel(yf, ya), rel(dxf, dxa))
    for name in pf:
        assert torch.isfinite(pf[name].grad).all() and rel(pf[name].grad, pa[name].grad) < 3e-2, name


def test_fused_qat_block_norms_match_diffusers_norms():
    """DiT-XL/2-width QAT blocks under bf16 autocast, fp32 residual stream: the adaLN inside the
    q/k/v and fc1 kernels (forward and backward) against diffusers' LayerNorm and modulation feeding
    the same fused layers. The kernel's fp32 norm may round a modulated value the other way now and
    then, flipping an A2 code; the outputs and every gradient agree to that."""
    from diffusers import DiTTransformer2DModel

    from robuq.models import disable_label_dropout

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).to(DEV)
    disable_label_dropout(model)  # the same labels in both runs
    quantize_(model, QuantConfig(act_bits=2))
    x, t, y = torch.randn(4, 4, 32, 32, device=DEV), torch.tensor([1, 200, 500, 999], device=DEV), \
        torch.tensor([0, 5, 9, 1000], device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, timestep=t, class_labels=y)
    fused, apart = copy.deepcopy(model), copy.deepcopy(model)
    use_fused_kernels(fused, fuse_norms=True)
    use_fused_kernels(apart)
    assert all("forward" in b.__dict__ for b in fused.transformer_blocks)
    outs = []
    for net in (fused, apart):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(xi, timestep=t, class_labels=y).sample
        out.float().square().mean().backward()
        outs.append((out, xi.grad, dict(net.named_parameters())))
    (of, dxf, pf), (oa, dxa, pa) = outs
    assert rel(of, oa) < 1e-2 and rel(dxf, dxa) < 2e-2, (rel(of, oa), rel(dxf, dxa))
    for name in pf:
        if pa[name].grad is None:
            continue
        # (an LSQ step's gradient sums terms of both signs over a whole tensor: relative
        # differences of its inputs grow there, as in the interpreter check)
        tol = 1e-1 if name.endswith("step") else 3e-2
        assert torch.isfinite(pf[name].grad).all() and rel(pf[name].grad, pa[name].grad) < tol, (
            name, rel(pf[name].grad, pa[name].grad))


def test_fused_norm_matches_torch_modulation():
    """Inference: the adaLN computed in the forward kernel (fp32, rounded once to bf16) against
    torch's bf16 LayerNorm and modulation (three roundings) then the kernel, at DiT-XL/2's K = 1152
    with the strided scale/shift chunks of the modulation output: codes agree but for values the
    extra roundings move across a boundary (by one step)."""
    from robuq.models import modulate

    torch.manual_seed(0)
    x = (torch.randn(32, 256, 1152, device=DEV) * 3 + 1).bfloat16()
    emb = (torch.randn(32, 6912, device=DEV) * 0.5).bfloat16()
    shift, scale = emb[:, :1152], emb[:, 1152:2304]
    lay = rotation_layout(1152, "kronecker", None)
    signs = torch.where(torch.rand(1152, device=DEV) < 0.5, -1.0, 1.0)
    alpha = torch.full((3, 1), 0.9, device=DEV)
    fused = rotate_quantize(x.reshape(-1, 1152), signs, lay, alpha, 2, True, 1, want_i8=True, norm=(scale, shift, 1e-6))
    ref = rotate_quantize(modulate(x, (scale, shift, 1e-6)).reshape(-1, 1152), signs, lay, alpha, 2, True, 1, want_i8=True)
    diff = (fused["i8"].int() - ref["i8"].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-2, diff.float().mean()
    assert rel(fused["s"], ref["s"]) < 1e-2


def test_packed_dit_blocks_with_fused_norms_match_diffusers_blocks():
    """A packed DiT-XL/2-width model (two blocks) with the adaLN inside the quantize launches against
    the same model through diffusers' block forward, bf16 on the GPU."""
    from diffusers import DiTTransformer2DModel

    from robuq.deploy.modules import pack_model

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).to(DEV)
    quantize_(model, QuantConfig(act_bits=2))
    x = torch.randn(8, 4, 32, 32, device=DEV)
    t, y = torch.randint(0, 1000, (8,), device=DEV), torch.randint(0, 1000, (8,), device=DEV)
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
    packed = pack_model(model).eval().bfloat16()
    assert all("forward" in b.__dict__ for b in packed.transformer_blocks)
    plain = copy.deepcopy(packed)
    for b in plain.transformer_blocks:
        del b.forward
    with torch.no_grad():
        got, want = (m(x.bfloat16(), timestep=t, class_labels=y).sample.float() for m in (packed, plain))
    assert torch.isfinite(got).all() and rel(got, want) < 3e-2, rel(got, want)


def test_gated_residual_matches_addcmul():
    from robuq.kernels.residual import gated_residual

    torch.manual_seed(0)
    x, y = torch.randn(32, 256, 1152, device=DEV).bfloat16(), torch.randn(32, 256, 1152, device=DEV).bfloat16()
    gate = torch.randn(32, 6912, device=DEV).bfloat16()[:, 2304:3456]
    got, want = gated_residual(x, gate, y), torch.addcmul(x, gate.unsqueeze(1), y)
    assert (got != want).float().mean() < 1e-3 and rel(got, want) < 1e-3


@pytest.mark.parametrize("n,k", [(1152, 1152), (4608, 1152), (1152, 4608), (6912, 1152), (3, 5)])
def test_ternary_weight_kernel_matches_torch(n, k):
    w = torch.randn(n, k, device=DEV) * 0.02
    codes, scale = ternary_codes(w)
    ref = (codes * scale).bfloat16()
    out = ternary_weight(w, torch.bfloat16)
    # the kernel's row mean may differ from torch's in the last bit, which can only move a code
    # whose |w| / s sits on the rounding boundary 0.5
    assert (out != ref).float().mean().item() < 1e-5
    assert rel(out.float(), ref.float()) < 1e-3


def test_fused_qat_step_in_a_cuda_graph_follows_eager():
    """A whole fused training step (fwd, bwd, AdamW) captured in a CUDA graph and replayed takes the
    same steps as eager: the ternary weight is recomputed on every replay, never served stale from
    the per-step cache."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1152, 4608), torch.nn.GELU(), torch.nn.Linear(4608, 1152)).to(DEV)
    quantize_(net, QuantConfig(include=["0", "2"], act_bits=2))
    x = torch.randn(2, 256, 1152, device=DEV)
    net(x)
    eager, graphed = copy.deepcopy(net), copy.deepcopy(net)
    use_fused_kernels(eager)
    use_fused_kernels(graphed)

    def make_step(model, opt, cache):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
                loss = model(x).float().square().mean()
            loss.backward()
            opt.step()
        return step

    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-2, capturable=True)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-2, capturable=True)
    step_e, step_g = make_step(eager, opt_e, True), make_step(graphed, opt_g, False)
    # one step each outside the graph (warm-up: lazy state, kernel compilation), then capture one
    for step, opt in ((step_e, opt_e), (step_g, opt_g)):
        opt.zero_grad(set_to_none=True)
        step()
    torch.cuda.synchronize()
    opt_g.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_g()  # capture records the step without running it
    for _ in range(3):
        opt_e.zero_grad(set_to_none=True)
        step_e()
        graph.replay()
    torch.cuda.synchronize()
    for (name, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
        assert rel(pg, pe) < 1e-3, name
        assert not torch.equal(pe, net.get_parameter(name)), name  # the steps did move the weights


def test_fused_qat_rounds_fp32_input_like_autocast():
    """Under bf16 autocast the fused layer rounds an fp32 input to bf16 as it loads it: the same
    output as the bf16-rounded input (bit for bit), and gradients through the rounding's STE."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1152, 4608)).to(DEV)
    quantize_(net, QuantConfig(include=["0"], act_bits=2))
    x = torch.randn(4, 64, 1152, device=DEV)
    net(x)
    use_fused_kernels(net)
    x32, x16 = x.clone().requires_grad_(), x.bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y32, y16 = net(x32), net(x16)
    assert torch.equal(y32, y16)
    gy = torch.randn_like(y16)
    g32, = torch.autograd.grad(y32, x32, gy)
    g16, = torch.autograd.grad(y16, x16, gy)
    assert g32.dtype == torch.float32
    assert rel(g32, g16.float()) < 1e-2  # fp32 vs bf16 dx output, same bf16 gradient rotation


def test_fused_qat_fp32_stays_on_the_reference_path():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1152, 1152)).to(DEV)
    quantize_(net, QuantConfig(include=["0"], act_bits=2))
    x = torch.randn(2, 64, 1152, device=DEV)
    net(x)
    ref, fus = copy.deepcopy(net), copy.deepcopy(net)
    use_fused_kernels(fus)
    assert torch.equal(fus(x), ref(x))


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "one_rounding"])
@pytest.mark.parametrize("k,n", [(1152, 4608), (4608, 1152)])
def test_one_rounding_packed_layer_computes_the_students_integers(k, n, exact, monkeypatch):
    """A packed layer made from a fused QAT layer inherits its rotation (``exact_rotation``), so the
    deployed GEMM multiplies the very codes the student trained with (the e4m3 codes of both
    forwards, compared bit for bit); the other rotation moves some of them. (Outputs alone would not
    tell: a moved A2 code changes an output by about what the two epilogues' roundings do.)"""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 tensor cores (sm_89+)")
    from robuq.kernels import qat

    codes = []

    def spy(*args, **kw):
        r = rotate_quantize(*args, **kw)
        codes.append(r["f8"].float())
        return r

    monkeypatch.setattr(qat, "rotate_quantize", spy)
    monkeypatch.setattr(quant_ops, "rotate_quantize", spy)  # the packed layer's (imported at its call)
    torch.manual_seed(k)
    net = torch.nn.Sequential(torch.nn.Linear(k, n)).to(DEV)
    quantize_(net, QuantConfig(include=["0"], act_bits=2))
    x = (torch.randn(2, 300, k, device=DEV) * 2).bfloat16()
    net(x.float())
    use_fused_kernels(net, exact_rotation=exact)
    packed = PackedTernaryLinear.from_quant_linear(net[0])
    assert packed.split == exact
    packed.gemm = "cublas"
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ys = net(x)
        yp = packed(x)
        packed.split = not exact
        packed(x)
    student, deployed, other = codes
    assert torch.equal(deployed, student)
    assert (other != student).any()
    assert rel(yp, ys) < 1e-2


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_packed_linear_cuda_vs_reference(bits, gemm):
    torch.manual_seed(bits)
    net = torch.nn.Sequential(torch.nn.Linear(1152, 4608)).to(DEV)
    quantize_(net, QuantConfig(include=["0"], act_bits=bits))
    x = torch.randn(2, 300, 1152, device=DEV) * 2
    net(x)
    layer = PackedTernaryLinear.from_quant_linear(net[0])
    layer.gemm = gemm
    xb = x.bfloat16()
    with torch.no_grad():
        y = layer(xb)
        ref = layer.forward_reference(xb.float())  # same bf16 input, fp32 torch math
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < 1e-2
