"""Resuming or training with parts that do not belong together is refused with the reason:
another model config, quant config, bit plan or task than the checkpoint's; data (latents) of
another VAE than the run expects or the model takes."""

import json
import os
import shutil

import pytest
import torch
from diffusers import DiTTransformer2DModel
from faultkit import TINY_DIT, fit, write_config
from safetensors.torch import save_file

from robuq.checkpoint import safe_load
from robuq.data.latents import LatentDataModule, LatentShardDataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory, qat_config):
    """A 2-step QAT run; tests copy its directory and resume it with something changed."""
    root = tmp_path_factory.mktemp("trained") / "run"
    fit(qat_config, root, "--trainer.max_steps", "2")
    return root


@pytest.fixture
def run(tmp_path, trained):
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    return root


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher2") / "dit"
    DiTTransformer2DModel(**{**TINY_DIT, "num_layers": 2}).save_pretrained(path)
    return str(path)


def plan_file(tmp_path, bits):
    path = tmp_path / "plan.yaml"
    path.write_text("bits:\n" + "".join(f"  {k}: {v}\n" for k, v in bits.items()))
    return str(path)


CHANGES = {
    "model": (lambda tmp, teacher2: ["--model.teacher", teacher2], "the checkpoint's model does not match the model config"),
    "quant": (lambda tmp, teacher2: ["--model.quant.act_bits", "3"], "trained with quant config"),
    "rotation": (lambda tmp, teacher2: ["--model.quant.rotation", "none"], "trained with quant config"),
    "plan": (lambda tmp, teacher2: ["--model.plan", plan_file(tmp, {"transformer_blocks.0.ff.net.2": 4})],
             r"another bit plan \(1 layer\(s\) differ, checkpoint -> this run: transformer_blocks.0.ff.net.2: 2 -> 4\)"),
}


@pytest.mark.parametrize("ckpt", ["last", "explicit"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_with_other_settings_is_refused(tmp_path, run, qat_config, other_teacher, change, ckpt):
    args, reason = CHANGES[change]
    path = "last" if ckpt == "last" else str(run / "checkpoints" / "last.ckpt")
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    with pytest.raises(ValueError, match=reason):
        fit(qat_config, run, *args(tmp_path, other_teacher), "--ckpt_path", path)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before  # untouched
    assert not (run / ".lock").exists()


def test_qat_checkpoint_resumed_as_pretraining_is_refused(tmp_path, run, qat_config):
    cfg = write_config(tmp_path / "pre.yaml", None, task="pretrain")
    with pytest.raises(ValueError, match="checkpoint is a 'qat' run, this run is 'pretrain'"):
        fit(cfg, run, "--ckpt_path", "last")


def test_plan_for_another_model_is_refused(tmp_path, qat_config):
    """(Also covered through a subprocess in tests/training; here with a near-miss name.)"""
    plan = plan_file(tmp_path, {"transformer_blocks.0.ff.net.3": 2})
    with pytest.raises(ValueError, match=r"did you mean 'transformer_blocks.0.ff.net.2'"):
        fit(qat_config, tmp_path / "r", "--model.plan", plan)
    assert not (tmp_path / "r" / "checkpoints").exists()


# ---- latents of another VAE ------------------------------------------------------------------------

def make_latents(root, vae="vae-a", shape=(1, 32, 32), n=16):
    os.makedirs(root, exist_ok=True)
    meta = {"settings": json.dumps({"vae": vae})}
    save_file({"latents": torch.randn(n, *shape).half(), "labels": torch.arange(n) % 10},
              os.path.join(root, "shard-00000.safetensors"), metadata=meta)
    index = dict(complete=True, vae=vae, scaling_factor=0.18215, latent_shape=list(shape), image_size=256,
                 flip=False, class_names=[str(i) for i in range(10)],
                 shards=[{"file": "shard-00000.safetensors", "count": n, "failed": []}])
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    return str(root)


def latent_data(root, **kw):
    return {"class_path": "robuq.data.latents.LatentDataModule",
            "init_args": {"root": root, "batch_size": 4, "num_workers": 0, "hflip": False, "val_fraction": 0.25, **kw}}


def test_latents_of_the_right_shape_train(tmp_path, tiny_teacher):
    cfg = write_config(tmp_path / "c.yaml", tiny_teacher, max_steps=2, data=latent_data(make_latents(tmp_path / "lat")))
    fit(cfg, tmp_path / "run")
    assert safe_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_latents_the_model_cannot_take_are_refused(tmp_path, tiny_teacher):
    """A VAE with another channel count or downsampling: diffusers' DiT would silently re-derive its
    position embedding for 16x16 and train at the wrong resolution; refused with the reason."""
    for shape in [(1, 16, 16), (4, 32, 32)]:
        root = make_latents(tmp_path / f"lat{shape[0]}_{shape[1]}", shape=shape)
        cfg = write_config(tmp_path / "c.yaml", tiny_teacher, max_steps=2, data=latent_data(root))
        with pytest.raises(ValueError, match=rf"samples have shape \[{shape[0]}, {shape[1]}, {shape[2]}\] but the model "
                                             r"takes \[1, 32, 32\].*latents of another VAE"):
            fit(cfg, tmp_path / f"run{shape}")
        assert not list((tmp_path / f"run{shape}").glob("checkpoints/*.ckpt"))


def test_latents_of_another_vae_are_refused(tmp_path, tiny_teacher):
    root = make_latents(tmp_path / "lat", vae="stabilityai/sd-vae-ft-mse")
    cfg = write_config(tmp_path / "c.yaml", tiny_teacher, max_steps=2,
                       data=latent_data(root, expected_vae="stabilityai/sd-vae-ft-ema"))
    with pytest.raises(ValueError, match=r"latents of another VAE: 'stabilityai/sd-vae-ft-mse', not the expected "
                                         r"'stabilityai/sd-vae-ft-ema'"):
        fit(cfg, tmp_path / "run")


def test_a_foreign_shard_in_a_prepared_directory_is_refused(tmp_path):
    a, b = make_latents(tmp_path / "a", vae="vae-a"), make_latents(tmp_path / "b", vae="vae-b")
    shutil.copy(os.path.join(b, "shard-00000.safetensors"), os.path.join(a, "shard-00000.safetensors"))
    foreign = (rf"shard {os.path.join(a, 'shard-00000.safetensors')} holds latents of another VAE, 'vae-b', "
               r"than its index.json, 'vae-a'")
    with pytest.raises(ValueError, match=foreign):
        LatentShardDataset(a, expected_vae="vae-a")
    with pytest.raises(ValueError, match=foreign):
        LatentDataModule(a, hflip=False).setup("fit")


def test_labels_outside_the_model_classes_are_refused(tmp_path, tiny_teacher):
    root = make_latents(tmp_path / "lat")
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    save_file({"latents": torch.randn(16, 1, 32, 32).half(), "labels": torch.arange(16) + 5},
              str(tmp_path / "lat" / "shard-00000.safetensors"))
    index["class_names"] = [str(i) for i in range(21)]
    (tmp_path / "lat" / "index.json").write_text(json.dumps(index))
    cfg = write_config(tmp_path / "c.yaml", tiny_teacher, max_steps=2, data=latent_data(root))
    with pytest.raises(ValueError, match=r"class labels in \[\d+, \d+\] but the model has 10 classes"):
        fit(cfg, tmp_path / "run")
