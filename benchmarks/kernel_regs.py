"""Registers, stack (spills) and shared memory of each QAT launch's rotate+quantize kernels, compiled
offline for Hopper (sm_90) with the ptxas that ships in Triton's wheel: no GPU needed.

A kernel's registers per thread set how many programs fit on an SM (65536 registers; 128 threads
per 4-warp program: <= 128 registers for 4 programs, <= 168 for 3, <= 255 for 2), which the
launch sweeps then confirm on a GPU. The launches are those of ``quant_sweep.py --qat_launches``
(a DiT-XL/2 block's q/k/v with the adaLN, out, fc1 with the adaLN, fc2), at the shipped settings.

    python benchmarks/kernel_regs.py [--maxnreg 168]   # maxnreg: cap the registers (ptxas spills the rest)
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quant_sweep import QAT_LAUNCHES, launch_calls  # noqa: E402
from robuq.kernels import triton_quant as tq  # noqa: E402

_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8",
            torch.float8_e4m3fn: "*fp8e4nv"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class _Capture:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call, launches nothing."""

    def __init__(self, fn):
        self.fn, self.call = fn, None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: setattr(self, "call", (args, kwargs))


@contextlib.contextmanager
def captured_launches():
    fwd, bwd = _Capture(tq.rotq_fwd_kernel), _Capture(tq.rotq_bwd_kernel)
    tq.rotq_fwd_kernel, tq.rotq_bwd_kernel = fwd, bwd
    try:
        yield fwd, bwd
    finally:
        tq.rotq_fwd_kernel, tq.rotq_bwd_kernel = fwd.fn, bwd.fn


def resource_usage(cap: _Capture, maxnreg: int | None, arch: int = 90) -> str:
    """Compile the recorded call for sm_<arch> and return cuobjdump's resource line (REG, STACK, ...)."""
    args, kwargs = cap.call
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4)}
    reg_cap = maxnreg or kwargs.pop("maxnreg", None)  # (or robuq.kernels.quant_ops.MAX_REGISTERS's, in the call)
    kwargs.pop("maxnreg", None)
    if reg_cap:
        options["maxnreg"] = reg_cap
    names = cap.fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]  # what the JIT assumes of 16-byte aligned pointers and ints % 16 == 0
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            signature[name] = _POINTER[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int):
            signature[name] = "i32"
            if a % 16 == 0 and name not in cap.fn.do_not_specialize:
                attrs[(i,)] = aligned
        elif isinstance(a, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type a {type(a).__name__} argument")
    for name, v in kwargs.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = v
    kernel = triton.compile(ASTSource(cap.fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(kernel.asm["cubin"])
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), out)
    usage = dict(f.split(":") for f in line.split() if f.split(":")[0] in ("REG", "STACK"))
    return f"{usage['REG']} regs, {usage['STACK']} B stack, {kernel.metadata.shared} B shared"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (Triton's maxnreg)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    if not CUOBJDUMP.exists():
        sys.exit(f"kernel_regs: {CUOBJDUMP} not found; this needs a Triton wheel that bundles the CUDA tools "
                 "(the Linux x86_64 / aarch64 wheels from PyPI do)")
    m, b = args.tokens, args.samples
    print(f"sm_90, ptxas of triton {triton.__version__}, maxnreg {args.maxnreg}")
    print("| launch | forward | backward |\n|---|---|---|")
    for name, k, g, norm in QAT_LAUNCHES:
        run_f, run_b = launch_calls(m, k, g, norm, b, device="cpu")  # only dtypes and sizes reach the compiler
        with captured_launches() as (fwd, bwd):
            run_f(), run_b()
        print(f"| {name} | {resource_usage(fwd, args.maxnreg)} | {resource_usage(bwd, args.maxnreg)} |", flush=True)


if __name__ == "__main__":
    main()
