"""Fashion-MNIST, the embedded default: 28x28 grey images padded to 32x32 and scaled to [-1, 1],
fed to the DiT as they are (the "VAE" is the identity). Read from Debian's `dataset-fashion-mnist`.
"""

import gzip
import math
import os

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from robuq.data.loader import ResumableDataLoader, datamodule_loader, split_key

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """A gzipped idx file of uint8 data (magic 00 00 08 ndim, big-endian int32 sizes)."""
    try:
        with gzip.open(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: corrupt ({e}); reinstall dataset-fashion-mnist") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, 8, ndim]):
        raise ValueError(f"{path}: not an idx file of {ndim}-d uint8 data (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: {len(data) - header} data bytes but the header says {shape}: "
                         "the file is truncated or corrupt; reinstall dataset-fashion-mnist")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: str = DEFAULT_ROOT, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N] of split 'train' (60k) or 'test' (10k)."""
    paths = [os.path.join(root, name) for name in FILES[split]]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: install the Debian package dataset-fashion-mnist "
                "(apt-get install dataset-fashion-mnist) or point --data.root (the datamodule's "
                "root argument) at a directory holding the four *-ubyte.gz files.")
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} (max "
                         f"{labels.max()}) are not Fashion-MNIST's; reinstall dataset-fashion-mnist")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 28, 28] -> float32 [..., 1, 32, 32] in [-1, 1], padded with the background."""
    x = images.float().div(127.5).sub(1).unsqueeze(-3)
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


class FashionMNIST(torch.utils.data.Dataset):
    """(latent [1, 32, 32], label) pairs; keeps uint8 images and converts on the fly."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        i, flip = split_key(key)
        x = to_latent(self.images[i])
        return (x.flip(-1) if flip else x), self.labels[i]


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST batches of (latents [B, 1, 32, 32] float32, labels [B] int64).

    train: all 60k train images in a seeded, resumable order (robuq.data.loader), random
    horizontal flips if `hflip`. val: the first `val_size` test images; test: all 10k.
    The loaders shard themselves over DDP ranks: run the Trainer with use_distributed_sampler=False.
    """

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES
    latent_shape = (1, 32, 32)

    def __init__(self, root: str = DEFAULT_ROOT, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, hflip: bool = False, val_size: int = 1000):
        super().__init__()
        self.root, self.batch_size, self.num_workers = root, batch_size, num_workers
        self.seed, self.hflip, self.val_size = seed, hflip, val_size

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and not hasattr(self, "train"):
            self.train = FashionMNIST(*load_fashion_mnist(self.root, "train"))
        if not hasattr(self, "test"):
            images, labels = load_fashion_mnist(self.root, "test")
            self.test = FashionMNIST(images, labels)
            self.val = FashionMNIST(images[:self.val_size], labels[:self.val_size])

    def _loader(self, dataset, train: bool) -> ResumableDataLoader:
        return datamodule_loader(self, dataset, train)

    def train_dataloader(self):
        return self._loader(self.train, train=True)

    def val_dataloader(self):
        return self._loader(self.val, train=False)

    def test_dataloader(self):
        return self._loader(self.test, train=False)
