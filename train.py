"""robuq's training entry point: ``python train.py fit --config configs/fmnist_w158a2.yaml``.

A LightningCLI over ``robuq.module.DiTModule`` and any LightningDataModule (chosen in the
config by class_path). ``fit --ckpt_path last`` resumes a run exactly.
"""

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO

from robuq.checkpoint import AtomicCheckpointIO
from robuq.module import DiTModule


class RobuqCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs):
        """Every run writes checkpoints atomically, reads them weights-only, and keeps everything
        (metrics.csv, checkpoints/, samples/) directly under ``trainer.default_root_dir``, so
        ``--ckpt_path last`` finds the run's last checkpoint."""
        config = self._get(self.config_init, "trainer", default={})
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or "runs/default"
            kwargs["logger"] = CSVLogger(save_dir=root, name="", version="")
        return super().instantiate_trainer(**kwargs)


def main(args=None):
    RobuqCLI(
        DiTModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
