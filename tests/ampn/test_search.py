"""The search job end to end on a tiny DiT on CPU: outputs, cache and resume, refusals, checkpoints."""

import json

import pytest
import torch
import yaml

from robuq.ampn import sensitivity
from robuq.ampn.allocate import average_bits
from robuq.ampn.search import main, search
from robuq.data.fmnist import FashionMNISTDataModule
from robuq.module import DiTModule
from robuq.quant import BitPlan

LAYERS = [f"transformer_blocks.0.{k}" for k in
          ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")]


def settings(teacher_dir, out_dir, **overrides):
    return {**dict(teacher=teacher_dir, warmup_steps=3, candidates=[1, 2], budget=1.5, heldout_size=16,
                   timestep_groups=4, data=FashionMNISTDataModule(batch_size=8), device="cpu", out_dir=str(out_dir)),
            **overrides}


def read(out_dir):
    return json.loads((out_dir / "sensitivity.json").read_text()), BitPlan.load(out_dir / "plan.yaml")


def test_cli_end_to_end_outputs(teacher_dir, tmp_path, capsys):
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(dict(
        teacher=teacher_dir, warmup_steps=3, candidates=[1, 2], budget=2.0, heldout_size=16, timestep_groups=4,
        data=dict(class_path="robuq.data.fmnist.FashionMNISTDataModule", init_args=dict(batch_size=8)),
        device="cpu", out_dir=str(tmp_path / "out"),
    )))
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--budget", "1.5", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["budget"] == 1.5 and printed["data"]["init_args"]["batch_size"] == 8

    summary = main(["--config", str(config), "--budget", "1.5"])
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"plan.yaml", "plan.png", "plan_ptq.yaml", "plan_ptq.png",
                                               "sensitivity.json", "warmup.pt"}
    table, plan = read(out)
    assert list(table["qat"]) == LAYERS and table["base_bits"] == 2 and table["candidates"] == [1, 2]
    assert all(row["2"] == 0.0 for row in table["qat"].values())
    assert table["macs"]["transformer_blocks.0.attn1.to_q"] == 64 * 16 * 16  # 64 patches
    assert table["macs"]["transformer_blocks.0.ff.net.0.proj"] == 64 * 16 * 64
    assert table["macs"]["transformer_blocks.0.norm1.linear"] == 1 * 16 * 96  # one vector per sample
    assert all(row["1"] > row["2"] > 0 for row in table["ptq"].values())  # PTQ: fewer bits, larger error
    assert list(plan.bits) == LAYERS and set(plan.bits.values()) <= {1, 2}
    assert plan.budget == 1.5 and plan.weighting == "macs" and plan.method == "dp" and plan.candidates == [1, 2]
    report = plan.extra["search"]
    assert average_bits(plan.bits, table["macs"]) == pytest.approx(report["average_bits"])
    assert report["average_bits"] <= 1.5 and report["exact"]
    assert report["cross_check"]["method"] == "lagrangian"
    assert report["cross_check"]["predicted_loss_increase"] >= report["predicted_loss_increase"] - 1e-12
    assert report["predicted_loss_increase"] == pytest.approx(sum(table["qat"][n][str(b)] for n, b in plan.bits.items()))
    assert "measured_loss_increase" in report and "ptq_guided" in report
    assert summary["plan"] == str(out / "plan.yaml")
    ptq_plan = BitPlan.load(out / "plan_ptq.yaml")  # the PTQ-guided plan, trainable like the QAT one
    assert list(ptq_plan.bits) == LAYERS and ptq_plan.budget == 1.5
    assert average_bits(ptq_plan.bits, table["macs"]) <= 1.5 + 1e-9
    assert report["ptq_guided"]["layers_differing"] == sum(ptq_plan.bits[n] != b for n, b in plan.bits.items())


def test_interrupted_search_resumes_to_the_same_table_and_plan(teacher_dir, tmp_path, monkeypatch):
    search(**settings(teacher_dir, tmp_path / "straight"))

    measured, real = [], sensitivity.measure_layer

    def crash_after_three_layers(student, name, *args, **kwargs):
        if name not in measured and len(measured) == 3:
            raise RuntimeError("killed")
        measured.append(name) if name not in measured else None
        return real(student, name, *args, **kwargs)

    monkeypatch.setattr(sensitivity, "measure_layer", crash_after_three_layers)
    with pytest.raises(RuntimeError, match="killed"):
        search(**settings(teacher_dir, tmp_path / "resumed"))
    partial = json.loads((tmp_path / "resumed" / "sensitivity.json").read_text())
    assert list(partial["qat"]) == LAYERS[:3]
    monkeypatch.undo()

    calls = []
    monkeypatch.setattr(sensitivity, "measure_layer", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    search(**settings(teacher_dir, tmp_path / "resumed"))
    assert calls == LAYERS[3:]  # only the missing layers were measured
    (t1, p1), (t2, p2) = read(tmp_path / "straight"), read(tmp_path / "resumed")
    assert t1 == t2
    assert p1 == p2


def test_cache_or_warmup_from_another_setup_is_refused(teacher_dir, tmp_path):
    search(**settings(teacher_dir, tmp_path))
    with pytest.raises(ValueError, match=r"sensitivity.json was measured for another setup \(candidates"):
        search(**settings(teacher_dir, tmp_path, candidates=[1, 2, 4]))
    with pytest.raises(ValueError, match=r"warmup.pt holds a warm-up made with other settings \(steps: saved 3, now 4"):
        search(**settings(teacher_dir, tmp_path, warmup_steps=4))
    # constraints and budget are not part of the measurement: the cache is reused
    search(**settings(teacher_dir, tmp_path, budget=1.2, pinned={"*.norm1.linear": 2}, method="lagrangian"))
    plan = BitPlan.load(tmp_path / "plan.yaml")
    assert plan.bits["transformer_blocks.0.norm1.linear"] == 2 and plan.method == "lagrangian"


def test_infeasible_budget_fails_before_measuring(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match=r"smallest average .* is 1\.2857"):
        search(**settings(teacher_dir, tmp_path, budget=1.2, min_bits={"*.ff.*": 2}, weighting="uniform"))
    assert not (tmp_path / "sensitivity.json").exists()


def qat_checkpoint(teacher_dir, path, plan=None):
    """A checkpoint as `fit` writes it (state dict, hyper-parameters and DiTModule's robuq metadata)."""
    module = DiTModule(task="qat", teacher=teacher_dir, plan=plan)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def test_search_from_a_qat_checkpoint(teacher_dir, tmp_path):
    ckpt = qat_checkpoint(teacher_dir, tmp_path / "qat.ckpt")
    summary = search(**settings(None, tmp_path / "out", checkpoint=ckpt, warmup_steps=0, ptq=False, verify=False))
    table, plan = read(tmp_path / "out")
    assert plan.source == ckpt and table["source"] == ckpt and list(table["qat"]) == LAYERS
    assert table["ptq"] is None and "ptq_guided" not in summary
    assert not (tmp_path / "out" / "warmup.pt").exists()

    mixed = qat_checkpoint(teacher_dir, tmp_path / "mixed.ckpt", plan={LAYERS[0]: 4})
    with pytest.raises(ValueError, match=r"mixed activation widths \[2, 4\]"):
        search(**settings(None, tmp_path / "out2", checkpoint=mixed))


def test_needs_a_qat_source(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="set warmup_steps > 0"):
        search(**settings(teacher_dir, tmp_path, warmup_steps=0))
    with pytest.raises(ValueError, match="must include the base width 2"):
        search(**settings(teacher_dir, tmp_path, candidates=[1, 4]))


@pytest.mark.parametrize("scope", ["step", "model"])
def test_adapted_search_records_its_reference(teacher_dir, tmp_path, scope):
    summary = search(**settings(teacher_dir, tmp_path, adapt_steps=1, adapt_scope=scope))
    table, plan = read(tmp_path)
    assert table["fingerprint"]["adapt"]["scope"] == scope
    # step scope measures against the unadapted student; model scope against the student adapted alike
    assert (table["adapted_base_loss"] is None) == (scope == "step")
    assert plan.extra["search"]["average_bits"] <= 1.5 and "measured_loss_increase" in summary
    with pytest.raises(ValueError, match="adapt_scope must be one of"):
        search(**settings(teacher_dir, tmp_path / "bad", adapt_steps=1, adapt_scope="layer"))
