import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from robuq.evaluation.metrics import (
    compute_metrics, extract, fid, inception_score, iter_reference_images, kid, precision_recall, reference_features,
    reference_key,
)


def fid_scipy(a: torch.Tensor, b: torch.Tensor) -> float:
    """Reference FID in float64 with scipy's matrix square root (as pytorch-fid computes it)."""
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_fid_matches_scipy_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g)
    b = 0.5 + torch.randn(400, 16, generator=g) @ torch.randn(16, 16, generator=g) / 4
    assert fid(a, b) == pytest.approx(fid_scipy(a, b), rel=1e-6)
    assert fid(a, a) == pytest.approx(0, abs=1e-6)


def test_fid_real_vs_real_small_vs_noise_large(feature_net, fmnist):
    """Real test vs real train images is near 0; noise and blank images are far away."""
    n = 2000
    test, train = fmnist["test"][0][:n], fmnist["train"][0][:n]
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
    blank = torch.full((n, 1, 32, 32), -1.0)
    real = extract(feature_net, train)[0]
    distances = {name: fid(real, extract(feature_net, x)[0]) for name, x in
                 [("test", test), ("noise", noise), ("blank", blank)]}
    print("FID vs 2000 train images:", distances)
    assert distances["test"] < 1.0  # measured 0.19
    assert min(distances["noise"], distances["blank"]) > max(20.0, 50 * distances["test"])  # measured 181, 99


def test_precision_recall():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 8, generator=g)
    assert precision_recall(a, a) == (1.0, 1.0)
    same_distribution = precision_recall(a, torch.randn(1000, 8, generator=g))
    assert min(same_distribution) > 0.6
    assert precision_recall(a, 20 + torch.randn(1000, 8, generator=g)) == (0.0, 0.0)
    # fake samples collapsed onto a tenth of the real data: precise, without recall
    precision, recall = precision_recall(a, a[:100].repeat(10, 1) + 1e-3 * torch.randn(1000, 8, generator=g))
    assert precision > 0.95 and recall < 0.35


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # IS std of a single split
def test_kid_and_inception_score():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    assert abs(kid(a, b)[0]) < 0.01 and kid(a, b + 3)[0] > 0.5
    assert kid(a, b) == kid(a, b)  # subsets drawn from a fixed seed
    # confident, evenly spread predictions over 10 classes -> IS = 10; one class only -> 1
    spread = 50 * torch.eye(10).repeat(100, 1)
    assert inception_score(spread, splits=1)[0] == pytest.approx(10, rel=1e-3)
    assert inception_score(50 * torch.eye(10)[[3] * 1000], splits=1)[0] == pytest.approx(1, rel=1e-3)
    assert 9 < inception_score(spread)[0] < 10  # 10 random splits: uneven class counts


def test_compute_metrics_keys():
    g = torch.Generator().manual_seed(0)
    real, fake, logits = (torch.randn(n, d, generator=g) for n, d in [(300, 8), (100, 8), (100, 10)])
    metrics = compute_metrics(real, fake, logits)
    assert set(metrics) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert all(np.isfinite(v) for v in metrics.values())


def test_reference_features_are_cached(feature_net, tmp_path):
    features = reference_features(feature_net, "fashion-mnist/test", 300, cache_dir=tmp_path)
    key = reference_key("fashion-mnist/test", 300, feature_net.fingerprint, 256)
    assert key.startswith("fashion-mnist-test-n300-fmnist-")
    assert (tmp_path / f"{key}.safetensors").is_file() and features.shape == (300, 128)
    assert torch.equal(reference_features(feature_net, "fashion-mnist/test", 300, cache_dir=tmp_path), features)
    (tmp_path / f"{key}.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{key}.safetensors: unreadable .* delete it"):
        reference_features(feature_net, "fashion-mnist/test", 300, cache_dir=tmp_path)


def test_reference_image_folder(tmp_path):
    for i in range(3):
        Image.new("RGB", (80, 60), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (images,) = iter_reference_images(str(tmp_path), image_size=16)
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    with pytest.raises(FileNotFoundError, match="no images under"):
        next(iter_reference_images(str(tmp_path / "empty")))
