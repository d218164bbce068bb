import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from robuq.evaluation.evaluate import evaluate, main, make_decoder

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "evaluate_fmnist.yaml"


def tiny_run(out_dir, cache_dir, **overrides) -> dict:
    kwargs = dict(
        num_samples=20, steps=3, batch_size=8, device="cpu", reference="fashion-mnist/test", reference_size=200,
        cache_dir=str(cache_dir), grid_per_class=2, out_dir=str(out_dir), progress=False,
    )
    return kwargs | overrides


def test_evaluate_diffusers_dir(tiny_dit_dir, tmp_path):
    report = evaluate(str(tiny_dit_dir), **tiny_run(tmp_path / "a", tmp_path / "cache"))
    assert set(report["metrics"]) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert all(math.isfinite(v) for v in report["metrics"].values())
    assert report["num_samples"] == 20 and report["sampler"]["scheduler"] == "ddpm"
    assert report["reference"]["num_images"] == 200
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == report
    grid = Image.open(tmp_path / "a" / "samples.png")
    assert grid.height == 2 + 10 * (64 + 2)  # 10 class rows of 32px tiles shown at 64px
    again = evaluate(str(tiny_dit_dir), **tiny_run(tmp_path / "b", tmp_path / "cache"))
    assert again["metrics"] == report["metrics"]  # same seed, same samples
    other = evaluate(str(tiny_dit_dir), **tiny_run(tmp_path / "c", tmp_path / "cache", seed=1, per_class=1))
    assert other["num_samples"] == 10 and other["metrics"] != report["metrics"]


def test_ckpt_goes_through_load_for_eval(tiny_dit_dir, tmp_path, monkeypatch, make_tiny_dit):
    calls = []

    def load_for_eval(path, use_ema=True):
        calls.append((path, use_ema))
        return make_tiny_dit(), {"bit_plan": {"mean_bits": 2.0}}

    monkeypatch.setitem(sys.modules, "robuq.module", types.SimpleNamespace(load_for_eval=load_for_eval))
    report = evaluate("run/last.ckpt", use_ema=False, **tiny_run(tmp_path / "out", tmp_path / "cache", num_samples=10))
    assert calls == [("run/last.ckpt", False)]
    assert report["checkpoint_info"] == {"bit_plan": {"mean_bits": 2.0}}


def test_cli_with_config_and_overrides(tiny_dit_dir, tmp_path, capsys):
    args = [f"--{k}={v}" for k, v in tiny_run(tmp_path / "cli", tmp_path / "cache").items()]
    with pytest.raises(SystemExit):
        main(["--config", str(CONFIG), "--checkpoint", str(tiny_dit_dir), "--print_config", *args])
    printed = capsys.readouterr().out
    assert "scheduler: ddpm" in printed and "steps: 3" in printed
    report = main(["--config", str(CONFIG), "--checkpoint", str(tiny_dit_dir), *args])
    assert report["sampler"]["steps"] == 3 and (tmp_path / "cli" / "report.json").is_file()


def test_vae_decoder(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    vae.save_pretrained(tmp_path)
    latents = torch.randn(2, 4, 8, 8)
    images = make_decoder(str(tmp_path), torch.device("cpu"), torch.float32)(latents)
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, expected)
    assert make_decoder(None, torch.device("cpu"), torch.float32)(3 * latents).abs().max() == 1
