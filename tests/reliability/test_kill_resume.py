"""kill -9 of train.py at random points, mid-checkpoint-write included, then ``--ckpt_path last``.

Each launch runs ``faulty_train.py`` (train.py with checkpoint writes slowed to ~0.3 s, in chunks,
and an event log) in its own session, and is killed with SIGKILL (process group) either at a
random time, or a random fraction into a chosen checkpoint write. After every kill: every *.ckpt
loads with safe_load, temp files are never taken for checkpoints, and the next launch starts
from last.ckpt's step. The last launch finishes; its weights, EMA, quantizer steps and optimiser
state equal an uninterrupted run's. Two runs started at once in one directory: one refuses.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from faultkit import ROOT, read_events, write_config
from lightning.pytorch.callbacks import ModelCheckpoint

from robuq.checkpoint import safe_load

HERE = Path(__file__).resolve().parent
EVERY = 2
SLOW_SAVE = 0.3  # seconds per checkpoint write


def env(log: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ROBUQ_FAULT_LOG": str(log),
            "ROBUQ_FAULT_SLOW_SAVE": str(SLOW_SAVE)}


def launch(config: str, root: Path, log: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, str(HERE / "faulty_train.py"), "fit", "--config", config,
            "--trainer.default_root_dir", str(root)] + (["--ckpt_path", "last"] if resume else [])
    out = open(log.with_suffix(".out"), "w")
    return subprocess.Popen(args, cwd=ROOT, env=env(log), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the process group this test created (train.py and any children); whether it was alive."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return alive


def wait_for(proc, log, predicate, timeout=120.0):
    """Poll the event log until predicate(events) is true; None if the process ended first."""
    end = time.time() + timeout
    while time.time() < end:
        events = [e for e in read_events(log) if e[1] == proc.pid]
        if predicate(events):
            return events
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    kill(proc)
    raise AssertionError(f"timed out waiting on {log}")


def last_step(root: Path) -> int:
    last = root / "checkpoints" / "last.ckpt"
    return safe_load(last)["global_step"] if last.exists() else 0


def check_directory(root: Path) -> list[str]:
    """Every *.ckpt loads; temp files are hidden, never *.ckpt, never found as a last checkpoint.
    Returns the temp files' names."""
    d = root / "checkpoints"
    if not d.exists():
        return []
    for p in sorted(d.glob("*.ckpt")):
        ckpt = safe_load(p)  # raises ValueError naming the file if it is partial
        assert "robuq" in ckpt and isinstance(ckpt["global_step"], int), p
    temps = sorted(p.name for p in d.iterdir() if ".tmp-" in p.name)
    for name in temps:
        assert name.startswith(".") and not name.endswith(".ckpt"), name
    found = ModelCheckpoint(dirpath=str(d))._find_last_checkpoints(None)
    assert all(".tmp-" not in Path(p).name for p in found), found
    return temps


@dataclass
class Chain:
    """Launch, kill, resume with --ckpt_path last, ... then one launch that runs to the end."""

    reference: dict
    root: Path
    rng: random.Random
    history: list = field(default_factory=list)
    kills: int = 0  # launches killed while still running
    mid_write: int = 0  # kills that left a partial temp file (landed inside a checkpoint write)

    def run(self, next_kind) -> None:
        i = 0
        while True:
            start = last_step(self.root)
            kind = next_kind(start) or "finish"
            log = self.root.parent / f"{self.root.name}-{i}.log"
            proc = launch(self.reference["config"], self.root, log, resume=i > 0)
            what = self._fault(proc, log, kind, start)
            if kind == "finish":
                assert proc.wait(timeout=300) == 0, (log.with_suffix(".out").read_text()[-4000:], self.history)
            temps = check_directory(self.root)
            started = [e for e in read_events(log) if e[0] == "train_start"]
            if started:  # the launch got as far as training: it must have resumed from last.ckpt
                assert int(started[0][3]) == start, (what, started, start, self.history)
            self.history.append(f"{kind}: from step {start}, {what}; temp files left: {temps}")
            if kind == "finish":
                return
            i += 1

    def _fault(self, proc, log, kind, start) -> str:
        ref = self.reference
        if kind == "finish":
            return "ran to the end"
        if kind == "startup":  # anywhere in import, lock, model build, restore
            time.sleep(self.rng.uniform(0.0, ref["startup_seconds"]))
            training = any(e[0] == "train_start" and e[1] == proc.pid for e in read_events(log))
            return self._kill(proc, "in start-up" if not training else "in training")
        if kind == "random":  # a random moment of the training loop (steps, validation, writes)
            if wait_for(proc, log, lambda ev: any(e[0] == "train_start" for e in ev)) is None:
                return "ended before training"
            left = (ref["max_steps"] - start) / ref["max_steps"]
            time.sleep(self.rng.uniform(0.0, ref["train_seconds"] * left))
            return self._kill(proc, "in training")
        assert kind == "write"  # a random fraction into a random one of the writes left
        saves_left = 2 * ((ref["max_steps"] - start) // EVERY)
        if saves_left == 0:
            proc.wait(timeout=300)
            return "nothing left to write"
        k, frac = self.rng.randint(1, saves_left), self.rng.uniform(0.05, 0.95)
        events = wait_for(proc, log, lambda ev: sum(e[0] == "save_begin" for e in ev) >= k)
        if events is None:
            return f"ended before write {k}"
        time.sleep(frac * SLOW_SAVE)
        target = Path([e for e in events if e[0] == "save_begin"][k - 1][3]).name
        what = self._kill(proc, f"in write {k} ({target}) at {frac:.0%}")
        if what.startswith("killed") and target in check_directory(self.root):  # its partial temp file
            self.mid_write += 1
        return what

    def _kill(self, proc, where) -> str:
        if kill(proc):
            self.kills += 1
            return f"killed {where}"
        return "ended before the kill"


def assert_same_run(final: Path, reference: Path) -> None:
    a, b = safe_load(reference), safe_load(final)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    for i in opt_a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_b["state"][i][key], opt_a["state"][i][key], rtol=0, atol=1e-6)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def make_reference(tmp: Path, teacher: str, max_steps: int) -> dict:
    """An uninterrupted run, started together with a second run into the same directory: exactly
    one of them gets the lock, the other refuses at once with a clear message."""
    config = write_config(tmp / "c.yaml", teacher, max_steps=max_steps, every_n=EVERY)
    root = tmp / "reference"
    t0 = time.time()
    procs = [launch(config, root, tmp / f"ref-{i}.log", resume=False) for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    outs = [(tmp / f"ref-{i}.out").read_text() for i in range(2)]
    assert sorted(codes) == [0, 1], (codes, [o[-3000:] for o in outs])
    refused = outs[codes.index(1)]
    assert "is in use by a running training process" in refused and "Traceback" not in refused, refused[-3000:]
    events = read_events(tmp / f"ref-{codes.index(0)}.log")
    start = next(e[2] for e in events if e[0] == "train_start")
    # last.ckpt (save_last=True) is written through AtomicCheckpointIO like every other checkpoint
    assert [Path(e[3]).name.split(".tmp-")[0] for e in events if e[0] == "save_begin"].count(".last.ckpt") == max_steps // EVERY
    assert not (root / ".lock").exists() and check_directory(root) == []
    return {"config": config, "last": root / "checkpoints" / "last.ckpt", "max_steps": max_steps, "tmp": tmp,
            "train_seconds": events[-1][2] - start, "startup_seconds": start - t0}


def finish_chain(reference, chain: Chain) -> None:
    print(f"{chain.root.name}:", *chain.history, sep="\n  ")
    assert_same_run(chain.root / "checkpoints" / "last.ckpt", reference["last"])
    temps = check_directory(chain.root)
    assert not temps, f"stale temp files not cleaned up by the finished run: {temps}; {chain.history}"
    assert not (chain.root / ".lock").exists()


def test_kill_at_random_points_then_resume_equals_uninterrupted(tmp_path, tiny_teacher):
    """CI: one chain with 3 kills (mid-write, a random moment of training, start-up), then finish."""
    reference = make_reference(tmp_path, tiny_teacher, max_steps=6)
    seed = int(os.environ.get("ROBUQ_KILL_SEED", 1))
    kinds = iter(["write", "random", "startup"])
    chain = Chain(reference, tmp_path / "chain", random.Random(seed))
    chain.run(lambda start: next(kinds, None))
    finish_chain(reference, chain)
    assert chain.kills >= 2 and chain.mid_write >= 1, chain.history


@pytest.mark.slow
def test_kill_loop_20_times(tmp_path, tiny_teacher):
    """At least 20 effective kills (of a still-running process), kinds and moments at random, in
    chains of up to 5 on a 12-step run; seed printed (-s), ROBUQ_KILL_SEED to replay."""
    reference = make_reference(tmp_path, tiny_teacher, max_steps=12)
    seed = int(os.environ.get("ROBUQ_KILL_SEED", time.time_ns() % 10_000))
    print("ROBUQ_KILL_SEED =", seed)
    rng = random.Random(seed)
    kills = mid_write = chains = 0
    while kills < 20:
        chain = Chain(reference, tmp_path / f"chain{chains}", random.Random(rng.random()))
        count = iter(range(5))
        chain.run(lambda start: rng.choice(["random", "write", "write", "startup"])
                  if start < reference["max_steps"] and next(count, None) is not None else None)
        finish_chain(reference, chain)
        kills, mid_write, chains = kills + chain.kills, mid_write + chain.mid_write, chains + 1
    print(f"{kills} kills in {chains} chains; {mid_write} landed inside a checkpoint write")
    assert mid_write >= 3
