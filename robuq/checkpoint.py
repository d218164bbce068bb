"""Checkpoint files: atomic writes and safe (weights-only) reads with errors that name the file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def safe_load(path: str | Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True: a checkpoint that would run code on load is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain data, which could run code "
            f"when unpickled ({str(e).splitlines()[0]}). Only load checkpoints you trust with other tools."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0]})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written file and only loads weights-only."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return safe_load(path, map_location=map_location or "cpu")
