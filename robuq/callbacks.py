"""Lightning callbacks of our own: a sample grid every N steps, training throughput."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps, sample ``per_class`` images of each class from the
    EMA model (DDIM, few steps, fixed seed) and write ``<dirpath>/step_XXXXXXX.png``."""

    def __init__(self, every_n_steps: int = 1000, per_class: int = 4, steps: int = 25, cfg_scale: float = 1.5,
                 scheduler: str = "ddim", seed: int = 0, dirpath: str | None = None):
        self.every_n_steps, self.per_class, self.steps = every_n_steps, per_class, steps
        self.cfg_scale, self.scheduler, self.seed, self.dirpath = cfg_scale, scheduler, seed, dirpath

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps:
            return
        from .evaluation.evaluate import save_grid, to_uint8
        from .evaluation.sampling import sample

        model = pl_module.ema if bool(pl_module.ema_started) else pl_module.student
        labels = torch.arange(pl_module.num_classes).repeat_interleave(self.per_class)
        was_training = model.training
        model.eval()
        images = sample(model, labels, scheduler=self.scheduler, steps=self.steps, cfg_scale=self.cfg_scale,
                        seed=self.seed, batch_size=len(labels), progress=False)
        model.train(was_training)
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "samples")
        out.mkdir(parents=True, exist_ok=True)
        names = list(getattr(trainer.datamodule, "class_names", None) or range(pl_module.num_classes))
        rows = [list(to_uint8(images[labels == c])) for c in range(pl_module.num_classes)]
        save_grid(rows, [str(n) for n in names], out / f"step_{step:07d}.png")


class Throughput(L.Callback):
    """Wall time per training batch and images/s over all ranks: logged as ``train/step_ms`` and
    ``train/images_per_s`` (median of the last ``window`` steps) and summarised at the end of fit
    over the steps after the first ``warmup`` (compilation, autotuning, allocator warm-up)."""

    def __init__(self, window: int = 20, warmup: int = 3):
        if window < 1 or warmup < 0:
            raise ValueError(f"Throughput needs window >= 1 and warmup >= 0, got window={window}, warmup={warmup}")
        self.window, self.warmup = window, warmup
        self.times: list[float] = []
        self._last: float | None = None
        self._batch = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
            recent = statistics.median(self.times[-self.window:])
            # CPU tensors: Lightning would copy a float to the GPU, and that copy waits for the GPU
            pl_module.log("train/step_ms", torch.tensor(recent * 1e3), rank_zero_only=True)
            pl_module.log("train/images_per_s", torch.tensor(self._batch * trainer.world_size / recent),
                          rank_zero_only=True)
        self._last = now

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        steady = self.times[self.warmup:]
        if steady:
            ms = statistics.median(steady) * 1e3
            print(f"throughput: {ms:.1f} ms/step, {self._batch * trainer.world_size / ms * 1e3:.1f} images/s "
                  f"(median of {len(steady)} steps after {self.warmup}; batch {self._batch} x {trainer.world_size} ranks)")
