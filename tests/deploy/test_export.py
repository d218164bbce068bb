import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from robuq.deploy import PackedTernaryLinear, export, load_exported, pack_model, weight_bytes  # noqa: E402
from robuq.quant import QuantConfig, quantize_  # noqa: E402
from robuq.quant.linear import QuantLinear  # noqa: E402
from robuq.quant.lsq import qrange  # noqa: E402


def tiny_student(**cfg):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=3, attention_head_dim=64, in_channels=1, out_channels=1, num_layers=2,
        sample_size=32, patch_size=2, num_embeds_ada_norm=10,
    )
    quantize_(model, QuantConfig(**cfg))
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 32, 32, generator=g), torch.tensor([10, 700]), torch.tensor([1, 3])


def init_and_eval(model):
    x, t, y = batch()
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
    return model.eval()


def student_codes(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    q = layer.act.quantizer
    r = layer.act.rotate(x)
    qn, qp = qrange(q.bits, q.signed)
    step = q.step.abs().clamp_min(1e-8).reshape([1] * r.dim())
    if q.mode == "dynamic":
        step = step * r.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    return (r / step).clamp(-qn, qp).round()


def layer_inputs(model, x, t, y):
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("cfg", [dict(act_bits=4), dict(act_bits=2), dict(act_bits=3, act_mode="static"),
                                 dict(act_bits=2, rotation="block", block_size=64, act_stat="absmax")])
def test_export_load_round_trip(tmp_path, cfg):
    student = init_and_eval(tiny_student(**cfg))
    x, t, y = batch()
    with torch.no_grad():
        ref = student(x, timestep=t, class_labels=y).sample
    export(student, tmp_path)
    meta = json.loads((tmp_path / "robuq_export.json").read_text())
    assert meta["format"] == "robuq-packed-v1" and len(meta["layers"]) == 14
    loaded = load_exported(tmp_path)
    assert sum(isinstance(m, PackedTernaryLinear) for m in loaded.modules()) == 14
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())

    # layer by layer, on the student's own inputs: the same integers, outputs to float rounding
    for name, xin in layer_inputs(student, x, t, y).items():
        ql, pl = student.get_submodule(name), loaded.get_submodule(name)
        with torch.no_grad():
            torch.testing.assert_close(pl(xin), ql(xin), rtol=1e-5, atol=1e-5)
            r = pl.rotate(xin)
            assert torch.equal(r, ql.act.rotate(xin))
        if cfg.get("act_mode", "dynamic") == "dynamic" and cfg.get("act_stat", "rms") == "rms":
            codes = student_codes(ql, xin)
            acc = codes @ pl.ternary(torch.float32).t()
            ref_acc = codes @ ql.weight_quant(ql.weight).div(pl.w_scale[:, None]).round().t()
            assert torch.equal(acc, ref_acc)

    # end to end: per-layer float rounding differences (1e-7) can flip a code deeper in the
    # network now and then, so the whole model agrees to a looser tolerance
    with torch.no_grad():
        out = loaded(x, timestep=t, class_labels=y).sample
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3


def test_pack_model_in_memory_and_bytes():
    student = init_and_eval(tiny_student(act_bits=4))
    x, t, y = batch()
    with torch.no_grad():
        ref = student(x, timestep=t, class_labels=y).sample
    import copy

    packed = pack_model(copy.deepcopy(student))
    with torch.no_grad():
        out = packed(x, timestep=t, class_labels=y).sample
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3
    b = weight_bytes(packed)
    dense = sum(m.weight.numel() * 2 for m in student.modules() if isinstance(m, QuantLinear))
    assert b["packed_layers"] < dense / 3  # 2 bits/weight + fp32 per-channel scales and biases


def test_dtype_cast_keeps_fp32_scales(tmp_path):
    student = init_and_eval(tiny_student(act_bits=4))
    export(student, tmp_path, dtype=torch.bfloat16)
    loaded = load_exported(tmp_path, dtype=torch.bfloat16)
    layer = loaded.transformer_blocks[0].attn1.to_q
    assert layer.w_scale.dtype == torch.float32 and layer.alpha.dtype == torch.float32
    assert loaded.pos_embed.proj.weight.dtype == torch.bfloat16
    loaded.to(torch.float16)
    assert layer.w_scale.dtype == torch.float32
    x, t, y = batch()
    with torch.no_grad():
        out = loaded.to(torch.float32)(x, timestep=t, class_labels=y).sample
    assert torch.isfinite(out).all()


def test_exact_rotation_switch(tmp_path):
    """``exact_rotation=False`` reaches every packed layer (the CUDA kernels' one-rounding rotation);
    the pipeline passes it on; a non-bool is refused."""
    from robuq.deploy import RobuQDiTPipeline

    export(init_and_eval(tiny_student(act_bits=4)), tmp_path)
    layers = lambda m: [x for x in m.modules() if isinstance(x, PackedTernaryLinear)]  # noqa: E731
    assert all(x.split for x in layers(load_exported(tmp_path)))
    assert not any(x.split for x in layers(load_exported(tmp_path, exact_rotation=False)))
    pipe = RobuQDiTPipeline.from_exported(tmp_path, exact_rotation=False)
    assert not any(x.split for x in layers(pipe.transformer))
    with pytest.raises(TypeError, match="exact_rotation must be True, False or None"):
        load_exported(tmp_path, exact_rotation="fast")


def test_export_records_the_trained_rotation(tmp_path):
    """A student whose fused kernels trained with the one-rounding rotation exports it: the loaded
    model computes the same integers by default, an explicit argument overrides the record, and a
    damaged record is refused."""
    import json

    pytest.importorskip("triton")
    from robuq.deploy.export import CONFIG_NAME
    from robuq.kernels.qat import use_fused_kernels

    student = init_and_eval(tiny_student(act_bits=4))
    use_fused_kernels(student, exact_rotation=False)
    export(student, tmp_path / "fast")
    export(student, tmp_path / "exact", exact_rotation=True)
    layers = lambda m: [x for x in m.modules() if isinstance(x, PackedTernaryLinear)]  # noqa: E731
    assert json.loads((tmp_path / "fast" / CONFIG_NAME).read_text())["exact_rotation"] is False
    assert not any(x.split for x in layers(load_exported(tmp_path / "fast")))
    assert all(x.split for x in layers(load_exported(tmp_path / "fast", exact_rotation=True)))
    assert all(x.split for x in layers(load_exported(tmp_path / "exact")))
    use_fused_kernels(student, False)  # back on the reference path: the exact rotation again
    export(student, tmp_path / "ref")
    assert all(x.split for x in layers(load_exported(tmp_path / "ref")))
    cfg = tmp_path / "fast" / CONFIG_NAME
    cfg.write_text(cfg.read_text().replace('"exact_rotation": false', '"exact_rotation": "no"'))
    with pytest.raises(ValueError, match="exact_rotation must be true or false.*export it again"):
        load_exported(tmp_path / "fast")


def test_timestep_groups_round_trip(tmp_path):
    student = init_and_eval(tiny_student(act_bits=4, timestep_groups=4))
    x, t, y = batch()
    with torch.no_grad():
        ref = student(x, timestep=t, class_labels=y).sample
    export(student, tmp_path)
    loaded = load_exported(tmp_path)
    with torch.no_grad():
        out = loaded(x, timestep=t, class_labels=y).sample
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3


def test_export_refuses_uninitialised(tmp_path):
    student = tiny_student(act_bits=4)
    with pytest.raises(ValueError, match="forward pass"):
        export(student, tmp_path)
    with pytest.raises(FileNotFoundError, match="robuq export"):
        load_exported(tmp_path / "nothing")


def test_evaluate_loads_an_exported_directory(tmp_path):
    from robuq.evaluation.evaluate import load_model

    student = init_and_eval(tiny_student(act_bits=4))
    export(student, tmp_path)
    model, info = load_model(str(tmp_path))
    assert info["exported"] and any(isinstance(m, PackedTernaryLinear) for m in model.modules())
    x, t, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample,
                                   student(x, timestep=t, class_labels=y).sample, rtol=1e-3, atol=1e-3)


def test_identical_embedders_are_stored_once_and_tied(tmp_path):
    student = tiny_student(act_bits=4)
    blocks = student.transformer_blocks
    blocks[1].norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())  # as in converted DiT-XL/2 weights
    init_and_eval(student)
    export(student, tmp_path / "tied")
    aliases = json.loads((tmp_path / "tied" / "robuq_export.json").read_text())["aliases"]
    assert aliases and all(k.startswith("transformer_blocks.1.norm1.emb.") for k in aliases)
    assert all(v == k.replace("blocks.1.", "blocks.0.") for k, v in aliases.items())
    model = load_exported(tmp_path / "tied", dtype=torch.bfloat16)
    emb0, emb1 = (model.transformer_blocks[i].norm1.emb.class_embedder.embedding_table.weight for i in (0, 1))
    assert emb0 is emb1 and emb0.dtype == torch.bfloat16
    x, t, y = batch()
    model = load_exported(tmp_path / "tied")
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample,
                                   student(x, timestep=t, class_labels=y).sample, rtol=1e-3, atol=1e-3)
    untied = weight_bytes(pack_model(student))["total"]
    assert weight_bytes(model)["total"] < untied


def test_damaged_aliases_are_refused(tmp_path):
    student = tiny_student(act_bits=4)
    blocks = student.transformer_blocks
    blocks[1].norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    export(init_and_eval(student), tmp_path)
    cfg = json.loads((tmp_path / "robuq_export.json").read_text())
    name = next(iter(cfg["aliases"]))
    cfg["aliases"][name] = "transformer_blocks.7.norm1.emb.nothing"
    (tmp_path / "robuq_export.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="aliases .* export it again"):
        load_exported(tmp_path)
