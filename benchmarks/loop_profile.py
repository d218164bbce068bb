"""Where a real `fit` step's wall time goes on the GPU: a Lightning callback that profiles a window
of training steps (torch.profiler, CPU and CUDA) and prints, per step, the wall time, the GPU's busy
time (the union of its kernels and copies), its idle time, the GPU time by kernel kind, the
longest idle gaps with the host work that ran during each, and where the host waited for the GPU
(each synchronisation with the Python line that caused it).

    python scripts/gpu_xl_smoke.py /tmp/xl --steps 24 --model.cuda_graph true \
        --trainer.callbacks+=benchmarks.loop_profile.LoopProfile --trainer.val_check_interval 1000

A GPU busy for the whole step is the loop's floor; idle time is host work the GPU waited for.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections import Counter

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

try:
    from benchmarks.timing import kernel_kind
except ImportError:  # run from benchmarks/
    from timing import kernel_kind


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class LoopProfile(L.Callback):
    """Profile training batches ``start`` .. ``start + steps - 1`` and print the summary above."""

    def __init__(self, start: int = 12, steps: int = 6, gaps: int = 8, host: bool = False):
        """``host``: profile the host's Python with cProfile instead (for host-bound loops: eager, or
        compiled without CUDA graphs) and print the functions that take its time."""
        self.start, self.steps, self.gaps, self.host = start, steps, gaps, host
        self._prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start and self._prof is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if self.host:
                self._prof = cProfile.Profile()
                self._t0 = time.perf_counter()
                self._prof.enable()
                return
            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._prof is not None and trainer.global_step == self.start + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if self.host:
                self._prof.disable()
                wall = (time.perf_counter() - self._t0) / self.steps * 1e3
                print(f"\nhost profile ({self.steps} steps from step {self.start}, {wall:.1f} ms/step under cProfile)")
                pstats.Stats(self._prof).sort_stats("tottime").print_stats(25)
                pstats.Stats(self._prof).sort_stats("cumulative").print_stats(40)
            else:
                self._prof.__exit__(None, None, None)
                self._summarise(self._prof)
            self._prof = None

    def _summarise(self, prof) -> None:
        events = prof.events()
        # kernels and copies; not the annotations (e.g. Optimizer.step, which spans Lightning's whole
        # closure) that the profiler mirrors onto the GPU's timeline
        gpu = [e for e in events if e.device_type.name == "CUDA" and not e.is_user_annotation
               and e.time_range.end > e.time_range.start]
        cpu = [e for e in events if e.device_type.name == "CPU"]
        if not gpu:
            print("loop profile: no CUDA events traced")
            return
        n = self.steps
        busy = _merge([(e.time_range.start, e.time_range.end) for e in gpu])
        first, last = busy[0][0], busy[-1][1]
        busy_us = sum(b - a for a, b in busy)
        print(f"\nloop profile ({n} steps from step {self.start}): span {(last - first) / n / 1e3:.1f} ms/step, "
              f"GPU busy {busy_us / n / 1e3:.1f} ms/step, idle {(last - first - busy_us) / n / 1e3:.1f} ms/step")
        kinds: dict[str, float] = {}
        for e in gpu:
            kind = "memcpy/memset" if "memcpy" in e.name.lower() or "memset" in e.name.lower() else kernel_kind(e.name)
            kinds[kind] = kinds.get(kind, 0.0) + (e.time_range.end - e.time_range.start)
        for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:22s} {us / n / 1e3:8.2f} ms/step")
        gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in zip(busy, busy[1:])), reverse=True)[: self.gaps]
        print("longest GPU idle gaps (ms) and the host ops (>= 0.2 ms) running in each:")
        for length, start, end in gaps:
            during = sorted(((min(end, e.time_range.end) - max(start, e.time_range.start), e.name) for e in cpu
                             if e.time_range.start < end and e.time_range.end > start
                             and e.time_range.end - e.time_range.start >= 200), reverse=True)
            names = ", ".join(f"{name} ({overlap / 1e3:.1f})" for overlap, name in during[:6])
            print(f"  {length / 1e3:7.2f}  {names}")
        syncs = [e for e in cpu if e.name in ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")]
        stacked = [e for e in cpu if e.stack]
        where: Counter = Counter()
        for sync in syncs:
            around = [e for e in stacked if e.time_range.start <= sync.time_range.start and e.time_range.end >= sync.time_range.end]
            op = min(around, key=lambda e: e.time_range.end - e.time_range.start, default=None)
            frame = next((f for f in op.stack if "/torch/" not in f), op.stack[0]) if op else "?"
            where[(sync.name, op.name if op else "?", frame)] += 1
        print(f"host waits for the GPU: {len(syncs) / n:.1f} per step")
        for (name, op, frame), count in where.most_common():
            print(f"  {count / n:5.1f}/step  {name} in {op} at {frame}")
