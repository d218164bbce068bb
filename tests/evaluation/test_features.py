import importlib.util

import pytest
import torch
from safetensors.torch import save_file
from torchmetrics.image.fid import FrechetInceptionDistance

from robuq.evaluation.features import (
    DEFAULT_WEIGHTS, FMNISTFeatures, InceptionFeatures, accuracy, load_classifier,
    load_feature_network,
)
from robuq.evaluation.metrics import extract, fid


def test_checkpoint_is_small_and_accurate(fmnist):
    assert DEFAULT_WEIGHTS.stat().st_size < 2e6
    model, metadata = load_classifier()
    assert float(metadata["test_accuracy"]) >= 0.90
    x, y = fmnist["test"]
    assert accuracy(model, x[:2000], y[:2000]) >= 0.88  # a subset, so a little slack


def test_feature_module_contract(feature_net, fmnist):
    x = fmnist["test"][0][:8]
    assert feature_net.num_features == 128 and feature_net(x).shape == (8, 128)
    logits_net = FMNISTFeatures(output="logits")
    assert logits_net.num_features == 10 and logits_net(x).shape == (8, 10)
    uint8 = ((x + 1) * 127.5).round().to(torch.uint8)  # torchmetrics' normalize=False input
    torch.testing.assert_close(feature_net(uint8), feature_net(x))
    assert not feature_net.train().training  # BatchNorm stays in eval mode inside metrics
    assert feature_net.fingerprint.startswith("fmnist-")
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\]"):
        feature_net(torch.zeros(2, 1, 28, 28))


def test_as_torchmetrics_feature_module(feature_net, fmnist):
    """torchmetrics FID with our network as `feature=` equals FID on our extracted features."""
    real, fake = fmnist["train"][0][:300], fmnist["test"][0][:300]
    metric = FrechetInceptionDistance(feature=FMNISTFeatures())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = fid(extract(feature_net, real)[0], extract(feature_net, fake)[0])
    assert metric.compute().item() == pytest.approx(expected, rel=1e-4)


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors.*python -m robuq.evaluation.features"):
        load_classifier(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt.safetensors: not a readable safetensors file"):
        load_classifier(corrupt)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"head.weight": torch.zeros(3, 3)}, str(mismatched))
    with pytest.raises(ValueError, match="mismatched.safetensors: weights do not fit FMNISTClassifier"):
        load_classifier(mismatched)
    with pytest.raises(ValueError, match="unknown feature network"):
        load_feature_network("clip")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_says_what_to_install():
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity.*weights-inception-2015-12-05"):
        InceptionFeatures()

