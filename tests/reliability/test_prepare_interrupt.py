"""``prepare`` interrupted mid-run (an exception injected while encoding, while a shard is being
written, while index.json is being written) and rerun: it continues, keeping finished shards,
and ends with output identical to an uninterrupted run's. (tests/data/test_prepare.py covers a
rerun over truncated/missing shards after a finished run.)"""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open

import robuq.data.prepare as prep

RUN = dict(image_size=32, shard_size=4, batch_size=2, num_workers=0, device="cpu")  # 12 images: 3 shards


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        sample_size=32)
    vae_dir = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(vae_dir)
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        os.makedirs(images / c)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(images / c / f"{i}.png")
    straight = tmp_path_factory.mktemp("straight")
    prep.prepare(str(images), str(straight), vae=str(vae_dir), **RUN)
    return str(images), str(vae_dir), straight


def snapshot(out):
    index = json.loads((out / "index.json").read_text())
    shards = {}
    for s in index["shards"]:
        with safe_open(str(out / s["file"]), "pt") as f:
            shards[s["file"]] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return index, shards


def assert_identical(a, b):
    (ia, sa), (ib, sb) = snapshot(a), snapshot(b)
    assert ia == ib
    assert sa.keys() == sb.keys()
    for name in sa:
        (ta, ma), (tb, mb) = sa[name], sb[name]
        assert ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


class Interrupt(BaseException):
    """Stands for Ctrl-C / a kill: not an Exception, so nothing on the way may swallow it."""


def fail_encode_at(monkeypatch, n):
    real, calls = AutoencoderKL.encode, {"n": 0}

    def encode(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Interrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)


def fail_shard_write_at(monkeypatch, n):
    real, calls = prep.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == n:
            real(tensors, path, metadata=metadata)
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])  # half of it on disk, then the kill
            raise Interrupt
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(prep, "save_file", save_file)


def fail_index_write_at(monkeypatch, n):
    real, calls = prep.write_atomic, {"n": 0}

    def write_atomic(path, write):
        if path.endswith("index.json"):
            calls["n"] += 1
            if calls["n"] == n:
                write(path + ".tmp")
                open(path + ".tmp", "r+b").truncate(10)
                raise Interrupt
        return real(path, write)

    monkeypatch.setattr(prep, "write_atomic", write_atomic)


@pytest.mark.parametrize("fault, n, reused", [
    (fail_encode_at, 4, 1),  # batches 1-2 = shard 0 written; interrupted in shard 1
    (fail_shard_write_at, 2, 1),  # shard 1's file half-written
    (fail_index_write_at, 3, 2),  # index after shard 1 half-written (initial index is call 1)
])
def test_interrupted_prepare_resumes_to_identical_output(tmp_path, inputs, monkeypatch, fault, n, reused):
    images, vae, straight = inputs
    out = tmp_path / "out"
    fault(monkeypatch, n)
    with pytest.raises(Interrupt):
        prep.prepare(images, str(out), vae=vae, **RUN)
    monkeypatch.undo()
    summary = prep.prepare(images, str(out), vae=vae, **RUN)
    assert summary["shards_reused"] == reused and summary["shards_written"] == 3 - reused
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert_identical(straight, out)


def test_interrupted_twice_then_finished(tmp_path, inputs, monkeypatch):
    images, vae, straight = inputs
    out = tmp_path / "out"
    for n in (3, 3):  # each run finishes one more shard, then dies in the next one's first batch
        fail_encode_at(monkeypatch, n)
        with pytest.raises(Interrupt):
            prep.prepare(images, str(out), vae=vae, **RUN)
        monkeypatch.undo()
    summary = prep.prepare(images, str(out), vae=vae, **RUN)
    assert summary["shards_reused"] == 2 and summary["shards_written"] == 1
    assert_identical(straight, out)
