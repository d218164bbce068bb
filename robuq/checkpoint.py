"""Checkpoint files: atomic writes and safe (weights-only) reads with errors that name the file."""

from __future__ import annotations

import errno
import os
import pickle
import re
import socket
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

_TMP_INFIX = ".tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: assume alive (never delete another writer's file)
    return True


def _tmp_path(path: Path) -> Path:
    """``.<name>.tmp-<host>-<pid>``: hidden, and not ending in the target's suffix, so Lightning's
    ``last*.ckpt`` search and ``*.ckpt`` globs never mistake a half-written file for a checkpoint."""
    return path.with_name(f".{path.name}{_TMP_INFIX}{socket.gethostname()}-{os.getpid()}")


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete temp files that writers of ``path`` on this host left when they were killed (their
    process is gone); files of live writers and of other hosts are left alone. Returns what went."""
    path = Path(path)
    prefix, host = f".{path.name}{_TMP_INFIX}", socket.gethostname()
    removed = []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for p in candidates:
        owner, _, pid = p.name[len(prefix):].rpartition("-")
        if owner == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (survive a power cut, not only a killed process); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over ``path``.

    A process killed at any point leaves ``path`` either absent or a previous complete version,
    never a partial file. A failed write (e.g. disk full) removes its temp file and raises an
    OSError (same errno) that names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            hint = " (disk full: free space, then resume, e.g. train.py fit --ckpt_path last)" if e.errno == errno.ENOSPC else ""
            raise OSError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}{hint}; no partial file "
                                   f"was left and the previous {path.name}, if any, is unchanged") from e
        raise
    _fsync_dir(path.parent)


def atomic_link_checkpoint(trainer, filepath, linkpath) -> None:
    """``ModelCheckpoint(save_last="link")``'s step, made atomic: Lightning 2.6 removes last.ckpt
    and then creates the symlink (or copies the file in place where symlinks fail), so a kill in
    between leaves no last.ckpt, or a partial one. Here the link (or copy) is made under a temp
    name and renamed over last.ckpt."""
    import shutil

    if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
        link = Path(linkpath)
        remove_stale_temp_files(link)
        tmp = _tmp_path(link)
        try:
            try:
                os.symlink(os.path.relpath(filepath, link.parent), tmp)
            except OSError:  # no symlinks here (e.g. Windows without the privilege): a copy
                shutil.copy(filepath, tmp)
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(link.parent)
    trainer.strategy.barrier()


def _first_line(e: BaseException) -> str:
    """The first line of an error message (torch's are long), without torch's advice to retry
    with weights_only=False, which would be exactly the wrong thing for a file we refuse."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text.split(" In PyTorch 2.6")[0].strip()


def safe_load(path: str | Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True: a checkpoint that would run code on load is refused.

    Every failure is a ValueError (FileNotFoundError for a missing file) naming the file and what
    is wrong with it: empty, truncated/corrupt, not a torch checkpoint, or code on unpickling."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or a full disk?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if found:
            raise ValueError(
                f"refusing to load {path}: unpickling it would call {found.group(1)}, i.e. it holds objects other "
                f"than tensors and plain data, which could run code. Only load checkpoints you trust with other tools."
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        raise ValueError(
            f"cannot load {path}: it is not a weights-only torch checkpoint "
            f"({detail.group(1).strip() if detail else _first_line(e)}): it is corrupt, not a checkpoint, or a "
            "pickle that would run code. Only load checkpoints you trust with other tools."
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {_first_line(e)})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written file and only loads weights-only."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        ckpt = safe_load(path, map_location=map_location or "cpu")
        required = ("state_dict", "pytorch-lightning_version", "global_step")
        missing = [k for k in required if k not in ckpt] if isinstance(ckpt, dict) else list(required)
        if missing:
            what = f"a dict lacking {missing}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}, not a dict"
            raise ValueError(f"{path} is not a Lightning training checkpoint written by train.py fit: it holds {what}")
        return ckpt


# ----------------------------------------------------------------------------------------------- run lock
LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """Another run holds (or a dead run left) the lock of a run directory."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def is_global_rank_zero_env() -> bool:
    """Whether the environment makes this process global rank 0 (true when not distributed)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))


class RunLock:
    """``<root>/.lock``: at most one training process writes a run directory.

    Created with O_EXCL and holding the owner's host, PID and process start time. A lock whose
    process is gone (killed: kill -9, OOM, power cut) is stale: ``acquire(resume=True)`` takes it
    over, ``acquire(resume=False)`` refuses, since the directory holds an unfinished run that
    should be resumed (``--ckpt_path last``) rather than mixed with a new one. A live owner, or
    one on another host (whose liveness this machine cannot check), always refuses."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.held = False

    def _read(self, path: Path | None = None) -> dict | None:
        import json

        try:
            info = json.loads((path or self.path).read_text())
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _alive(self, info: dict) -> bool | None:
        pid = info.get("pid")
        if not isinstance(pid, int):
            return False  # unreadable lock (its writer was killed while writing it)
        if info.get("host") != socket.gethostname():
            return None
        if not _pid_alive(pid):
            return False
        start = info.get("start")
        return start is None or _process_start(pid) in (None, start)

    def describe(self, info: dict) -> str:
        import time

        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["time"])) if isinstance(info.get("time"), (int, float)) else "?"
        return f"pid {info.get('pid')} on {info.get('host')}, started {when}: {' '.join(map(str, info.get('argv') or []))}"

    def acquire(self, resume: bool) -> None:
        import json
        import sys
        import time
        import warnings

        self.root.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                "time": time.time(), "argv": sys.argv}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(mine, f)
                    f.flush()
                    os.fsync(f.fileno())
                self.held = True
                return
            info = self._read()
            if info is None:
                continue  # released meanwhile
            if not info:
                try:  # being written right now, or left empty by a writer killed in between
                    young = time.time() - self.path.stat().st_mtime < 2.0
                except FileNotFoundError:
                    continue
                if young:
                    time.sleep(0.1)
                    continue
            alive = self._alive(info)
            if alive:
                raise RunLockError(
                    f"{self.root} is in use by a running training process ({self.describe(info)}). Two runs must not "
                    f"write one directory: wait for it to finish or stop it, or choose another --trainer.default_root_dir"
                )
            if alive is None:
                raise RunLockError(
                    f"{self.root} is locked by {self.describe(info)}, on another host, which cannot be checked from "
                    f"here. If that run is no longer running, delete {self.path}"
                )
            if not resume:
                raise RunLockError(
                    f"a previous run in {self.root} ({self.describe(info)}) stopped without finishing (killed?). "
                    f"Resume it with --ckpt_path last, or choose another --trainer.default_root_dir (or delete "
                    f"{self.path} to start a new run in this directory anyway)"
                )
            # Take the stale lock over: move it aside atomically and make sure it is the one we judged.
            aside = self.path.with_name(f"{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            if self._read(aside) != info:  # another resumer replaced it meanwhile: put theirs back
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
            else:
                warnings.warn(f"taking over the stale lock of {self.root} ({self.describe(info)})", stacklevel=2)
            aside.unlink(missing_ok=True)
        raise RunLockError(f"could not lock {self.root}: {self.path} keeps changing (another process is competing for it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = self._read()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
