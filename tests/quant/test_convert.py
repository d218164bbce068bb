"""quantize_ on a tiny diffusers DiT: which layers, exactness with quantizers off, training, plans."""

import copy

import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from robuq.quant import (
    BitPlan,
    QuantConfig,
    QuantLinear,
    act_bits,
    lsq_quantizers,
    quant_layers,
    quantize_,
    set_act_bits,
)
from robuq.quant.context import current_timestep_groups

BLOCK = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear"]
EMBEDDERS = ["norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2"]
BLOCK_LAYERS = sorted(f"transformer_blocks.{b}.{n}" for b in range(2) for n in BLOCK)
EMBEDDER_LAYERS = sorted(f"transformer_blocks.{b}.{n}" for b in range(2) for n in EMBEDDERS)
FINAL_LAYERS = ["proj_out_1", "proj_out_2"]


def make_dit(heads=3, head_dim=64, layers=2, sample_size=32) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


def inputs(batch=2, sample_size=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, sample_size, sample_size, generator=g, dtype=dtype)
    t = torch.tensor([10, 900][:batch] + [500] * max(0, batch - 2))
    y = torch.arange(batch) % 10
    return x, t, y


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.fixture
def dit():
    return make_dit()


# ---- which layers ------------------------------------------------------------------------------


def test_default_converts_the_seven_block_linears(dit):
    fp = copy.deepcopy(dit)
    report = quantize_(dit)
    assert sorted(quant_layers(dit)) == BLOCK_LAYERS
    assert sorted(report.converted) == BLOCK_LAYERS
    assert sorted(report.kept) == sorted(EMBEDDER_LAYERS + FINAL_LAYERS)
    assert report.converted["transformer_blocks.0.norm1.linear"] == (192, 1152, 2)
    assert report.converted["transformer_blocks.1.ff.net.2"] == (768, 192, 2)
    assert str(report) == "quantized 14 Linear layers (A2: 14); kept 6 in full precision"
    # everything else is the very same full-precision module with identical parameters
    for name in EMBEDDER_LAYERS + FINAL_LAYERS:
        assert type(dit.get_submodule(name)) is nn.Linear
    assert isinstance(dit.pos_embed.proj, nn.Conv2d)
    fp_state = fp.state_dict()
    for k, v in dit.state_dict().items():
        if not any(k.startswith(layer + ".") for layer in BLOCK_LAYERS):
            assert torch.equal(v, fp_state[k]), k
    # the quantized layers carry the configured quantizers
    layer = dit.get_submodule("transformer_blocks.0.attn1.to_q")
    q = layer.act.quantizer
    assert (q.bits, q.mode, q.signed) == (2, "dynamic", True) and layer.weight_quant is not None
    assert len(lsq_quantizers(dit)) == 14


@pytest.mark.parametrize(
    "embedders,final,expected",
    [(True, False, BLOCK_LAYERS + EMBEDDER_LAYERS), (False, True, BLOCK_LAYERS + FINAL_LAYERS),
     (True, True, BLOCK_LAYERS + EMBEDDER_LAYERS + FINAL_LAYERS)],
)
def test_embedder_and_final_switches(dit, embedders, final, expected):
    report = quantize_(dit, QuantConfig(quantize_embedders=embedders, quantize_final=final))
    assert sorted(quant_layers(dit)) == sorted(expected)
    assert len(report.kept) == 20 - len(expected)
    assert isinstance(dit.pos_embed.proj, nn.Conv2d)


def test_exclude_patterns(dit):
    config = QuantConfig(exclude=["*.norm1.linear", "transformer_blocks.1.*"])
    report = quantize_(dit, config)
    expected = sorted(f"transformer_blocks.0.{n}" for n in BLOCK if n != "norm1.linear")
    assert sorted(quant_layers(dit)) == expected
    assert type(dit.get_submodule("transformer_blocks.0.norm1.linear")) is nn.Linear
    assert type(dit.get_submodule("transformer_blocks.1.attn1.to_q")) is nn.Linear
    assert "quantized 6 Linear layers" in str(report)


def test_no_match_refused(dit):
    before = state(dit)
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        quantize_(dit, QuantConfig(include=["blocks.*.mlp.fc1"]))
    assert_untouched(dit, before)


def test_converting_twice_refused(dit):
    quantize_(dit)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(dit)


# ---- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rotation", ["kronecker", "block", "none"])
def test_quantizers_off_equals_fp_model(dit, rotation):
    dit = dit.double().eval()
    fp = copy.deepcopy(dit)
    config = QuantConfig(act_bits=16, weight="none", rotation=rotation, quantize_embedders=True, quantize_final=True)
    quantize_(dit, config)
    assert len(quant_layers(dit)) == 20
    x, t, y = inputs(dtype=torch.float64)
    with torch.no_grad():
        out, ref = dit(x, timestep=t, class_labels=y).sample, fp(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_w158a2_forward_backward_reaches_weights_and_steps(dit):
    fp = copy.deepcopy(dit).eval()
    quantize_(dit)
    x, t, y = inputs()
    dit.eval()
    with torch.no_grad():
        out, ref = dit(x, timestep=t, class_labels=y).sample, fp(x, timestep=t, class_labels=y).sample
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)
    assert all(q.initialized for q in lsq_quantizers(dit).values())
    for layer in quant_layers(dit).values():
        for row in layer.quantized_weight()[:4]:
            assert len(row.unique()) == 3

    dit.train()
    out = dit(x, timestep=t, class_labels=y).sample
    (out - ref).pow(2).mean().backward()
    for name, layer in quant_layers(dit).items():
        for what, grad in [("weight", layer.weight.grad), ("step", layer.act.quantizer.step.grad)]:
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (name, what)
    assert dit.pos_embed.proj.weight.grad is not None  # FP layers keep training too


def test_timestep_groups_in_the_model(dit):
    quantize_(dit, QuantConfig(timestep_groups=4, act_mode="static"))
    steps = [q.step for q in lsq_quantizers(dit).values()]
    assert all(s.shape == (4,) for s in steps)
    x, t, y = inputs()  # t = [10, 900]: groups 0 and 3
    out = dit(x, timestep=t, class_labels=y).sample
    assert current_timestep_groups() is None  # restored after the call
    out.pow(2).mean().backward()
    for s in steps:
        assert s.grad[0] != 0 and s.grad[3] != 0 and s.grad[1] == 0 and s.grad[2] == 0
    # positional call and a single timestep broadcast over the batch work too
    with torch.no_grad():
        dit.eval()
        a = dit(x, torch.tensor([10]), y).sample
        b = dit(x, timestep=torch.tensor([10, 10]), class_labels=y).sample
    torch.testing.assert_close(a, b)


# ---- plans ---------------------------------------------------------------------------------------

PLAN = {
    "transformer_blocks.0.attn1.to_q": 4,
    "transformer_blocks.1.ff.net.2": 8,
    "transformer_blocks.1.norm1.linear": 1,
}


def _expected_bits(plan, default=2):
    return {n: plan.get(n, default) for n in BLOCK_LAYERS}


@pytest.mark.parametrize("form", ["dict", "bitplan", "yaml"])
def test_plan_sets_per_layer_bits(dit, tmp_path, form):
    if form == "dict":
        plan = dict(PLAN)
    elif form == "bitplan":
        plan = BitPlan(bits=dict(PLAN), budget=2.0)
    else:
        plan = tmp_path / "plan.yaml"
        BitPlan(bits=dict(PLAN), budget=2.0).save(plan)
        plan = str(plan)
    report = quantize_(dit, QuantConfig(act_bits=3), plan)
    assert act_bits(dit) == _expected_bits(PLAN, default=3)
    assert report.converted["transformer_blocks.0.attn1.to_q"][2] == 4
    assert "A1: 1, A3: 11, A4: 1, A8: 1" in str(report)


@pytest.mark.parametrize(
    "plan,match",
    [
        (
            {"transformer_blocks.0.attn1.to_qq": 4},
            r"'transformer_blocks.0.attn1.to_qq' \(did you mean 'transformer_blocks.0.attn1.to_q'",
        ),
        ({"proj_out_1": 4}, "'proj_out_1'"),  # excluded by default: not quantized, so not plannable
        (
            {"transformer_blocks.0.attn1.to_q": 4, "transformer_blocks.0.attn1.to_v": 0},
            "'transformer_blocks.0.attn1.to_v'.*0",
        ),
        ({"transformer_blocks.0.attn1.to_v": 9}, "'transformer_blocks.0.attn1.to_v'.*9"),
        ({"transformer_blocks.0.attn1.to_v": "2"}, "'transformer_blocks.0.attn1.to_v'.*'2'"),
        ({"transformer_blocks.0.attn1.to_v": 2.5}, "'transformer_blocks.0.attn1.to_v'"),
        ({"transformer_blocks.0.attn1.to_v": True}, "'transformer_blocks.0.attn1.to_v'"),
        ({"transformer_blocks.0.attn1.to_v": 16}, "'transformer_blocks.0.attn1.to_v'"),
    ],
)
def test_bad_plan_refused_and_model_untouched(dit, plan, match):
    before = state(dit)
    with pytest.raises(ValueError, match=match):
        quantize_(dit, plan=plan)
    assert_untouched(dit, before)


def test_bad_plan_file_refused_and_model_untouched(dit, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("bits:\n  transformer_blocks.0.attn1.to_q: 12\n")
    before = state(dit)
    with pytest.raises(ValueError, match="plan.yaml.*transformer_blocks.0.attn1.to_q"):
        quantize_(dit, plan=path)
    assert_untouched(dit, before)


def test_unsupported_width_refused_with_layer_name_and_model_untouched():
    dit = make_dit(heads=4, head_dim=13, layers=1, sample_size=8)  # hidden 52: no Hadamard of that size
    before = state(dit)
    with pytest.raises(ValueError, match=r"cannot quantize layer 'transformer_blocks\.0\.[\w.]+'.*size 52"):
        quantize_(dit)
    assert_untouched(dit, before)
    # without a rotation any width works
    assert len(quantize_(dit, QuantConfig(rotation="none")).converted) == 7


def test_failure_on_a_later_layer_leaves_earlier_ones_unconverted(dit):
    """Layers are all built before the first swap: a late failure must not leave a half-converted model."""
    config = QuantConfig(
        rotation="block", block_size=256,  # fits 768 (ff.net.2) but not 192
        include=["transformer_blocks.0.ff.net.2", "transformer_blocks.1.attn1.to_q"],
    )
    before = state(dit)
    with pytest.raises(ValueError, match="'transformer_blocks.1.attn1.to_q'"):
        quantize_(dit, config)
    assert_untouched(dit, before)


# ---- changing widths after conversion ------------------------------------------------------------


def test_set_act_bits_round_trip(dit, tmp_path):
    quantize_(dit)
    x, t, y = inputs(batch=1)
    dit(x, timestep=t, class_labels=y)  # initialise every step
    plan = act_bits(dit)
    assert plan == _expected_bits({})
    set_act_bits(dit, PLAN)
    assert act_bits(dit) == _expected_bits(PLAN)
    quantizers = lsq_quantizers(dit)
    for name, q in quantizers.items():
        layer = name.removesuffix(".act.quantizer")
        assert q.initialized == (layer not in PLAN), name  # changed widths re-initialise
    # a plan file works, and setting the old plan back restores it exactly
    path = tmp_path / "back.yaml"
    BitPlan(bits=plan).save(path)
    set_act_bits(dit, path, reinit=False)
    assert act_bits(dit) == plan


def test_set_act_bits_refuses_bad_plans_without_partial_changes(dit):
    quantize_(dit)
    with pytest.raises(ValueError, match="'transformer_blocks.0.attn1.to_x'"):
        set_act_bits(dit, {"transformer_blocks.0.attn1.to_q": 4, "transformer_blocks.0.attn1.to_x": 4})
    with pytest.raises(ValueError, match="'transformer_blocks.0.attn1.to_k'"):
        set_act_bits(dit, {"transformer_blocks.0.attn1.to_q": 4, "transformer_blocks.0.attn1.to_k": 0})
    assert act_bits(dit) == _expected_bits({})
