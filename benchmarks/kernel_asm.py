"""What the compiler made of the rotate+quantize kernels at DiT-XL/2 sizes: registers, spills,
shared memory, and which tensor-core instructions the PTX uses (Hopper wgmma or mma.sync).

    python benchmarks/kernel_asm.py [--dims 1152 4608] [--dump DIR]   # DIR: PTX and TTGIR files
"""

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robuq.kernels.quant_ops import rotate_quantize, rotate_quantize_backward  # noqa: E402
from robuq.kernels.rotation import rotation_layout  # noqa: E402
from robuq.kernels import triton_quant as tq  # noqa: E402


def report(kernel, tag: str, dump: Path | None):
    for key, compiled in kernel.device_caches[torch.cuda.current_device()][0].items():
        ptx = compiled.asm["ptx"]
        counts = {name: len(re.findall(pat, ptx)) for name, pat in
                  [("wgmma", r"wgmma\.mma_async"), ("mma.sync", r"mma\.sync"), ("ld.shared", r"ld\.shared"),
                   ("st.shared", r"st\.shared"), ("ldmatrix", r"ldmatrix")]}
        md = compiled.metadata
        print(f"{tag}: regs {compiled.n_regs} spills {compiled.n_spills} shared {md.shared} B "
              f"warps {md.num_warps} | " + " ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
        if dump:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / f"{tag}.ptx").write_text(ptx)
            (dump / f"{tag}.ttgir").write_text(compiled.asm["ttgir"])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dims", type=int, nargs="+", default=[1152, 4608])
    ap.add_argument("--dump", type=Path, default=None)
    args = ap.parse_args()
    for k in args.dims:
        lay = rotation_layout(k, "kronecker", None)
        x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
        signs, alpha = torch.ones(k, device="cuda"), torch.full((1, 1), 0.5, device="cuda")
        for kern in (tq.rotq_fwd_kernel, tq.rotq_bwd_kernel):
            kern.device_caches.clear()
        rotate_quantize(x, signs, lay, alpha, 2, True, 1, want_f8=True)
        report(tq.rotq_fwd_kernel, f"fwd_K{k}", args.dump)
        rotate_quantize_backward(x, torch.randn_like(x), signs, lay, alpha[0], 2, True, 1)
        report(tq.rotq_bwd_kernel, f"bwd_K{k}", args.dump)


if __name__ == "__main__":
    main()
