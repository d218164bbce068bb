"""NaN/Inf during training: nan_policy=stop stops with the step and the first bad quantizer named
and leaves the last good checkpoint intact; nan_policy=skip carries on. Injected in-process
(faultkit): into a student layer's output, into quantizer steps, or into a gradient."""

from pathlib import Path

import pytest
import torch
from faultkit import all_finite, fit, install, temp_files

from robuq.checkpoint import safe_load
from robuq.module import load_for_eval

STEP = 3  # checkpoints at steps 2, 4, 6: the fault comes after the first


def last(root) -> dict:
    return safe_load(Path(root) / "checkpoints" / "last.ckpt")


def assert_stopped_cleanly(root, step=2):
    ckpt = last(root)
    assert ckpt["global_step"] == step and all_finite(ckpt)
    assert sorted(p.name for p in (Path(root) / "checkpoints").glob("*.ckpt")) == [f"epoch=0-step={step}.ckpt", "last.ckpt"]
    assert temp_files(root) == [] and not (Path(root) / ".lock").exists()
    model, info = load_for_eval(str(Path(root) / "checkpoints" / "last.ckpt"))
    assert info["global_step"] == step


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_stop_on_nonfinite_loss_names_the_step(tmp_path, qat_config, monkeypatch, value):
    install(monkeypatch.setattr, nan_step=STEP, nan_where="output", nan_value=value)
    with pytest.raises(FloatingPointError) as info:
        fit(qat_config, tmp_path / "run")
    message = str(info.value)
    assert "non-finite training loss" in message and f"at step {STEP}" in message
    assert "all quantizer steps are finite" in message and "last checkpoint is intact" in message
    assert_stopped_cleanly(tmp_path / "run")


def test_stop_names_the_first_bad_quantizer(tmp_path, qat_config, monkeypatch):
    bad = "transformer_blocks.0.ff.net.2,transformer_blocks.0.attn1.to_out.0"
    install(monkeypatch.setattr, nan_step=STEP, nan_where=f"step:{bad}")
    with pytest.raises(FloatingPointError, match=rf"at step {STEP}; first quantizer with a non-finite step: "
                                                 r"transformer_blocks\.0\.attn1\.to_out\.0\.act\.quantizer \(step=\[nan\]\)"):
        fit(qat_config, tmp_path / "run")
    assert_stopped_cleanly(tmp_path / "run")


def test_stop_on_nonfinite_gradient_before_it_reaches_a_checkpoint(tmp_path, qat_config, monkeypatch):
    """A finite loss with a NaN gradient: stepping on it would save NaN weights as the step-4
    checkpoint (and last.ckpt) one step before the loss shows it."""
    install(monkeypatch.setattr, nan_step=STEP, nan_where="grad")
    with pytest.raises(FloatingPointError, match=rf"non-finite gradient at step {STEP} \(first: "
                                                 r"transformer_blocks\.0\.ff\.net\.2\.weight\)"):
        fit(qat_config, tmp_path / "run")
    assert_stopped_cleanly(tmp_path / "run")


@pytest.mark.parametrize("where", ["output", "grad"])
def test_skip_carries_on(tmp_path, qat_config, monkeypatch, recwarn, where):
    """The faulty step changes nothing (weights, quantizer steps, EMA); training goes on to the end."""
    handle = install(monkeypatch.setattr, nan_step=STEP, nan_where=where)
    fit(qat_config, tmp_path / "run", "--model.nan_policy", "skip")
    warned = [str(w.message) for w in recwarn if "nan_policy=skip" in str(w.message)]
    assert len(warned) == 1 and f"at step {STEP}" in warned[0], warned
    before, after = handle["before"], handle["after"]
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    ckpt = last(tmp_path / "run")
    assert ckpt["global_step"] == 6 and all_finite(ckpt)
    assert temp_files(tmp_path / "run") == [] and not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("policy", ["skip", pytest.param("stop", marks=pytest.mark.slow)])
def test_nan_on_one_ddp_rank_does_not_hang(tmp_path, qat_config, policy):
    """2-process CPU DDP, NaN loss on rank 1 only: both ranks must skip (or stop) together. One
    rank stopping alone leaves the other waiting in the gradient all-reduce; Lightning refuses a
    training_step returning None under DDP; a skip on one rank only would make the ranks' weights
    differ silently."""
    import os
    import subprocess
    import sys

    from faultkit import ROOT, read_events

    log = tmp_path / "events.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUQ_FAULT_NAN_STEP": str(STEP), "ROBUQ_FAULT_NAN_RANK": "1",
           "ROBUQ_FAULT_LOG": str(log)}
    args = [sys.executable, str(Path(__file__).parent / "faulty_train.py"), "fit", "--config", qat_config,
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--model.nan_policy", policy]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    if policy == "skip":
        assert proc.returncode == 0 and last(tmp_path / "run")["global_step"] == 6, out[-3000:]
        final = {}
        for event, pid, _, detail in read_events(log):
            if event == "step_end":
                final[pid] = detail.split()
        assert len(final) == 2 and len({tuple(v) for v in final.values()}) == 1, final  # same weights on both ranks
    else:
        assert proc.returncode != 0 and "FloatingPointError" in out, out[-3000:]
        assert last(tmp_path / "run")["global_step"] == 2
    assert f"at step {STEP}" in out, out[-3000:]
