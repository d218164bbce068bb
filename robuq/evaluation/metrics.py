"""FID, KID, Inception Score and precision/recall on feature-network outputs.

Images pass through the feature network once (`extract`); the metrics then run on the features:
torchmetrics' FID/KID/IS through an identity `feature=` module, precision/recall here. So the
features of the real reference set are computed once per (dataset, split, N, feature network)
and cached on disk (`reference_features`).

    FID  = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))          (Heusel et al. 2017)
    KID  = unbiased MMD^2 with kernel k(a, b) = (a.b / d + 1)^3, over random subsets
    IS   = exp E_x KL(p(y|x) || p(y)), mean/std over 10 splits
    precision = P_fake[x inside the real manifold], recall = P_real[x inside the fake manifold],
    manifold = union of balls around each point reaching its k-th nearest neighbour
                                                           (Kynkaanniemi et al. 2019, k = 3)
"""

import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

DEFAULT_CACHE_DIR = Path(os.environ.get("ROBUQ_CACHE", Path.home() / ".cache" / "robuq"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Precomputed(nn.Module):
    """Identity `feature=` module: torchmetrics gets features we extracted ourselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def extract(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, d], logits [N, K]) as float32 on the CPU; images in [-1, 1]."""
    device = next(net.parameters()).device
    outputs = [net.features_and_logits(batch.to(device)) for batch in images.split(batch_size)]
    return tuple(torch.cat([o[i].float().cpu() for o in outputs]) for i in (0, 1))


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return metric.compute().item()


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """(mean, std) over `subsets` random subsets of min(subset_size, N_real, N_fake) samples."""
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        torch.manual_seed(seed)
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
        mean, std = metric.compute()
    return mean.item(), std.item()


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0):
    """(mean, std) over `splits` random splits of the samples."""
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        torch.manual_seed(seed)
        metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits)
        metric.update(logits.double())
        mean, std = metric.compute()
    return mean.item(), std.item()


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest neighbour among the other rows."""
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def manifold_coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of `points` inside at least one ball (centres[i], radii[i])."""
    inside = [(torch.cdist(c, centres) <= radii).any(dim=1) for c in points.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, device=None) -> tuple[float, float]:
    real, fake = real.to(device, torch.float32), fake.to(device, torch.float32)
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def compute_metrics(real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor, device=None) -> dict:
    """All metrics of generated features/logits against real features. Precision/recall use as
    many real samples as there are fake ones (the first of the shuffled reference set)."""
    kid_mean, kid_std = kid(real, fake)
    is_mean, is_std = inception_score(fake_logits)
    precision, recall = precision_recall(real[: len(fake)], fake, device=device)
    return dict(
        fid=fid(real, fake), kid_mean=kid_mean, kid_std=kid_std, is_mean=is_mean, is_std=is_std,
        precision=precision, recall=recall,
    )


# --- the real reference set ---------------------------------------------------------------------


def iter_reference_images(
    reference: str, n: int | None = None, *, data_root: str | None = None, image_size: int = 256,
    batch_size: int = 500, seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Batches of real images in [-1, 1]: a fixed random subset of n (all if None) from
    "fashion-mnist/train", "fashion-mnist/test", or a folder of images (searched recursively;
    centre-cropped and resized to image_size as in ADM/DiT, RGB)."""
    if reference.startswith("fashion-mnist/"):
        from robuq.data.fmnist import DEFAULT_ROOT, load_fashion_mnist, to_latent

        split = reference.split("/", 1)[1]
        if split not in ("train", "test"):
            raise ValueError(f"unknown split in {reference!r}; use fashion-mnist/train or fashion-mnist/test")
        images, _ = load_fashion_mnist(data_root or DEFAULT_ROOT, split)
        order = _subset(len(images), n, seed)
        for idx in order.split(batch_size):
            yield to_latent(images[idx])
        return
    files = sorted(p for p in Path(reference).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(
            f"no images under {reference!r}; reference must be 'fashion-mnist/<split>' or an image folder"
        )
    order = _subset(len(files), n, seed)
    for idx in order.split(batch_size):
        yield torch.stack([_load_image(files[i], image_size) for i in idx.tolist()])


def _subset(total: int, n: int | None, seed: int) -> torch.Tensor:
    if n is not None and n > total:
        raise ValueError(f"asked for {n} reference images, the set has {total}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def _load_image(path: Path, size: int) -> torch.Tensor:
    """ADM's centre crop: halve with box filter while >= 2x size, bicubic resize, crop."""
    image = Image.open(path).convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def reference_key(reference: str, n: int | None, fingerprint: str, image_size: int) -> str:
    if reference.startswith("fashion-mnist/"):
        name, split = reference.split("/", 1)
    else:
        folder = Path(reference).resolve()
        name = f"{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}-{image_size}px"
        split = "folder"
    return f"{name}-{split}-n{'all' if n is None else n}-{fingerprint}"


def reference_features(
    net: nn.Module, reference: str = "fashion-mnist/train", n: int | None = None, *,
    cache_dir: str | Path = DEFAULT_CACHE_DIR, data_root: str | None = None, image_size: int = 256,
    batch_size: int = 500,
) -> torch.Tensor:
    """Features [n, d] of the real reference set, computed once and cached in cache_dir as
    <dataset>-<split>-n<N>-<feature network fingerprint>.safetensors."""
    path = Path(cache_dir).expanduser() / f"{reference_key(reference, n, net.fingerprint, image_size)}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["features"]
        except Exception as e:
            raise ValueError(f"{path}: unreadable reference-feature cache ({e}); delete it to recompute") from e
    batches = iter_reference_images(reference, n, data_root=data_root, image_size=image_size, batch_size=batch_size)
    features = torch.cat([extract(net, images, batch_size)[0] for images in batches])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"features": features.contiguous()}, str(tmp), metadata={"reference": reference, "n": str(len(features))})
    tmp.replace(path)
    return features
