"""How Lightning 2.6 writes last.ckpt, and that it is atomic in each mode.

* ``save_last=True`` (robuq's configs): a separate ``trainer.save_checkpoint`` -> our
  AtomicCheckpointIO (temp + fsync + rename); the kill test's event log shows every last.ckpt
  write going through ``.last.ckpt.tmp-*``.
* ``save_last="link"``: Lightning's ``_link_checkpoint`` removes last.ckpt, then symlinks (or
  copies in place where symlinks fail): a kill in between leaves no last.ckpt, or a partial one.
  train.py swaps in ``robuq.checkpoint.atomic_link_checkpoint`` (link under a temp name + rename).
"""

import os
from types import SimpleNamespace

import pytest
import torch
from faultkit import fit, write_config
from lightning.pytorch.callbacks import ModelCheckpoint

from robuq.checkpoint import atomic_link_checkpoint, safe_load

TRAINER = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *a: None))


class Killed(BaseException):
    pass


def setup_dir(tmp_path):
    torch.save({"step": 1}, tmp_path / "step1.ckpt")
    torch.save({"step": 2}, tmp_path / "step2.ckpt")
    os.symlink("step1.ckpt", tmp_path / "last.ckpt")
    return tmp_path / "step2.ckpt", tmp_path / "last.ckpt"


def die(*args, **kwargs):
    raise Killed


def test_lightning_link_is_not_atomic(tmp_path, monkeypatch):
    """The hazard, shown on Lightning's own code: killed between remove and symlink."""
    new, last = setup_dir(tmp_path)
    monkeypatch.setattr(os, "symlink", die)
    with pytest.raises(Killed):
        ModelCheckpoint._link_checkpoint(TRAINER, str(new), str(last))
    assert not os.path.lexists(last)  # resume would find no last checkpoint at all


@pytest.mark.parametrize("fail", ["symlink", "replace", None])
def test_atomic_link_keeps_the_previous_last(tmp_path, monkeypatch, fail):
    new, last = setup_dir(tmp_path)
    if fail:
        monkeypatch.setattr(os, fail, die)
        with pytest.raises(Killed):
            atomic_link_checkpoint(TRAINER, str(new), str(last))
        monkeypatch.undo()
        assert safe_load(last) == {"step": 1}
    else:
        atomic_link_checkpoint(TRAINER, str(new), str(last))
        assert os.readlink(last) == "step2.ckpt" and safe_load(last) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "step1.ckpt", "step2.ckpt"]


def test_atomic_link_falls_back_to_an_atomic_copy(tmp_path, monkeypatch):
    new, last = setup_dir(tmp_path)
    monkeypatch.setattr(os, "symlink", lambda *a: (_ for _ in ()).throw(OSError("no symlinks here")))
    atomic_link_checkpoint(TRAINER, str(new), str(last))
    assert not os.path.islink(last) and safe_load(last) == {"step": 2}


def test_fit_with_save_last_link_then_resume(tmp_path, tiny_teacher):
    cfg = write_config(tmp_path / "c.yaml", tiny_teacher, max_steps=4)
    cfg_text = open(cfg).read().replace("save_last: true", "save_last: link")
    open(cfg, "w").write(cfg_text)
    root = tmp_path / "run"
    fit(cfg, root, "--trainer.max_steps", "2")
    last = root / "checkpoints" / "last.ckpt"
    assert os.readlink(last) == "epoch=0-step=2.ckpt"
    fit(cfg, root, "--ckpt_path", "last")
    # Lightning quirk in link mode: the resumed run's ModelCheckpoint restored last_model_path=""
    # (the step file was saved before last.ckpt was linked), so it links last-v1.ckpt; resume
    # still picks the newest last*.ckpt by mtime (of the target), i.e. step 4.
    lasts = sorted((root / "checkpoints").glob("last*.ckpt"), key=lambda p: os.stat(p).st_mtime_ns)
    assert os.readlink(lasts[-1]) == "epoch=0-step=4.ckpt" and safe_load(lasts[-1])["global_step"] == 4
