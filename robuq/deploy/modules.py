"""``PackedTernaryLinear``: the inference form of a QAT ``QuantLinear``.

Holds 2-bit packed ternary codes and per-channel scales instead of a latent weight, and computes
the same integers the fake-quant student computed:

    r     = (x * d) @ H                                  (the RobustQuantizer rotation)
    s_t   = alpha * stat(r_t)       (dynamic; static: s_t = alpha)
    codes = clamp(round(r / s_t), -Qn, Qp)
    y     = (codes @ ternary^T) * s_t * w_scale + b

Two execution paths:
* reference (pure torch, any device; the CPU path): the rotation and the rounding are the exact
  torch ops of ``robuq.quant``, so the codes are bit-identical to the student's;
* CUDA: one Triton kernel rotates + quantizes to e4m3 codes and per-token scales, then an fp8
  GEMM with fp32 accumulation (exact for these integers) and a scaling epilogue: cuBLAS
  ``_scaled_mm`` on e4m3 weights for many tokens, the packed-weight Triton GEMM for few tokens.
  Layers whose codes do not fit e4m3 exactly (more than 5 signed bits) use bf16 codes with the
  packed Triton GEMM (bf16 holds integers up to 256 exactly; fp32 accumulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robuq.models import modulate
from robuq.quant.context import current_timestep_groups
from robuq.quant.hadamard import hadamard_transform
from robuq.quant.lsq import FULL_PRECISION, qrange, token_stat

from .pack import pack_weight, packed_cols, unpack_ternary

_FP32_BUFFERS = ("w_scale", "alpha", "signs")
SMALL_M = 256  # at or below this many tokens the packed Triton GEMM is used (weight-bound regime)


def _fp8_exact(bits: int, signed: bool) -> bool:
    qn, qp = qrange(bits, signed)
    return max(qn, qp) <= 16


class PackedTernaryLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        signed: bool = True,
        mode: str = "dynamic",
        stat: str = "rms",
        groups: int = 1,
        rotation: str = "kronecker",
        block_size: int | None = None,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.signed, self.mode, self.stat, self.groups = bits, signed, mode, stat, groups
        self.rotation, self.block_size = rotation, block_size
        self.register_buffer("packed", torch.zeros(out_features, packed_cols(in_features), dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("alpha", torch.ones(groups, dtype=torch.float32, device=device))
        self.register_buffer("signs", torch.ones(in_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.gemm = "auto"  # "auto" | "cublas" | "triton" | "torch" (the reference path everywhere)
        self.split = True  # exact (hi/lo) rotation in the kernel; False = one bf16 rounding (faster)
        self.cache_fp8_weight = True  # keep an unpacked e4m3 copy for the cuBLAS path
        self._w_f8: torch.Tensor | None = None
        self._dense: tuple | None = None
        self._bias_cast: tuple | None = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, layer) -> "PackedTernaryLinear":
        """From a ``robuq.quant.QuantLinear`` (ternary weights; LSQ step initialised)."""
        if layer.weight_quant is None:
            raise ValueError("PackedTernaryLinear needs ternary weights (QuantConfig.weight='ternary')")
        rq, q = layer.act, layer.act.quantizer
        if q.enabled and not q.initialized:
            raise ValueError("the LSQ step of this layer was never initialised: run one forward pass before export")
        rot = rq.rotation
        kind = "none" if rot is None else ("kronecker" if rot.block_size is None else "block")
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, q.bits, q.signed, q.mode, q.stat,
                q.groups, kind, None if rot is None else rot.block_size, device=layer.weight.device)
        packed, scale = pack_weight(layer.weight.float(), layer.weight_quant.granularity)
        m.packed.copy_(packed)
        m.w_scale.copy_(scale)
        m.alpha.copy_(q.step.detach().abs().clamp_min(1e-8).float())
        m.split = layer.exact_rotation  # the same integers as the student's (fused) forward
        if rot is not None:
            m.signs.copy_(rot.signs.float())
        if layer.bias is not None:
            m.bias = layer.bias.detach().clone()
        return m

    def _apply(self, fn, recurse=True):
        # scales, steps and signs stay float32 through model.to(dtype); only their device follows
        keep = {n: self._buffers[n] for n in _FP32_BUFFERS}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        self._w_f8, self._dense, self._bias_cast = None, None, None
        return self

    # ---- helpers -----------------------------------------------------------------------------

    @property
    def act_enabled(self) -> bool:
        return self.bits != FULL_PRECISION

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly ``HadamardRotation.forward`` (same ops, same dtype)."""
        if self.rotation == "none":
            return x
        return hadamard_transform(x * self.signs.to(x.dtype), block_size=self.block_size)

    def ternary(self, dtype: torch.dtype) -> torch.Tensor:
        """Dense codes [N, K] in ``dtype`` (cached)."""
        key = (dtype, self.packed.device, self.packed.data_ptr())
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, unpack_ternary(self.packed, self.in_features, dtype))
        return self._dense[1]

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        """alpha broadcast against x (per timestep group of each sample if groups > 1)."""
        a = self.alpha.to(x.dtype)
        if self.groups > 1:
            ids = current_timestep_groups()
            if ids is None or ids.shape != (x.shape[0],):
                raise RuntimeError("this layer has per-timestep-group steps: run the model as model(x, timestep=t, ...)")
            return a[ids.to(x.device)].reshape(-1, *([1] * (x.dim() - 1)))
        return a.reshape([1] * x.dim())

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"PackedTernaryLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        if x.is_cuda and self.gemm != "torch" and self.act_enabled and _cuda_kernels_ok(self):
            return self._forward_cuda(x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Pure torch: the student's integers, then one integer GEMM and the two scales."""
        r = self.rotate(x)
        w = self.ternary(r.dtype)
        if not self.act_enabled:
            return F.linear(r, w * self.w_scale.to(r.dtype)[:, None], None if self.bias is None else self.bias.to(r.dtype))
        qn, qp = qrange(self.bits, self.signed)
        step = self._step(r)
        if self.mode == "dynamic":
            step = step * token_stat(r, self.stat)
        v = (r / step).clamp(-qn, qp)
        codes = torch.where(v >= 0, 1.0, -1.0).to(v.dtype) if (self.signed and self.bits == 1) else v.round()
        acc = codes @ w.t()  # integer sums, exact in fp32 below 2^24
        y = acc * step * self.w_scale.to(r.dtype)
        if self.bias is not None:
            y = y + self.bias.to(r.dtype)
        return y

    def _bias_in(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.bias is None:
            return None
        if self.bias.dtype == dtype:
            return self.bias
        key = (dtype, self.bias.data_ptr(), self.bias._version)
        if self._bias_cast is None or self._bias_cast[0] != key:
            self._bias_cast = (key, self.bias.to(dtype))
        return self._bias_cast[1]

    def _alpha_per_token(self, x: torch.Tensor, m: int) -> torch.Tensor:
        if self.groups == 1:
            return self.alpha[:1].reshape(1, 1)
        ids = current_timestep_groups()
        if ids is None or ids.shape != (x.shape[0],):
            raise RuntimeError("this layer has per-timestep-group steps: run the model as model(x, timestep=t, ...)")
        return self.alpha[ids.to(x.device)].repeat_interleave(m // x.shape[0]).reshape(1, m)

    def _forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linears([self], x)[0]

    def _gemm_cuda(self, a: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Codes a [M, K] (e4m3, or bf16 for A6-A8) with per-token steps s [M] -> y [M, N]."""
        from robuq.kernels.gemm import packed_gemm, scaled_mm_rowwise

        use_cublas = self.gemm == "cublas" or (self.gemm == "auto" and a.shape[0] > SMALL_M)
        if (a.dtype == torch.float8_e4m3fn and use_cublas and self.in_features % 16 == 0
                and self.out_features % 16 == 0):
            return scaled_mm_rowwise(a, self.fp8_weight(), s, self.w_scale, self._bias_in(out_dtype), out_dtype=out_dtype)
        return packed_gemm(a, self.packed, self.in_features, s, self.w_scale, self.bias, out_dtype=out_dtype)

    def fp8_weight(self) -> torch.Tensor:
        """Unpacked e4m3 ternary weight [N, K] for cuBLAS (cached unless cache_fp8_weight is off)."""
        if self._w_f8 is not None and self._w_f8.device == self.packed.device:
            return self._w_f8
        w = unpack_ternary(self.packed, self.in_features, torch.float32).to(torch.float8_e4m3fn)
        if self.cache_fp8_weight:
            self._w_f8 = w
        return w

    def extra_repr(self) -> str:
        g = f", groups={self.groups}" if self.groups > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"A{self.bits}{'' if self.signed else 'u'}, {self.mode}/{self.stat}, rotation={self.rotation}{g}")


def _cuda_kernels_ok(layer: PackedTernaryLinear) -> bool:
    try:
        from robuq.kernels.rotation import rotation_layout
    except ImportError:  # no triton
        return False
    try:
        return rotation_layout(layer.in_features, layer.rotation, layer.block_size).supported
    except ValueError:
        return False


def _launch_spec(layer: PackedTernaryLinear) -> tuple:
    return (layer.in_features, layer.bits, layer.signed, layer.mode, layer.stat, layer.groups, layer.rotation,
            layer.block_size, layer.split, layer.gemm)


def can_share_input(layers) -> bool:
    """Whether ``layers`` (q, k, v) can be quantized by one kernel launch: packed layers on the CUDA
    path with the same quantizer settings and rotation (the same signs)."""
    first = layers[0]
    return (all(isinstance(m, PackedTernaryLinear) and m.gemm != "torch" and m.act_enabled and _cuda_kernels_ok(m)
                for m in layers)
            and all(_launch_spec(m) == _launch_spec(first) and torch.equal(m.signs, first.signs) for m in layers))


def packed_linears(layers, x: torch.Tensor, norm=None) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` with one rotate+quantize launch for all of them on CUDA
    (``can_share_input`` layers: each quantizes with its own step, then its own GEMM). ``norm =
    (scale [B, K], shift [B, K], eps)`` for x [B, T, K]: the layers read ``modulate(x, norm)``,
    computed inside the launch (``robuq.kernels.block``)."""
    from robuq.kernels.quant_ops import mode_id, rotate_quantize
    from robuq.kernels.rotation import rotation_layout

    first = layers[0]
    if not x.is_cuda or x.shape[-1] != first.in_features or any(m.gemm == "torch" for m in layers):
        return [m(x if norm is None else modulate(x, norm)) for m in layers]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, first.in_features)
    m = x2.shape[0]
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    lay = rotation_layout(first.in_features, first.rotation, first.block_size)
    alpha = torch.cat([layer._alpha_per_token(x, m) for layer in layers])  # [G, 1 or M]
    mode = mode_id(first.mode, first.stat)
    if _fp8_exact(first.bits, first.signed):
        r = rotate_quantize(x2, first.signs, lay, alpha, first.bits, first.signed, mode, want_f8=True, split=first.split,
                            norm=norm)
        codes = r["f8"]
    else:  # A6..A8: bf16 codes (exact), fp32 accumulation in the packed kernel
        r = rotate_quantize(x2, first.signs, lay, alpha, first.bits, first.signed, mode, out="codes",
                            out_dtype=torch.bfloat16, split=first.split, norm=norm)
        codes = r["out"]
    return [layer._gemm_cuda(codes[i], r["s"][i], out_dtype).reshape(*lead, layer.out_features)
            for i, layer in enumerate(layers)]


def fuse_launches(model: nn.Module) -> list[str]:
    """One rotate+quantize launch for q, k and v of every attention whose projections allow it
    (``robuq.kernels.attention.share_qkv``), and DiT blocks whose adaLN norms run inside those
    launches (``robuq.kernels.block.fuse_block_norms``); returns the names of both."""
    try:
        from robuq.kernels.attention import share_qkv
        from robuq.kernels.block import fuse_block_norms
    except ImportError:  # no diffusers attention: nothing to share
        return []
    return share_qkv(model, can_share_input, packed_linears) + fuse_block_norms(model, can_share_input)


def quant_layer_names(model: nn.Module) -> list[str]:
    from robuq.quant.linear import QuantLinear

    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


@torch.no_grad()
def pack_model(model: nn.Module) -> nn.Module:
    """Replace every ``QuantLinear`` of a quantized model by a ``PackedTernaryLinear`` (in place)."""
    from robuq.quant.linear import QuantLinear

    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not names:
        raise ValueError("pack_model: the model has no QuantLinear layers (quantize it with robuq.quant.quantize_)")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, PackedTernaryLinear.from_quant_linear(getattr(owner, child)))
    fuse_launches(model)
    return model
