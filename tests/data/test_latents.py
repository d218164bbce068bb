"""LatentShardDataset / LatentDataModule over hand-made shards."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from robuq.data.latents import LatentDataModule, LatentShardDataset

COUNTS = (5, 3)


def make_latents(root, flip=True, vae="vae-a"):
    """Shards of [4, 2, 2] latents; sample i is filled with i, its flip with 100 + i."""
    os.makedirs(root, exist_ok=True)
    shards, first = [], 0
    for k, n in enumerate(COUNTS):
        ids = torch.arange(first, first + n, dtype=torch.float16)
        tensors = {"latents": ids.view(-1, 1, 1, 1).expand(n, 4, 2, 2).clone(),
                   "labels": torch.arange(first, first + n) % 3}
        tensors["latents"][:, :, :, 0] += 0.5  # makes a mirrored latent tell apart
        if flip:
            tensors["latents_flip"] = tensors["latents"] + 100
        save_file(tensors, os.path.join(root, f"shard-{k:05d}.safetensors"))
        shards.append({"file": f"shard-{k:05d}.safetensors", "count": n, "failed": []})
        first += n
    index = dict(complete=True, vae=vae, scaling_factor=0.18215, latent_shape=[4, 2, 2], image_size=16,
                 flip=flip, class_names=["a", "b", "c"], shards=shards)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    return str(root)


def test_reads_samples_and_flips(tmp_path):
    data = LatentShardDataset(make_latents(tmp_path))
    assert len(data) == 8 and data.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    for i in (0, 4, 5, 7):
        x, y = data[i]
        assert x.shape == (4, 2, 2) and x.dtype == torch.float32 and y == i % 3
        assert x[0, 0, 1] == i and data[(i, True)][0][0, 0, 1] == 100 + i
    data = pickle.loads(pickle.dumps(data))  # open handles are not pickled
    assert data[6][0][0, 0, 1] == 6


def test_flip_without_latents_flip(tmp_path):
    root = make_latents(tmp_path, flip=False)
    with pytest.raises(ValueError, match="no latents_flip"):
        LatentShardDataset(root)[(1, True)]
    x, _ = LatentShardDataset(root, flip_latents=True)[(1, True)]
    assert torch.equal(x, LatentShardDataset(root)[1][0].flip(-1))
    with pytest.raises(ValueError, match="no latents_flip"):
        LatentDataModule(root, hflip=True).setup("fit")


def test_refuses_another_vae(tmp_path):
    root = make_latents(tmp_path, vae="stabilityai/sd-vae-ft-mse")
    with pytest.raises(ValueError, match="latents of another VAE: 'stabilityai/sd-vae-ft-mse'.*'stabilityai/sd-vae-ft-ema'"):
        LatentShardDataset(root, expected_vae="stabilityai/sd-vae-ft-ema")
    assert len(LatentShardDataset(root, expected_vae="stabilityai/sd-vae-ft-mse")) == 8


def test_bad_shards_and_index(tmp_path):
    root = make_latents(tmp_path)
    path = os.path.join(root, "shard-00001.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(ValueError, match="shard-00001.safetensors is truncated"):
        LatentShardDataset(root)
    open(path, "wb").write(data)
    index = json.load(open(os.path.join(root, "index.json")))
    index["shards"][1]["count"] = 4
    json.dump(index, open(os.path.join(root, "index.json"), "w"))
    with pytest.raises(ValueError, match="shard-00001.safetensors holds 3 samples but the index says 4"):
        LatentShardDataset(root)
    index["complete"] = False
    json.dump(index, open(os.path.join(root, "index.json"), "w"))
    with pytest.raises(ValueError, match="prepare has not finished"):
        LatentShardDataset(root)
    with pytest.raises(FileNotFoundError, match="robuq.data.prepare"):
        LatentShardDataset(str(tmp_path / "nothing"))


def test_datamodule(tmp_path):
    dm = LatentDataModule(make_latents(tmp_path), batch_size=2, num_workers=2, val_fraction=0.25)
    assert dm.num_classes == 3 and dm.latent_shape == (4, 2, 2) and dm.scaling_factor == 0.18215
    dm.setup("fit")
    assert len(dm.train) == 6 and len(dm.val) == 2
    seen = []
    for x, y in dm.train_dataloader():
        assert x.shape == (2, 4, 2, 2) and y.shape == (2,)
        seen += [(int(v) % 100, int(v) >= 100) for v in x[:, 0, 0, 1]]
    val = [int(v) for x, _ in dm.val_dataloader() for v in x[:, 0, 0, 1]]
    assert len(seen) == 6 and len(val) == 2 and {i for i, _ in seen} | set(val) == set(range(8))
    assert all(v < 100 for v in val)  # no flips in validation
    other = LatentDataModule(make_latents(tmp_path / "val"), val_root=make_latents(tmp_path / "v2"))
    other.setup("fit")
    assert len(other.train) == len(other.val) == 8
