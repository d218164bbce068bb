"""Bit plans from the allocator: YAML round trip, into DiTModule, validation on load, the heatmap."""

import pytest
from PIL import Image

from robuq.ampn.allocate import allocate_dp
from robuq.ampn.heatmap import plan_grid, save_heatmap
from robuq.module import DiTModule
from robuq.quant import BitPlan, act_bits

KINDS = ["norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]
LAYERS = [f"transformer_blocks.0.{k}" for k in KINDS]


def test_plan_round_trip_into_ditmodule(teacher_dir, tmp_path):
    table = {n: {b: 1.0 / (b + i) for b in (1, 2, 4, 8)} for i, n in enumerate(LAYERS)}
    allocation = allocate_dp(table, dict.fromkeys(LAYERS, 1), 3.0)
    plan = BitPlan(bits=allocation.bits, budget=3.0, weighting="uniform", candidates=[1, 2, 4, 8], method="dp",
                   source="test", extra={"predicted_loss_increase": allocation.predicted})
    path = tmp_path / "plan.yaml"
    plan.save(path)
    assert BitPlan.load(path) == plan
    assert len(set(plan.bits.values())) > 1  # a real mixed plan

    module = DiTModule(task="qat", teacher=teacher_dir, plan=str(path))
    assert act_bits(module.student) == plan.bits
    assert act_bits(module.ema) == plan.bits


@pytest.mark.parametrize(
    "bits,match",
    [
        ({"transformer_blocks.0.attn1.to_qq": 2}, r"'transformer_blocks.0.attn1.to_qq' \(did you mean 'transformer_blocks.0.attn1.to_q'"),
        ({"transformer_blocks.3.ff.net.2": 2}, "transformer_blocks.3.ff.net.2"),
        ({"transformer_blocks.0.ff.net.2": 9}, "layer 'transformer_blocks.0.ff.net.2' has activation width 9"),
    ],
)
def test_plan_is_validated_against_the_model_on_load(teacher_dir, tmp_path, bits, match):
    path = tmp_path / "plan.yaml"
    path.write_text("bits:\n" + "".join(f"  {n}: {b}\n" for n, b in bits.items()))
    with pytest.raises(ValueError, match=match):
        DiTModule(task="qat", teacher=teacher_dir, plan=str(path))


def test_heatmap_layout_and_png(tmp_path):
    bits = {f"transformer_blocks.{b}.{k}": (b + i) % 4 + 1 for b in range(3) for i, k in enumerate(KINDS)}
    bits["proj_out_1"] = 8  # a layer outside the blocks
    rows, cols, grid = plan_grid(bits)
    assert rows == ["block 0", "block 1", "block 2", "other"]
    assert cols == ["q", "k", "v", "out", "fc1", "fc2", "adaLN", "proj_out_1"]
    assert grid[1, cols.index("adaLN")] == bits["transformer_blocks.1.norm1.linear"]
    assert grid[3, cols.index("proj_out_1")] == 8 and grid[3, 0] != grid[3, 0]  # NaN where no layer
    save_heatmap(bits, tmp_path / "plan.png", [1, 2, 3, 4, 8], "title", weights=dict.fromkeys(bits, 10))
    with Image.open(tmp_path / "plan.png") as image:
        assert image.format == "PNG" and image.width > 300
