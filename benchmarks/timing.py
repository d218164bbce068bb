"""GPU timing shared by the benchmarks."""

import torch


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
