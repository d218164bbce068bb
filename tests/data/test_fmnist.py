"""Fashion-MNIST from Debian's dataset-fashion-mnist files."""

import gzip
import os

import pytest
import torch

from robuq.data.fmnist import CLASS_NAMES, DEFAULT_ROOT, FashionMNISTDataModule, load_fashion_mnist, to_latent

pytestmark = pytest.mark.skipif(not os.path.isdir(DEFAULT_ROOT), reason="apt-get install dataset-fashion-mnist")


def test_load_train_and_test():
    images, labels = load_fashion_mnist(split="train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10 and len(CLASS_NAMES) == 10
    images, labels = load_fashion_mnist(split="test")
    assert images.shape == (10000, 28, 28) and torch.bincount(labels).tolist() == [1000] * 10


def test_to_latent():
    images, _ = load_fashion_mnist(split="test")
    x = to_latent(images[:500])
    assert x.shape == (500, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()  # background padding
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], images[:500].float() / 127.5 - 1)
    assert to_latent(images[0]).shape == (1, 32, 32)


def test_datamodule():
    dm = FashionMNISTDataModule(batch_size=64, hflip=True, val_size=1000)
    dm.setup("fit")
    assert len(dm.train) == 60000 and len(dm.val) == 1000 and len(dm.test) == 10000
    loader = dm.train_dataloader()
    assert len(loader) == 60000 // 64
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 32, 32) and y.shape == (64,) and y.dtype == torch.int64
    assert torch.equal(dm.train[(5, True)][0], dm.train[5][0].flip(-1))
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x[0], dm.test[0][0]) and y[0] == dm.test.labels[0]  # val: test head, in order


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data\.root"):
        load_fashion_mnist(str(tmp_path), "test")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        os.symlink(os.path.join(DEFAULT_ROOT, name), tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.open(labels).read()
    os.remove(labels)
    labels.write_bytes(gzip.compress(raw[:-100]))  # a valid gzip of truncated idx data
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: 9900 data bytes"):
        load_fashion_mnist(str(tmp_path), "test")
    labels.write_bytes(gzip.compress(raw)[:-50])  # a truncated gzip
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: corrupt"):
        load_fashion_mnist(str(tmp_path), "test")
