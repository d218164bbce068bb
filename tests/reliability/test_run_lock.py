"""Two runs pointed at one directory: ``<root>/.lock`` (O_EXCL, holding host, PID and process start
time). A live owner refuses every other fit, resume included; a dead owner's stale lock is taken
over by ``--ckpt_path last`` and refused to a fresh run (the directory holds an unfinished run)."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
from faultkit import fit

from robuq.checkpoint import RunLock, RunLockError, _process_start, is_global_rank_zero_env, safe_load


def write_lock(root, pid, host=None, start="auto"):
    root.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "time": time.time(), "argv": ["train.py", "fit"],
            "start": _process_start(pid) if start == "auto" else start}
    (root / ".lock").write_text(json.dumps(info))
    return info


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def test_live_lock_refuses_fit_and_resume_before_touching_anything(tmp_path, qat_config, live_pid):
    root = tmp_path / "run"
    info = write_lock(root, live_pid)
    for extra in [(), ("--ckpt_path", "last")]:
        with pytest.raises(RunLockError, match=rf"{root} is in use by a running training process \(pid {live_pid} on "):
            fit(qat_config, root, *extra)
    assert sorted(os.listdir(root)) == [".lock"]  # no config.yaml, checkpoints, metrics
    assert json.loads((root / ".lock").read_text()) == info


def test_stale_lock_refuses_a_fresh_run_and_is_taken_over_by_resume(tmp_path, qat_config, recwarn):
    root = tmp_path / "run"
    fit(qat_config, root, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1")  # finished run
    assert not (root / ".lock").exists()
    pid = dead_pid()
    write_lock(root, pid)  # as a kill -9 leaves it
    with pytest.raises(RunLockError, match=rf"previous run in {root} \(pid {pid} .*stopped without finishing.*--ckpt_path last"):
        fit(qat_config, root)
    fit(qat_config, root, "--ckpt_path", "last")
    assert any(f"taking over the stale lock of {root} (pid {pid}" in str(w.message) for w in recwarn)
    assert safe_load(root / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert not (root / ".lock").exists()
    # the first segment's metrics survive the resume (CSVLogger would delete metrics.csv)
    assert "train/loss" in (root / "metrics.1.csv").read_text()


def test_resume_of_a_finished_run(tmp_path, qat_config):
    root = tmp_path / "run"
    fit(qat_config, root, "--trainer.max_steps", "2")
    fit(qat_config, root, "--ckpt_path", "last", "--trainer.max_steps", "4")
    assert safe_load(root / "checkpoints" / "last.ckpt")["global_step"] == 4 and not (root / ".lock").exists()


@pytest.mark.parametrize("case", ["reused_pid", "empty_file", "garbage"])
def test_dead_or_unreadable_locks_are_stale(tmp_path, live_pid, case):
    root = tmp_path / "run"
    if case == "reused_pid":  # the PID lives, but it is another process (another start time)
        write_lock(root, live_pid, start="1")
    else:
        root.mkdir()
        (root / ".lock").write_text("" if case == "empty_file" else "{not json")
        old = time.time() - 3600
        os.utime(root / ".lock", (old, old))
    with pytest.raises(RunLockError, match="stopped without finishing"):
        RunLock(root).acquire(resume=False)
    with RunLock(root) as lock:
        lock.acquire(resume=True)
        assert json.loads((root / ".lock").read_text())["pid"] == os.getpid()
    assert not (root / ".lock").exists()


def test_lock_of_another_host_refuses_with_a_way_out(tmp_path):
    root = tmp_path / "run"
    write_lock(root, 12345, host="elsewhere.example")
    for resume in (False, True):
        with pytest.raises(RunLockError, match=rf"on another host.*delete {root / '.lock'}"):
            RunLock(root).acquire(resume=resume)


def _contend(root, barrier, results, i):
    barrier.wait()
    lock = RunLock(root)
    try:
        lock.acquire(resume=True)
        results[i] = 1
        time.sleep(0.5)  # hold it while the others try
        lock.release()
    except RunLockError:
        results[i] = 2


@pytest.mark.parametrize("stale", [False, True])
def test_racing_processes_exactly_one_wins(tmp_path, stale):
    """Six processes released together (onto a stale lock, or none): exactly one gets the lock."""
    root = tmp_path / "run"
    if stale:
        write_lock(root, dead_pid())
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Array("i", 6)
    procs = [ctx.Process(target=_contend, args=(root, barrier, results, i)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(results) == [1, 2, 2, 2, 2, 2], list(results)
    assert not (root / ".lock").exists()


def test_ddp_worker_ranks_do_not_take_the_lock(monkeypatch):
    assert is_global_rank_zero_env()
    for var in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.setenv(var, "1")
        assert not is_global_rank_zero_env()
        monkeypatch.delenv(var)
