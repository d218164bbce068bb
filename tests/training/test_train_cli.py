"""train.py end to end on CPU: pretrain a tiny teacher, QAT from it, exact resume, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robuq.module import load_for_eval

ROOT = Path(__file__).resolve().parents[2]


def fit(*args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_pretrain_then_qat_then_evaluate_model(tmp_path, tiny_teacher, make_config):
    cfg = make_config(tmp_path / "pre.yaml", None, max_steps=4, task="pretrain")
    fit("--config", cfg, "--trainer.default_root_dir", str(tmp_path / "pre"))
    teacher_ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    assert teacher_ckpt.is_file() and (tmp_path / "pre" / "metrics.csv").is_file()

    cfg = make_config(tmp_path / "qat.yaml", str(teacher_ckpt), max_steps=4,
                       extra_model="quant: {act_bits: 2, timestep_groups: 4, act_mode: static}")
    fit("--config", cfg, "--trainer.default_root_dir", str(tmp_path / "qat"))
    model, info = load_for_eval(str(tmp_path / "qat" / "checkpoints" / "last.ckpt"))
    assert info["task"] == "qat" and info["weights"] == "ema" and info["global_step"] == 4
    assert set(info["plan"].values()) == {2}
    x, t, y = torch.randn(3, 1, 32, 32), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 10])
    assert torch.isfinite(model(x, timestep=t, class_labels=y).sample).all()

    from robuq.deploy.export import CONFIG_NAME, main as export_main

    out = export_main(["--checkpoint", str(tmp_path / "qat" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "exp"),
                       "--dtype", "bfloat16"])
    assert json.loads((out / CONFIG_NAME).read_text())["exact_rotation"] is True  # trained on the reference path
    from robuq.deploy import RobuQDiTPipeline

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # --dtype reached the FP layers only
        assert f.get_tensor("pos_embed.proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("transformer_blocks.0.ff.net.2.w_scale").dtype == torch.float32
    pipe = RobuQDiTPipeline.from_exported(out, scheduler="ddim")
    images = pipe([0, 9], guidance_scale=1.5, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()


def test_resume_is_exact(tmp_path, tiny_teacher, make_config):
    """8 steps straight == 4 steps, stop, resume from last.ckpt, 4 more (weights, EMA, steps, optimiser)."""
    cfg = make_config(tmp_path / "c.yaml", tiny_teacher, max_steps=8)
    fit("--config", cfg, "--trainer.default_root_dir", str(tmp_path / "a"))
    fit("--config", cfg, "--trainer.default_root_dir", str(tmp_path / "b"), "--trainer.max_steps", "4")
    fit("--config", cfg, "--trainer.default_root_dir", str(tmp_path / "b"), "--ckpt_path", "last")
    a, b = state(tmp_path / "a/checkpoints/last.ckpt"), state(tmp_path / "b/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        if torch.is_tensor(v):
            torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
        else:
            assert v == b["state_dict"][k], k
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        torch.testing.assert_close(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.no_such_key", "1"], "no_such_key"),
        (["--model.quant.act_bits", "9"], "act_bits"),
        (["--data.init_args.root", "/nonexistent"], "dataset-fashion-mnist"),
        (["--model.model", "{num_layers: 3, num_attention_heads: 2}"], "does not match"),
        (["--model.teacher", "/nonexistent/teacher"], "cannot load a DiT"),
        (["--model.cuda_graph", "true"], "cuda_graph captures the step on a CUDA GPU, but this run is on cpu"),
        (["--model.graph_blocks", "true"], "graph_blocks replays CUDA graphs, but this run is on cpu"),
        (["--model.graph_blocks", "true", "--model.cuda_graph", "true"], "set one of cuda_graph and graph_blocks"),
        (["--model.graph_blocks", "true", "--model.compile_blocks", "true"], "compile_blocks would trace around"),
    ],
)
def test_bad_input_stops_before_training(tmp_path, tiny_teacher, make_config, override, message):
    cfg = make_config(tmp_path / "c.yaml", tiny_teacher)
    proc = fit("--config", cfg, "--trainer.default_root_dir", str(tmp_path / "r"), *override, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_plan_for_another_model_is_refused(tmp_path, tiny_teacher, make_config):
    plan = tmp_path / "plan.yaml"
    plan.write_text("bits:\n  transformer_blocks.27.attn1.to_q: 2\n")
    cfg = make_config(tmp_path / "c.yaml", tiny_teacher, extra_model=f"plan: {plan}")
    proc = fit("--config", cfg, "--trainer.default_root_dir", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0 and "transformer_blocks.27.attn1.to_q" in proc.stderr


def test_fused_kernels_switch(tmp_path):
    """fused_kernels installs the fused forward on every supported layer of the student and of its EMA
    copy; on CPU that forward takes the reference path, so outputs equal the unswitched module's."""
    pytest.importorskip("triton")
    from diffusers import DiTTransformer2DModel

    from robuq.module import DiTModule

    path = tmp_path / "dit192"  # hidden 192 = 12 * 16: a rotation layout the kernels serve
    DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=1, out_channels=1, num_layers=1,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10).save_pretrained(path)
    plain, fused = DiTModule(teacher=str(path)), DiTModule(teacher=str(path), fused_kernels=True)
    assert fused.fused_layers and all(fused.fused_layers.values())
    fused.student.load_state_dict(plain.student.state_dict())
    q, block = fused.ema.transformer_blocks[0].attn1.to_q, fused.ema.transformer_blocks[0]
    assert q.forward.__self__ is q and block.forward.__self__ is block  # the EMA copy's are bound to the copy
    apart = DiTModule(teacher=str(path), fused_kernels=True, fuse_norms=False)
    assert "forward" not in apart.student.transformer_blocks[0].__dict__
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(fused.student(x, timestep=t, class_labels=y).sample,
                                   plain.student(x, timestep=t, class_labels=y).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fused_kernels applies to task 'qat'"):
        DiTModule(task="pretrain", teacher=str(path), fused_kernels=True)
    gelu = DiTModule(teacher=str(path), fused_kernels=True, fuse_gelu=True)
    gelu.student.load_state_dict(plain.student.state_dict())
    ff = gelu.ema.transformer_blocks[0].ff
    assert ff.forward.__self__ is ff and "forward" not in fused.student.transformer_blocks[0].ff.__dict__
    with torch.no_grad():
        torch.testing.assert_close(gelu.student(x, timestep=t, class_labels=y).sample,
                                   plain.student(x, timestep=t, class_labels=y).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="set fused_kernels: true as well"):
        DiTModule(teacher=str(path), fuse_gelu=True)


def test_one_rounding_rotation_reaches_the_layers_the_checkpoint_and_the_export(tmp_path):
    """``exact_rotation: false`` switches the student's and the EMA's fused layers to the one-rounding
    rotation; the checkpoint records it and the exported model computes the same integers."""
    pytest.importorskip("triton")
    from diffusers import DiTTransformer2DModel

    from robuq.deploy.export import CONFIG_NAME, main as export_main
    from robuq.deploy.modules import PackedTernaryLinear
    from robuq.module import DiTModule
    from robuq.quant.linear import QuantLinear

    path = tmp_path / "dit192"
    DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=1, out_channels=1, num_layers=1,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10).save_pretrained(path)
    with pytest.raises(ValueError, match="exact_rotation: false chooses the fused kernels'.*set fused_kernels: true"):
        DiTModule(teacher=str(path), exact_rotation=False)
    module = DiTModule(teacher=str(path), fused_kernels=True, exact_rotation=False)
    for model in (module.student, module.ema):
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert layers and not any(m.exact_rotation for m in layers)
    module.student(torch.randn(2, 1, 8, 8), timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 2]))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["robuq"]["exact_rotation"] is False
    torch.save(ckpt, tmp_path / "fast.ckpt")
    assert load_for_eval(str(tmp_path / "fast.ckpt"))[1]["exact_rotation"] is False
    out = export_main(["--checkpoint", str(tmp_path / "fast.ckpt"), "--out", str(tmp_path / "exp"), "--raw"])
    assert json.loads((out / CONFIG_NAME).read_text())["exact_rotation"] is False
    from robuq.deploy.export import load_exported

    packed = [m for m in load_exported(out).modules() if isinstance(m, PackedTernaryLinear)]
    assert packed and not any(m.split for m in packed)


def test_compile_blocks(tmp_path, monkeypatch):
    """compile_blocks compiles the student's and the teacher's blocks in place (names and
    checkpoints unchanged; the EMA stays eager) and the compiled student computes what the eager
    one does (Dynamo traced, run with the eager backend: no C++ compiler needed here)."""
    from diffusers import DiTTransformer2DModel

    from robuq.module import DiTModule

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    path = tmp_path / "dit"
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10).save_pretrained(path)
    plain, comp = DiTModule(teacher=str(path)), DiTModule(teacher=str(path), compile_blocks=True)
    compiled = lambda m: [b._compiled_call_impl is not None for b in m.transformer_blocks]  # noqa: E731
    assert compiled(comp.student) == compiled(comp.teacher) == [True, True] and compiled(comp.ema) == [False, False]
    assert list(comp.state_dict()) == list(plain.state_dict())
    comp.student.load_state_dict(plain.student.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    torch._dynamo.reset()
    with torch.no_grad():
        # the first call initialises the LSQ steps from the batch, eagerly: nothing is compiled yet
        first = comp._student_forward(x, t, y)
        assert not comp._eager_until_quant_ready or torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
        torch.testing.assert_close(first, plain.student(x, timestep=t, class_labels=y).sample)
        torch.testing.assert_close(comp._student_forward(x, t, y), plain.student(x, timestep=t, class_labels=y).sample)
    assert not comp._eager_until_quant_ready and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_imagenet_config_is_dit_xl2():
    """The ImageNet config's model block and the benchmarks' DiT-XL/2 (robuq.models.DIT_XL_2_256) agree."""
    import yaml

    from robuq.models import DIT_XL_2_256

    config = yaml.safe_load((ROOT / "configs/imagenet_dit_xl2_w158a2.yaml").read_text())
    assert config["model"]["model"] == DIT_XL_2_256
