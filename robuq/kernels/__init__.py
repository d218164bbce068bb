"""Triton kernels (need a CUDA GPU, or TRITON_INTERPRET=1 on CPU for tests).

* ``quant_ops.rotate_quantize``: fused Hadamard rotation + per-token quantization (codes as
  int8 / e4m3 / dense, per-token scales), and its LSQ backward;
* ``gemm``: fp8 ``_scaled_mm`` with rowwise scales, and a packed 2-bit-weight Triton GEMM;
* ``qat.use_fused_kernels(model)``: switch a quantized model's QuantLinears to the fused path;
* ``attention`` / ``mlp``: one launch for q, k and v of an attention; an MLP's GELU inside the
  kernels of its output projection (QAT option);
* ``residual.gated_residual``: DiT's gated residual update as one vectorized pass.

Submodules import triton; import them explicitly.
"""
