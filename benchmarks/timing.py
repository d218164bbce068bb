"""GPU timing shared by the benchmarks."""

import torch

KERNEL_KINDS = (  # (kind, substrings of the CUDA kernel name); the first match wins
    ("rotate+quantize", ("rotq_",)),
    ("ternary weight", ("ternary_rows",)),
    ("packed GEMM", ("packed_gemm",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("fp8 GEMM", ("e4m3", "f8f8", "fp8")),
    ("GEMM", ("gemm", "nvjet", "xmma", "cutlass", "wgmma")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("optimizer", ("adam",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "elementwise / other")


def profile_kernels(fn, title, calls=5, top=14) -> dict:
    """GPU time per call of ``fn`` by CUDA kernel and by kind (torch.profiler), printed as two
    tables: where the time goes. Kernel durations only; host gaps between launches do not count."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = {ev.key: (ev.device_time_total / calls, ev.count / calls) for ev in prof.key_averages()
               if ev.device_type.name == "CUDA" and ev.device_time_total > 0}
    kinds = {}
    for key, (us, _) in kernels.items():
        kinds[kernel_kind(key)] = kinds.get(kernel_kind(key), 0.0) + us
    total = sum(kinds.values())
    if not total:
        print(f"\n{title}: the profiler traced no CUDA kernels")
        return dict(total_us=0.0, kinds={}, kernels={})
    print(f"\n{title}: GPU time per call by kind (us, {calls} calls profiled)")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:22s} {us:10.0f}  {us / total:5.1%}")
    print(f"  {'total':22s} {total:10.0f}")
    print(f"{title}: top {top} kernels (us per call, launches per call)")
    for key, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us:9.0f} {n:6.0f}  {kernel_kind(key):18s} {key[:100]}")
    return dict(total_us=total, kinds=kinds, kernels={k: v[0] for k, v in kernels.items()})


def gbench(fn, calls=10, replays=20) -> float:
    """GPU time per call (ms): ``calls`` calls captured in one CUDA graph, median of ``replays``
    replays. No launch overhead, inputs warm in L2 where they fit (50 MB on an H100)."""
    fn()  # warm up / compile / settle lazy state outside the capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    times.sort()
    return times[len(times) // 2]
