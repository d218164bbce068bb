"""Fault injection for the reliability tests, used in-process (with pytest's monkeypatch) and by
``faulty_train.py`` (a train.py launcher configured through environment variables).

Faults:
  * slow checkpoint writes (the bytes go out in chunks with sleeps, so a kill can land mid-write);
  * ENOSPC on the n-th checkpoint write, after half of it is on disk;
  * NaN/Inf at a chosen step: in a student layer's output, in quantizer steps, or in a gradient.
Events (``train_start``, ``save_begin``, ``save_renamed``, ``step_end``) go to a log file, one line
each: ``<event> <pid> <time> <detail>``.
"""

from __future__ import annotations

import errno
import io
import os
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=12, in_channels=1, out_channels=1, num_layers=1,
                sample_size=32, patch_size=4, num_embeds_ada_norm=10)


def write_config(path, teacher, max_steps=6, every_n=2, val_every=4, model=None, data=None, task="qat"):
    """A tiny CPU QAT run (hidden 24 = 12 * 2) that checkpoints every ``every_n`` steps (plus
    last.ckpt). ``model`` / ``data``: extra init args merged over the defaults."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "use_distributed_sampler": False,
            "val_check_interval": val_every, "check_val_every_n_epoch": None, "limit_val_batches": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True, "every_n_train_steps": every_n, "save_top_k": -1}}],
        },
        "model": {"task": task, **({"teacher": teacher} if task == "qat" else {"model": TINY_DIT}),
                  "warmup_steps": 2, "ema_decay": 0.9, **(model or {})},
        "data": data or {"class_path": "robuq.data.fmnist.FashionMNISTDataModule",
                         "init_args": {"batch_size": 8, "val_size": 8}},
    }
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


NAN_LAYER = "transformer_blocks.0.ff.net.2"


def log_event(log: str | None, event: str, detail="") -> None:
    if log:
        with open(log, "a") as f:
            f.write(f"{event} {os.getpid()} {time.time():.6f} {detail}\n")
            f.flush()


def read_events(log: str | Path) -> list[tuple[str, int, float, str]]:
    if not Path(log).exists():
        return []
    events = []
    for line in Path(log).read_text().splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3:
            events.append((parts[0], int(parts[1]), float(parts[2]), parts[3] if len(parts) > 3 else ""))
    return events


def install(setattr, log=None, slow_save=0.0, enospc_at=None, nan_step=None, nan_where="output",
            nan_value=float("nan"), nan_once=True, nan_rank=None):
    """Patch torch.save / os.replace (as robuq.checkpoint sees them) and DiTModule's hooks.

    ``setattr(obj, name, value)``: pytest's ``monkeypatch.setattr`` (undone after the test) or
    the builtin (in a throw-away process). ``nan_rank``: only on that DDP rank. ``nan_where``:
    "output" (the output of ``NAN_LAYER``), "step:<name>,<name>" (those layers' quantizer steps) or "grad" (the gradient of ``NAN_LAYER``'s
    weight, with a finite loss)."""
    import robuq.checkpoint as ckpt_mod
    from robuq.module import DiTModule

    real_save, real_replace = torch.save, os.replace
    saves = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if not hasattr(f, "write"):  # a path: not a checkpoint write through atomic_torch_save
            return real_save(obj, f, *args, **kwargs)
        saves["n"] += 1
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        log_event(log, "save_begin", getattr(f, "name", "?"))
        chunks = 4 if slow_save else 1
        for i in range(chunks):
            f.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
            f.flush()
            if enospc_at == saves["n"] and i == 0:
                if chunks == 1:
                    f.truncate(len(data) // 2)
                    f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if slow_save:
                time.sleep(slow_save / chunks)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        log_event(log, "save_renamed", dst)

    setattr(ckpt_mod.torch, "save", save)
    setattr(ckpt_mod.os, "replace", replace)

    state = {"fired": False, "armed": False}

    def armed(module) -> bool:
        if nan_rank is not None and module.global_rank != nan_rank:
            return False
        return nan_step is not None and module.global_step == nan_step and not (nan_once and state["fired"])

    def on_train_start(self):
        log_event(log, "train_start", self.global_step)
        layer = self.student.get_submodule(NAN_LAYER)

        def poison(module, args, out):
            return out * nan_value if state["armed"] else out

        layer.register_forward_hook(poison)

    def on_train_batch_start(self, batch, batch_idx):
        state["armed"] = False
        if not armed(self):
            return
        state["fired"] = True
        saves["before"] = {k: v.detach().clone() for k, v in self.state_dict().items() if torch.is_tensor(v)}
        if nan_where == "output":
            state["armed"] = True
        elif nan_where.startswith("step:"):
            for name in nan_where[5:].split(","):
                with torch.no_grad():
                    self.student.get_submodule(name).act.quantizer.step.fill_(nan_value)
        elif nan_where == "grad":
            state["armed_grad"] = True

    def on_after_backward(self):
        if state.pop("armed_grad", False):
            self.student.get_submodule(NAN_LAYER).weight.grad.view(-1)[0] = nan_value

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if "before" in saves and "after" not in saves:  # the state right after the faulty batch
            saves["after"] = {k: v.detach().clone() for k, v in self.state_dict().items() if torch.is_tensor(v)}
        state["armed"] = False
        if log:  # with a checksum of the weights, to compare DDP ranks
            checksum = sum(float(p.detach().double().sum()) for p in self.student.parameters())
            log_event(log, "step_end", f"{self.global_step} {checksum!r}")

    setattr(DiTModule, "on_train_start", on_train_start)
    setattr(DiTModule, "on_train_batch_start", on_train_batch_start)
    setattr(DiTModule, "on_after_backward", on_after_backward)
    setattr(DiTModule, "on_train_batch_end", on_train_batch_end)
    return saves  # {"n": checkpoint writes so far, "before"/"after": module state around the faulty batch}


def install_from_env() -> None:
    env = os.environ
    if not any(k.startswith("ROBUQ_FAULT_") for k in env):
        return
    install(
        setattr,
        log=env.get("ROBUQ_FAULT_LOG"),
        slow_save=float(env.get("ROBUQ_FAULT_SLOW_SAVE", 0)),
        enospc_at=int(env["ROBUQ_FAULT_ENOSPC_AT"]) if "ROBUQ_FAULT_ENOSPC_AT" in env else None,
        nan_step=int(env["ROBUQ_FAULT_NAN_STEP"]) if "ROBUQ_FAULT_NAN_STEP" in env else None,
        nan_where=env.get("ROBUQ_FAULT_NAN_WHERE", "output"),
        nan_rank=int(env["ROBUQ_FAULT_NAN_RANK"]) if "ROBUQ_FAULT_NAN_RANK" in env else None,
    )


_TRAIN = None


def train_main(*args: str) -> None:
    """``python train.py <args>`` in this process (train.py is loaded by path, not imported by name)."""
    global _TRAIN
    if _TRAIN is None:
        import importlib.util

        root = Path(__file__).resolve().parents[2]
        spec = importlib.util.spec_from_file_location("robuq_train_entry", root / "train.py")
        _TRAIN = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_TRAIN)
    import sys

    argv, sys.argv = sys.argv, [str(Path(_TRAIN.__file__))]  # as if run from the command line
    try:
        _TRAIN.main(list(args))
    finally:
        sys.argv = argv


def fit(config: str, root, *extra: str) -> None:
    train_main("fit", "--config", str(config), "--trainer.default_root_dir", str(root), *extra)


def all_finite(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if torch.is_tensor(v) and v.is_floating_point())


def temp_files(root) -> list[str]:
    d = Path(root) / "checkpoints"
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name) if d.exists() else []
