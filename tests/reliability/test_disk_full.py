"""Disk full (ENOSPC) while a checkpoint is written: a clear error naming the file, the previous
checkpoint still loads, no partial file; then ``--ckpt_path last`` finishes the run exactly."""

import errno
import os
import socket
import subprocess
import sys

import pytest
import torch
from faultkit import all_finite, fit, install, temp_files

from robuq.checkpoint import atomic_torch_save, remove_stale_temp_files, safe_load


def fail_after_half(monkeypatch, err=errno.ENOSPC):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
def test_atomic_save_disk_full_keeps_previous(tmp_path, monkeypatch, where):
    path = tmp_path / "model.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    if where == "write":
        fail_after_half(monkeypatch)
    else:
        def fail(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, {"fsync": "fsync", "rename": "replace"}[where], fail)
    with pytest.raises(OSError) as info:
        atomic_torch_save({"w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message and "no partial file" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]
    assert torch.equal(safe_load(path)["w"], torch.ones(3))


def test_interrupt_during_save_removes_temp_file(tmp_path, monkeypatch):
    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {f".last.ckpt.tmp-{host}-{dead.pid}": False,  # killed writer: removed
                 f".last.ckpt.tmp-{host}-{live.pid}": True,  # a live writer's: kept
                 f".last.ckpt.tmp-other-host-{dead.pid}": True,  # another host's: cannot tell, kept
                 f".other.ckpt.tmp-{host}-{dead.pid}": True}  # another target's: left to its writer
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
        atomic_torch_save({"w": torch.ones(1)}, tmp_path / "last.ckpt")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"last.ckpt"} | {n for n, keep in names.items() if keep}
        assert remove_stale_temp_files(tmp_path / "last.ckpt") == []
    finally:
        live.kill()
        live.wait()


def test_disk_full_during_training_then_resume(tmp_path, qat_config, monkeypatch):
    """Saves: 1 step-2, 2 last@2, 3 step-4, 4 last@4 <- ENOSPC. last.ckpt must stay at step 2."""
    fit(qat_config, tmp_path / "straight")
    saves = install(monkeypatch.setattr, enospc_at=4)
    root = tmp_path / "run"
    with pytest.raises(OSError) as info:
        fit(qat_config, root)
    assert saves["n"] == 4 and info.value.errno == errno.ENOSPC
    assert f"cannot write checkpoint {root / 'checkpoints' / 'last.ckpt'}" in str(info.value)
    assert "--ckpt_path last" in str(info.value)
    assert temp_files(root) == [] and not (root / ".lock").exists()
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert safe_load(root / "checkpoints" / "last.ckpt")["global_step"] == 2
    monkeypatch.undo()

    fit(qat_config, root, "--ckpt_path", "last")  # space freed: resume
    a, b = safe_load(tmp_path / "straight" / "checkpoints" / "last.ckpt"), safe_load(root / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6 and all_finite(b)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
