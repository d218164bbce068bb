"""Fast Hadamard transform vs a dense matmul with the same (precomputed) matrix.

    python benchmarks/hadamard.py                         # CPU, float32, 4096 tokens, n in 192 1152 4608
    python benchmarks/hadamard.py --device cuda           # bf16 on the GPU
    python benchmarks/hadamard.py --dims 1152 --block 128 --threads 1 --two-gemm

Prints median times (torch.utils.benchmark, which synchronises CUDA) and the ratio dense / fast
(> 1: the fast transform wins), plus the fast path's largest deviation from the dense result.
``--two-gemm`` also times H_m (x) H_p as two small dense GEMMs, A^T X B on x viewed [T, m, p]
(n(m + p) multiply-adds per token instead of n^2), a candidate alternative to the butterfly.
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as benchmark

from robuq.quant.hadamard import factorize, hadamard_matrix, hadamard_transform


def median_ms(fn, x, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    fn(x)  # warm up (and build the cached base matrices)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def two_gemm(n: int, device, dtype):
    """x @ (H_m (x) H_p) as A^T X B with x viewed [T, m, p]; dense A (m x m) and B (p x p)."""
    m, pw = factorize(n)  # both factors orthonormal, so their Kronecker product is too
    a = hadamard_matrix(m).T.contiguous().to(device=device, dtype=dtype) if m > 1 else None
    b = hadamard_matrix(pw).to(device=device, dtype=dtype)

    def fn(x):
        y = x.reshape(*x.shape[:-1], m, pw) @ b
        if a is not None:
            y = a @ y
        return y.reshape(x.shape)

    return fn


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dims", type=int, nargs="+", default=[192, 1152, 4608])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on CUDA"
    )
    p.add_argument("--block", type=int, help="also time the block-diagonal transform with this power-of-two block")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--two-gemm", action="store_true", help="also time the Kronecker product as two small GEMMs")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Hadamard transform, {args.tokens} tokens, {dtype}, {where}, torch {torch.__version__}")

    rows = []
    for n in args.dims:
        variants = [("kronecker", None)] + ([(f"block {args.block}", args.block)] if args.block else [])
        for label, block in variants:
            if block is not None and n % block:
                continue
            x = torch.randn(args.tokens, n, device=device, dtype=dtype)
            h = hadamard_matrix(n, block).to(device=device, dtype=dtype)
            dense = lambda t, h=h: t @ h  # noqa: E731
            fast = lambda t, b=block: hadamard_transform(t, block_size=b)  # noqa: E731
            err = (fast(x).float() - dense(x).float()).abs().max().item()
            t_dense, t_fast = median_ms(dense, x, args.min_run_time), median_ms(fast, x, args.min_run_time)
            m, pw = factorize(n) if block is None else (n // block, block)
            rows.append((n, f"{label} ({m}x{pw})", t_dense, t_fast, t_dense / t_fast, err))
            if args.two_gemm and block is None:
                g = two_gemm(n, device, dtype)
                err = (g(x).float() - dense(x).float()).abs().max().item()
                t_g = median_ms(g, x, args.min_run_time)
                rows.append((n, f"two-GEMM ({m}x{pw})", t_dense, t_g, t_dense / t_g, err))
            del x, h

    head = f"{'n':>6} {'transform':>22} {'dense ms':>10} {'fast ms':>10} {'dense/fast':>11} {'max |diff|':>11}"
    print(head)
    print("-" * len(head))
    for n, label, td, tf, ratio, err in rows:
        print(f"{n:>6} {label:>22} {td:>10.3f} {tf:>10.3f} {ratio:>10.2f}x {err:>11.2e}")


if __name__ == "__main__":
    main()
