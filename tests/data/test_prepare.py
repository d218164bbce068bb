"""prepare: tiny random VAE, ~20 generated PNGs in 3 class folders (+1 corrupt file)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from robuq.data.latents import LatentShardDataset
from robuq.data.prepare import center_crop_arr, list_folder, prepare

CLASSES = {"cat": 7, "dog": 6, "fox": 7}
RUN = dict(image_size=32, shard_size=8, batch_size=3, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        sample_size=32)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, count in CLASSES.items():
        os.makedirs(root / c)
        for i in range(count):
            h, w = rng.integers(32, 100, size=2)  # some >= 64: exercises the BOX halving
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return str(root)


def shard_tensors(out):
    index = json.load(open(os.path.join(out, "index.json")))
    return index, [load_file(os.path.join(out, s["file"])) for s in index["shards"]]


def encode(vae_dir, arrays):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float() / 127.5 - 1
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


def test_shapes_labels_flip_and_bad_image(tmp_path, vae_dir, image_dir, capsys):
    out = str(tmp_path / "out")
    summary = prepare(image_dir, out, vae=vae_dir, posterior="mean", **RUN)
    bad = os.path.join(image_dir, "dog", "broken.png")
    assert summary["images_written"] == 20 and summary["images_failed"] == 1
    assert summary["shards_written"] == 3 and summary["ignored_files"] == 1
    assert bad in capsys.readouterr().err
    index, shards = shard_tensors(out)
    assert index["complete"] and index["failed"] == [bad] and index["num_samples"] == 20
    assert index["latent_shape"] == [4, 16, 16] and index["class_names"] == list(CLASSES)
    assert [s["count"] for s in index["shards"]] == [8, 7, 5]  # 21 files: 8 + (8 - broken) + 5

    data = LatentShardDataset(out, expected_vae=vae_dir)
    paths, labels, _, _ = list_folder(image_dir)
    good = [(p, y) for p, y in zip(paths, labels) if p != bad]
    assert data.labels.tolist() == [y for _, y in good]
    x, y = data[0]
    assert x.shape == (4, 16, 16) and x.dtype == torch.float32 and y == 0

    arrays = [center_crop_arr(Image.open(p).convert("RGB"), 32) for p, _ in good]
    assert arrays[0].shape == (32, 32, 3)
    latents = torch.cat([s["latents"] for s in shards]).float()
    flips = torch.cat([s["latents_flip"] for s in shards]).float()
    torch.testing.assert_close(latents, encode(vae_dir, arrays), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(flips, encode(vae_dir, [a[:, ::-1].copy() for a in arrays]), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(data[(3, True)][0], flips[3])


def test_resume_after_interruption(tmp_path, vae_dir, image_dir, capsys):
    straight, interrupted = str(tmp_path / "a"), str(tmp_path / "b")
    prepare(image_dir, straight, vae=vae_dir, **RUN)  # posterior 'sample': seeded per shard
    prepare(image_dir, interrupted, vae=vae_dir, **RUN)
    last = os.path.join(interrupted, "shard-00002.safetensors")
    data = open(last, "rb").read()
    open(last, "wb").write(data[:len(data) // 2])
    with pytest.raises(ValueError, match="shard-00002.safetensors is truncated"):
        LatentShardDataset(interrupted)
    os.remove(os.path.join(interrupted, "shard-00001.safetensors"))
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors is missing"):
        LatentShardDataset(interrupted)
    open(os.path.join(interrupted, "shard-00000.safetensors.tmp"), "wb").write(b"half")
    capsys.readouterr()
    summary = prepare(image_dir, interrupted, vae=vae_dir, **RUN)
    assert "shard-00002.safetensors is truncated" in capsys.readouterr().err
    assert summary["shards_reused"] == 1 and summary["shards_written"] == 2
    assert summary["samples_total"] == 20 and summary["failed_total"] == 1
    assert not os.path.exists(os.path.join(interrupted, "shard-00000.safetensors.tmp"))
    (index_a, shards_a), (index_b, shards_b) = shard_tensors(straight), shard_tensors(interrupted)
    assert index_a == index_b
    for a, b in zip(shards_a, shards_b):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="other settings"):
        prepare(image_dir, straight, vae=vae_dir, **{**RUN, "seed": 1})


def test_a_shard_of_another_vae_with_the_same_config_is_refused(tmp_path, vae_dir, image_dir):
    """Same config and latent shape, other weights (like sd-vae-ft-ema vs -mse): told apart by the
    weights' sha256 that prepare records in index.json and in each shard's settings."""
    other_vae = tmp_path / "other_vae"
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.01)
    vae.save_pretrained(other_vae)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prepare(image_dir, a, vae=vae_dir, **RUN)
    prepare(image_dir, b, vae=str(other_vae), **RUN)
    digest_a, digest_b = (json.load(open(os.path.join(d, "index.json")))["vae_sha256"] for d in (a, b))
    assert len(digest_a) == 16 and digest_a != digest_b
    shutil.copy(os.path.join(b, "shard-00001.safetensors"), os.path.join(a, "shard-00001.safetensors"))
    both = (rf"shard-00001.safetensors holds latents of another VAE, '{other_vae}' \(vae_sha256 {digest_b}\), "
            rf"than its index.json, '{vae_dir}' \(vae_sha256 {digest_a}\)")
    with pytest.raises(ValueError, match=both):
        LatentShardDataset(a)


def test_hf_imagefolder(tmp_path, vae_dir, image_dir, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    out = str(tmp_path / "hf")
    summary = prepare(image_dir, out, reader="hf", vae=vae_dir, posterior="mean", flip=False, **RUN)
    index, shards = shard_tensors(out)
    assert summary["images_written"] == 20 and index["failed"] == [os.path.join(image_dir, "dog", "broken.png")]
    assert index["class_names"] == list(CLASSES) and "latents_flip" not in shards[0]
    labels = torch.cat([s["labels"] for s in shards])
    assert torch.bincount(labels).tolist() == [7, 6, 7]


def test_cli_config_and_missing_vae(tmp_path, vae_dir, image_dir):
    from jsonargparse import CLI

    config = tmp_path / "prepare.yaml"
    config.write_text(f"data: {image_dir}\noutput: {tmp_path / 'cli'}\nvae: {vae_dir}\nflip: false\n"
                      "image_size: 64\nshard_size: 100\nnum_workers: 0\ndevice: cpu\n")
    summary = CLI(prepare, as_positional=False, args=["--config", str(config), "--image_size", "32"])
    assert summary["images_written"] == 20 and summary["shards_written"] == 1
    with pytest.raises(FileNotFoundError, match="hf download"):
        prepare(image_dir, str(tmp_path / "x"), vae="/nonexistent/vae", **RUN)


@pytest.mark.parametrize("name", ["prepare_imagenet.yaml", "prepare_imagenet_hf.yaml"])
def test_shipped_configs_parse(name, capsys):
    from jsonargparse import CLI

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", name)
    with pytest.raises(SystemExit) as exit:
        CLI(prepare, as_positional=False, args=["--config", config, "--print_config"])
    assert exit.value.code == 0 and "vae: stabilityai/sd-vae-ft-ema" in capsys.readouterr().out
