import json
from pathlib import Path

import pytest
import yaml

from robuq.ampn.replan import main, replan
from robuq.quant import BitPlan

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "docs/assets/ampn/sensitivity_stepadapt.json"  # the H100 step-adapted search's table


def test_replan_reproduces_the_shipped_plan(tmp_path):
    out = tmp_path / "avg2.yaml"
    summary = main([str(TABLE), "--budget", "2.0", "--out", str(out)])
    shipped = yaml.safe_load((ROOT / "configs/plans/fmnist_ampn_stepadapt_avg2.yaml").read_text())
    assert BitPlan.load(out).bits == shipped["bits"]
    assert summary["average_bits"] <= 2.0 and summary["exact"] and out.with_suffix(".png").is_file()


@pytest.mark.parametrize("table,budget", [("qat", 3.0), ("ptq", 2.0), ("qat", 1.5)])
def test_replan_meets_the_budget(tmp_path, table, budget):
    summary = replan(str(TABLE), str(tmp_path / "p.yaml"), budget=budget, table=table)
    plan = BitPlan.load(tmp_path / "p.yaml")
    macs = json.loads(TABLE.read_text())["macs"]
    avg = sum(macs[n] * b for n, b in plan.bits.items()) / sum(macs.values())
    assert avg <= budget + 1e-9 and avg == pytest.approx(summary["average_bits"])
    assert summary["qat_predicted_loss_increase"] is not None


def test_replan_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `python -m robuq.ampn.search` first"):
        replan(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="table must be one of"):
        replan(str(TABLE), table="mse")
    partial = json.loads(TABLE.read_text())
    partial["qat"].pop(next(iter(partial["qat"])))
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(ValueError, match="no complete 'qat' table"):
        replan(str(tmp_path / "partial.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a sensitivity table"):
        replan(str(tmp_path / "junk.json"))
