"""Hostile and damaged files: a pickle that runs code on load is refused everywhere a checkpoint
is read (and never runs); truncated or corrupt checkpoints, teacher safetensors, shards and
indexes give errors that name the file and what is wrong with it."""

import json
import os
import pickle
import random
import shutil

import pytest
import torch
from faultkit import fit
from safetensors.torch import save_file

from robuq.checkpoint import AtomicCheckpointIO, safe_load
from robuq.data.latents import LatentShardDataset, check_shard
from robuq.models import load_dit
from robuq.module import DiTModule, load_for_eval


class Payload:
    """Unpickling this calls ``fn(*args)``: the classic checkpoint exploit."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def evil_files(tmp_path, marker) -> dict:
    """The same exploit in the three on-disk forms torch.load might meet."""
    files = {}
    for kind in ("zip", "legacy", "raw_pickle", "os_system"):
        payload = Payload(os.system, f"touch {marker}") if kind == "os_system" else Payload(open, str(marker), "w")
        obj = {"state_dict": {"w": torch.ones(2)}, "pytorch-lightning_version": "2.6.6", "global_step": 0,
               "robuq": {"task": "qat"}, "hook": payload}
        path = tmp_path / f"evil_{kind}.ckpt"
        if kind == "raw_pickle":
            path.write_bytes(pickle.dumps(obj))
        else:
            torch.save(obj, path, _use_new_zipfile_serialization=kind != "legacy")
        files[kind] = path
    return files


def test_code_on_load_is_refused_everywhere(tmp_path, qat_config, tiny_teacher):
    marker = tmp_path / "PWNED"
    for kind, path in evil_files(tmp_path, marker).items():
        refused = "refusing to load" if kind != "raw_pickle" else "not a weights-only torch checkpoint"
        for load in (safe_load, load_for_eval, AtomicCheckpointIO().load_checkpoint):
            with pytest.raises(ValueError, match=rf"{refused} {path}|{path}.*{refused}|{refused}.*{path}") as info:
                load(path)
            assert "weights_only` set to `False` will likely succeed" not in str(info.value)
        if kind == "zip":
            assert "posix.system" in str(pytest.raises(ValueError, safe_load, evil_files(tmp_path, marker)["os_system"]).value)
        with pytest.raises(ValueError, match=str(path)):  # resume from it
            fit(qat_config, tmp_path / f"run_{kind}", "--ckpt_path", str(path))
        with pytest.raises(ValueError, match=str(path)):  # start QAT from it as the teacher
            DiTModule(task="qat", teacher=str(path))
        assert not marker.exists(), f"the {kind} payload ran"


def damaged_checkpoints(tmp_path, good: bytes) -> dict:
    n = len(good)
    cases = {"empty": (b"", "is empty"), "truncated": (good[: n // 2], "truncated or corrupt"),
             "header_only": (good[:10], "truncated or corrupt"), "zeros": (b"\0" * n, "truncated or corrupt"),
             # random bytes fail in the unpickler or earlier, by chance: either message names the damage
             "garbage": (random.Random(0).randbytes(4096), ("not a weights-only torch checkpoint", "truncated or corrupt")),
             "text": (b"hello, world\n", "truncated or corrupt")}
    out = {}
    for name, (data, why) in cases.items():
        (tmp_path / f"{name}.ckpt").write_bytes(data)
        out[name] = (tmp_path / f"{name}.ckpt", why)
    return out


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, qat_config):
    root = tmp_path_factory.mktemp("good")
    fit(qat_config, root, "--trainer.max_steps", "2")
    return root / "checkpoints" / "last.ckpt"


def test_damaged_checkpoints_name_the_file_and_the_damage(tmp_path, good_checkpoint, qat_config):
    for name, (path, why) in damaged_checkpoints(tmp_path, good_checkpoint.read_bytes()).items():
        for load in (safe_load, load_for_eval):
            with pytest.raises(ValueError) as info:
                load(path)
            whys = why if isinstance(why, tuple) else (why,)
            assert str(path) in str(info.value) and any(w in str(info.value) for w in whys), (name, str(info.value))
    path, why = damaged_checkpoints(tmp_path, good_checkpoint.read_bytes())["truncated"]
    with pytest.raises(ValueError, match=f"checkpoint {path} is truncated or corrupt"):
        fit(qat_config, tmp_path / "run", "--ckpt_path", str(path))
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        safe_load(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "not a robuq training checkpoint"),
    ({"state_dict": {}}, "not a robuq training checkpoint"),
    ({"robuq": "x", "state_dict": {}}, "not a robuq training checkpoint"),
])
def test_valid_torch_files_that_are_not_checkpoints(tmp_path, content, message, qat_config):
    path = tmp_path / "odd.ckpt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=f"{path}.*{message}|{message}"):
        load_for_eval(str(path))
    with pytest.raises(ValueError, match=f"{path} is not a Lightning training checkpoint"):
        AtomicCheckpointIO().load_checkpoint(path)


# ---- teacher directories (diffusers safetensors) -------------------------------------------------

WEIGHTS = "diffusion_pytorch_model.safetensors"


def damaged_teacher(tmp_path, tiny_teacher, name, weights=None, config=None):
    d = tmp_path / name
    shutil.copytree(tiny_teacher, d)
    if weights is not None:
        (d / WEIGHTS).write_bytes(weights(( d / WEIGHTS).read_bytes()))
    if config is not None:
        (d / "config.json").write_text(config)
    return d


@pytest.mark.parametrize("name, weights, why", [
    ("truncated", lambda b: b[: len(b) // 2], "incomplete metadata"), ("empty", lambda b: b"", "header too small"),
    ("garbage_header", lambda b: b"\xff" * 8 + b[8:], "header too large"),
])
def test_damaged_teacher_weights_name_the_file(tmp_path, tiny_teacher, name, weights, why):
    d = damaged_teacher(tmp_path, tiny_teacher, name, weights=weights)
    with pytest.raises(ValueError, match=rf"weights file {d / WEIGHTS} is truncated or corrupt \(.*{why}.*\); re-download"):
        load_dit(str(d))


def test_damaged_teacher_weights_say_what_is_wrong(tmp_path, tiny_teacher):
    """The message says what is wrong and how to fix it; safetensors' own error is chained, not dropped."""
    d = damaged_teacher(tmp_path, tiny_teacher, "t", weights=lambda b: b[: len(b) // 2])
    with pytest.raises(ValueError, match="(?i)truncat|incomplete|corrupt|header") as info:
        load_dit(str(d))
    assert "re-export" in str(info.value) and "python -m robuq.models" in str(info.value)
    assert "incomplete metadata" in str(info.value.__cause__)


def test_corrupt_teacher_config_names_the_file(tmp_path, tiny_teacher):
    d = damaged_teacher(tmp_path, tiny_teacher, "badcfg", config="{not json")
    with pytest.raises(FileNotFoundError, match=f"{d / 'config.json'}' is not a valid JSON file"):
        load_dit(str(d))


def test_teacher_with_missing_weights_is_refused(tmp_path, tiny_teacher):
    cfg = json.loads((damaged_teacher(tmp_path, tiny_teacher, "x") / "config.json").read_text())
    d = damaged_teacher(tmp_path, tiny_teacher, "more_layers", config=json.dumps({**cfg, "num_layers": 2}))
    with pytest.raises(Exception, match="(?i)missing|not initiali"):
        load_dit(str(d))


# ---- latent shards and their index -----------------------------------------------------------------

def shard(path, n=2, shape=(4, 2, 2), **meta):
    save_file({"latents": torch.zeros(n, *shape, dtype=torch.float16), "labels": torch.zeros(n, dtype=torch.int64)},
              str(path), metadata={k: json.dumps(v) for k, v in meta.items()} or None)
    return path


@pytest.mark.parametrize("damage, why", [
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header too large"),
    (lambda b: b[:8] + b"XXXX" + b[12:], "invalid JSON in header"),
    (lambda b: b[:5], "truncated or corrupt"),
    (lambda b: b[: len(b) - 3], "truncated or corrupt"),
    (lambda b: b"", "truncated or corrupt"),
])
def test_damaged_shard_names_the_file_and_the_damage(tmp_path, damage, why):
    path = shard(tmp_path / "shard-00000.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"shard {path} is .*{why}"):
        check_shard(str(path), [4, 2, 2])


def test_shard_of_another_shape_names_the_file(tmp_path):
    path = shard(tmp_path / "shard-00000.safetensors", shape=(16, 2, 2))
    with pytest.raises(ValueError, match=rf"shard {path}: latents has shape \[2, 16, 2, 2\], expected \[2, 4, 2, 2\]"):
        check_shard(str(path), [4, 2, 2])


def test_corrupt_index_names_the_file(tmp_path):
    (tmp_path / "index.json").write_text('{"complete": tr')
    with pytest.raises(ValueError, match="index.json"):
        LatentShardDataset(str(tmp_path))
