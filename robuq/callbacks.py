"""Lightning callbacks of our own: a sample grid every N steps."""

from __future__ import annotations

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
