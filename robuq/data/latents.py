"""Sharded VAE latents written by `python -m robuq.data.prepare` (format: docs/DATA.md).

A directory holds `index.json` and shards `shard-00000.safetensors`, ... with `latents` (fp16
[n, C, H, W], already times the VAE's scaling factor), optionally `latents_flip` (the encoding of
the horizontally flipped image) and `labels` (int64 [n]). Shards are memory-mapped and read one
sample at a time, so a dataset of any size costs little RAM.
"""

import json
import os

import lightning as L
import numpy as np
import torch
from safetensors import safe_open

from robuq.data.loader import ResumableDataLoader, datamodule_loader, Subset, split_key

INDEX = "index.json"


def read_index(root: str) -> dict:
    path = os.path.join(root, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {root} holds no prepared latents; make them with "
                                "python -m robuq.data.prepare (see docs/DATA.md)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}); rerun python -m robuq.data.prepare on the same output to rebuild it") from None


def check_shard(path: str, latent_shape=None, count: int | None = None) -> dict:
    """Check a shard's header (not its data) and return its metadata; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} is missing; rerun prepare to write it")
    try:
        with safe_open(path, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise ValueError(f"shard {path} is truncated or corrupt ({e}); rerun prepare to rewrite it") from None
    if "latents" not in shapes or "labels" not in shapes:
        raise ValueError(f"shard {path} lacks 'latents' or 'labels' (has {sorted(shapes)})")
    n = shapes["labels"][0]
    want = [n, *latent_shape] if latent_shape is not None else [n, *shapes["latents"][1:]]
    for key in ("latents", "latents_flip"):
        if key in shapes and shapes[key] != want:
            raise ValueError(f"shard {path}: {key} has shape {shapes[key]}, expected {want}")
    if count is not None and n != count:
        raise ValueError(f"shard {path} holds {n} samples but the index says {count}")
    return meta


def vae_identity(d: dict) -> str:
    """The VAE an index or a shard's settings record: 'NAME' (vae_subfolder S, vae_sha256 D)."""
    extra = [f"{k} {d[k]}" for k in ("vae_subfolder", "vae_sha256") if d.get(k)]
    return repr(d.get("vae")) + (f" ({', '.join(extra)})" if extra else "")


def check_shard_vae(path: str, meta: dict, index: dict) -> None:
    """Refuse a shard whose settings record another VAE than its index (weights digest, else name)."""
    if "settings" not in meta:  # hand-made shards carry no settings
        return
    settings = json.loads(meta["settings"])
    if "vae_sha256" in settings and "vae_sha256" in index:
        same = settings["vae_sha256"] == index["vae_sha256"]
    else:  # made before prepare recorded the digest
        same = (settings.get("vae"), settings.get("vae_subfolder")) == (index.get("vae"), index.get("vae_subfolder"))
    if not same:
        raise ValueError(f"shard {path} holds latents of another VAE, {vae_identity(settings)}, than its index.json, "
                         f"{vae_identity(index)} (copied from another prepared directory?); remove the shard and "
                         "rerun the same prepare command to rewrite it")


class LatentShardDataset(torch.utils.data.Dataset):
    """(latent [C, H, W] float32, label) pairs from a prepared directory.

    A key (i, True) (see robuq.data.loader) returns the flipped sample: `latents_flip` when the
    shards have it, else, if `flip_latents`, the latent mirrored along W (an approximation).
    `expected_vae`: refuse latents made by another VAE; a shard whose own settings record another
    VAE than the index is refused too. Labels are loaded up front (8 B each).
    """

    def __init__(self, root: str, expected_vae: str | None = None, flip_latents: bool = False):
        self.root, self.flip_latents = root, flip_latents
        self.index = index = read_index(root)
        if not index["complete"]:
            raise ValueError(f"{root}: prepare has not finished ({len(index['shards'])} shards so far); "
                             "rerun the same prepare command to complete it")
        if expected_vae is not None and index["vae"] != expected_vae:
            raise ValueError(f"{root} holds latents of another VAE: {index['vae']!r}, not the expected "
                             f"{expected_vae!r}; prepare them with {expected_vae!r} or expect {index['vae']!r}")
        self.files = [os.path.join(root, s["file"]) for s in index["shards"]]
        labels = []
        for path, shard in zip(self.files, index["shards"]):
            check_shard_vae(path, check_shard(path, index["latent_shape"], shard["count"]), index)
            with safe_open(path, "pt") as f:
                labels.append(f.get_tensor("labels"))
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        self.ends = np.cumsum([s["count"] for s in index["shards"]])
        self.has_flip = bool(index["flip"])
        self._handles, self._pid = {}, os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def _shard(self, s: int):
        if self._pid != os.getpid():  # a forked worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = safe_open(self.files[s], "pt")
        return self._handles[s]

    def __getitem__(self, key):
        i, flip = split_key(key)
        s = int(np.searchsorted(self.ends, i, side="right"))
        j = i - (int(self.ends[s - 1]) if s else 0)
        f = self._shard(s)
        if flip and self.has_flip:
            x = f.get_slice("latents_flip")[j:j + 1][0]
        elif flip and self.flip_latents:
            x = f.get_slice("latents")[j:j + 1][0].flip(-1)
        elif flip:
            raise ValueError(f"{self.root}: shards have no latents_flip; prepare with flip=true, or set "
                             "flip_latents=True to mirror the latents instead (an approximation)")
        else:
            x = f.get_slice("latents")[j:j + 1][0]
        return x.float(), self.labels[i]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


class LatentDataModule(L.LightningDataModule):
    """Batches of (latents [B, C, H, W] float32, labels [B] int64) from prepared shards.

    train: a seeded, resumable, DDP-sharded order (robuq.data.loader), each sample flipped with
    p=0.5 if `hflip`. val: `val_root` (another prepared directory), else a seeded `val_fraction`
    of `root` held out from training, else none. The loaders shard themselves over DDP ranks:
    run the Trainer with use_distributed_sampler=False.
    """

    def __init__(self, root: str, batch_size: int = 256, num_workers: int = 4, seed: int = 0,
                 hflip: bool = True, val_fraction: float = 0.0, val_root: str | None = None,
                 expected_vae: str | None = None, flip_latents: bool = False):
        super().__init__()
        self.root, self.batch_size, self.num_workers, self.seed = root, batch_size, num_workers, seed
        self.hflip, self.val_fraction, self.val_root = hflip, val_fraction, val_root
        self.expected_vae, self.flip_latents = expected_vae, flip_latents
        self.index = read_index(root)  # so that num_classes etc. are known before setup()

    @property
    def num_classes(self) -> int:
        return len(self.index["class_names"])

    @property
    def class_names(self) -> list[str]:
        return self.index["class_names"]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.index["latent_shape"])

    @property
    def scaling_factor(self) -> float:
        return self.index["scaling_factor"]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train"):
            return
        data = LatentShardDataset(self.root, self.expected_vae, self.flip_latents)
        if self.hflip and not (data.has_flip or self.flip_latents):
            raise ValueError(f"hflip: {self.root} has no latents_flip; prepare with flip=true, or set "
                             "flip_latents=True to mirror the latents instead (an approximation)")
        self.train, self.val = data, None
        if self.val_root is not None:
            self.val = LatentShardDataset(self.val_root, data.index["vae"])
        elif self.val_fraction > 0:
            order = np.random.default_rng(self.seed).permutation(len(data))
            k = round(len(data) * self.val_fraction)
            self.val, self.train = Subset(data, np.sort(order[:k])), Subset(data, np.sort(order[k:]))

    def _loader(self, dataset, train: bool) -> ResumableDataLoader:
        return datamodule_loader(self, dataset, train)

    def train_dataloader(self):
        return self._loader(self.train, train=True)

    def val_dataloader(self):
        return [] if self.val is None else self._loader(self.val, train=False)
