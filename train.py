"""robuq's training entry point: ``python train.py fit --config configs/fmnist_w158a2.yaml``.

A LightningCLI over ``robuq.module.DiTModule`` and any LightningDataModule (chosen in the
config by class_path). ``fit --ckpt_path last`` resumes a run exactly. One ``fit`` at a time
per ``trainer.default_root_dir`` (``<root>/.lock``, see ``robuq.checkpoint.RunLock``).
"""

import atexit
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO

from robuq.checkpoint import LOCK_NAME, AtomicCheckpointIO, RunLock, atomic_link_checkpoint, is_global_rank_zero_env
from robuq.module import DiTModule

_LOCKS: list[RunLock] = []


def _release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().release()


atexit.register(_release_locks)


class RobuqCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        """Lock the run directory before anything is loaded or written: a second ``fit`` into it
        is refused while the first runs; a killed run's stale lock is taken over by a resume."""
        if self.subcommand != "fit" or not is_global_rank_zero_env():  # DDP workers: rank 0 holds it
            return
        trainer = self._get(self.config, "trainer", default={}) or {}
        root = trainer.get("default_root_dir") or "runs/default"
        lock = RunLock(root)
        lock.acquire(resume=self._get(self.config, "ckpt_path") is not None)
        _LOCKS.append(lock)

    def before_fit(self) -> None:
        for callback in self.trainer.checkpoint_callbacks:  # save_last=True goes through AtomicCheckpointIO
            if isinstance(callback, ModelCheckpoint) and callback.save_last == "link":
                callback._link_checkpoint = atomic_link_checkpoint

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI would replace the model arguments by the hyperparameters saved in an
        explicit ``--ckpt_path`` file (not for ``last``), silently overriding what the user asked
        for and by-passing DiTModule.on_load_checkpoint's refusal of another model, quant config or
        bit plan. Here the config is what runs, the same for ``last`` and a path; the checkpoint is
        read once, in fit, weights-only, by AtomicCheckpointIO."""

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
            if self._get(self.config, "ckpt_path") is not None and is_global_rank_zero_env():
                _keep_metrics(Path(root))
            elif Path(root).is_dir() and {p.name for p in Path(root).iterdir()} <= {LOCK_NAME}:
                # only our lock is there: CSVLogger's "not empty, previous logs will be deleted" is noise
                warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            kwargs["logger"] = CSVLogger(save_dir=root, name="", version="")
        return super().instantiate_trainer(**kwargs)


def _keep_metrics(root: Path) -> None:
    """CSVLogger deletes an existing metrics.csv; on resume keep the earlier segments' metrics as
    metrics.1.csv, metrics.2.csv, ... (a killed run's rows after its last checkpoint included)."""
    metrics = root / "metrics.csv"
    if metrics.is_file():
        n = 1
        while (root / f"metrics.{n}.csv").exists():
            n += 1
        metrics.rename(root / f"metrics.{n}.csv")


def main(args=None):
    try:
        RobuqCLI(
            DiTModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    finally:
        _release_locks()


if __name__ == "__main__":
    import sys

    from robuq.checkpoint import RunLockError

    try:
        main()
    except RunLockError as e:  # a plain message, not a traceback: nothing went wrong in the code
        sys.exit(f"train.py: {e}")
