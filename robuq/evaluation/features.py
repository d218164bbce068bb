"""Feature networks for FID, KID, Inception Score and precision/recall.

Fashion-MNIST: a small CNN classifier trained by this module
(`python -m robuq.evaluation.features --out checkpoints/fmnist_classifier.safetensors`). Its
128-d global-average-pooled features play the part of InceptionV3's pool3 features, its 10
logits the part of Inception's logits. ImageNet: torchmetrics' FID InceptionV3 (torch-fidelity).

Every network here takes float images in [-1, 1], shape [N, C, H, W] (uint8 in [0, 255] also
works, as torchmetrics sends with `normalize=False`), and is a valid torchmetrics `feature=`
module: it has `num_features` and returns [N, num_features].
"""

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "checkpoints" / "fmnist_classifier.safetensors"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float input is returned as float32."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


class FMNISTClassifier(nn.Module):
    """Conv-BN-ReLU stages of 32, 64, 128, 128 channels with 2x2 max-pools in between (32 -> 4
    pixels), global average pool -> 128-d features, linear -> 10 logits. 242k parameters."""

    num_features = 128
    num_classes = 10

    def __init__(self):
        super().__init__()

        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *stage(1, 32), nn.MaxPool2d(2),
            *stage(32, 64), nn.MaxPool2d(2),
            *stage(64, 128), nn.MaxPool2d(2),
            *stage(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(self.num_features, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | Path = DEFAULT_WEIGHTS) -> tuple[FMNISTClassifier, dict]:
    """Load the classifier weights and the file's metadata (test accuracy, command, ...)."""
    path = Path(path)
    retrain = f"train it with `python -m robuq.evaluation.features --out {path}`"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Fashion-MNIST feature network not found; {retrain}")
    try:
        state = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e}); restore it from git or {retrain}") from e
    model = FMNISTClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit FMNISTClassifier ({e}); {retrain}") from e
    return model.eval(), metadata


class FMNISTFeatures(nn.Module):
    """The Fashion-MNIST feature network as a torchmetrics `feature=` module.

    Input [N, 1, 32, 32]; output [N, 128] features (`output="features"`, for FID/KID/precision/
    recall) or [N, 10] logits (`output="logits"`, for Inception Score). Always in eval mode.
    """

    def __init__(self, weights: str | Path = DEFAULT_WEIGHTS, output: str = "features"):
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output must be 'features' or 'logits', got {output!r}")
        self.classifier, self.metadata = load_classifier(weights)
        self.classifier.requires_grad_(False)
        self.output = output
        self.num_features = FMNISTClassifier.num_features if output == "features" else FMNISTClassifier.num_classes
        self.fingerprint = "fmnist-" + file_sha256(weights)[:16]

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 32, 32):
            raise ValueError(f"FMNISTFeatures expects images of shape [N, 1, 32, 32], got {list(x.shape)}")
        features = self.classifier.features(to_unit_range(x))
        return features, self.classifier.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, logits = self.features_and_logits(x)
        return features if self.output == "features" else logits


class InceptionFeatures(nn.Module):
    """torchmetrics' FID InceptionV3 (the TF-ported weights every FID paper uses): [N, 2048]
    pool3 features or [N, 1008] unbiased logits. RGB or grayscale input, any size (resized to
    299 inside). Needs torch-fidelity and its weights file."""

    def __init__(self, weights: str | Path | None = None, output: str = "features"):
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output must be 'features' or 'logits', got {output!r}")
        supply = (
            "Install it where you evaluate (`pip install torch-fidelity`, e.g. in the GPU env; not on "
            "machines where pip would replace torch) and pre-download the FID Inception weights "
            f"{INCEPTION_URL} into $TORCH_HOME/hub/checkpoints/ or pass the file as `feature_weights`."
        )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048", "logits_unbiased"],
                feature_extractor_weights_path=None if weights is None else str(weights),
            )
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"InceptionV3 features need torch-fidelity, which is missing. {supply}") from e
        except OSError as e:  # no network to download the weights, or an unreadable weights file
            raise RuntimeError(f"InceptionV3 weights could not be loaded ({e}). {supply}") from e
        self.output = output
        self.num_features = 2048 if output == "features" else 1008
        self.fingerprint = "inception-2015-12-05" if weights is None else "inception-" + file_sha256(weights)[:16]

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype != torch.uint8:
            x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features, logits = self.inception._torch_fidelity_forward(x)
        return features, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, logits = self.features_and_logits(x)
        return features if self.output == "features" else logits


def load_feature_network(name: str = "fmnist", weights: str | Path | None = None) -> nn.Module:
    """"fmnist" -> FMNISTFeatures (weights default: checkpoints/fmnist_classifier.safetensors);
    "inception" -> InceptionFeatures (weights default: torch-fidelity's download cache)."""
    if name == "fmnist":
        return FMNISTFeatures(DEFAULT_WEIGHTS if weights is None else weights)
    if name == "inception":
        return InceptionFeatures(weights)
    raise ValueError(f"unknown feature network {name!r}; use 'fmnist' or 'inception'")


# --- training -----------------------------------------------------------------------------------


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (only the -1 padding of the
    28 -> 32 images wraps around)."""
    flip = torch.rand(len(x)) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shifts = torch.randint(-2, 3, (len(x), 2)).tolist()
    return torch.stack([img.roll(tuple(s), dims=(-2, -1)) for img, s in zip(x, shifts)])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def train(
    out: Path = DEFAULT_WEIGHTS,
    data_root: str | None = None,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """Train FMNISTClassifier on the Fashion-MNIST train split (AdamW, one-cycle LR, flip+shift
    augmentation), print the test accuracy, save safetensors with it in the metadata.
    data_root: the Fashion-MNIST directory (default: robuq.data.fmnist.DEFAULT_ROOT)."""
    from robuq.data.fmnist import DEFAULT_ROOT, load_fashion_mnist, to_latent

    torch.manual_seed(seed)
    start = time.time()
    (x_train, y_train), (x_test, y_test) = [
        (to_latent(images), labels)
        for images, labels in (load_fashion_mnist(data_root or DEFAULT_ROOT, split) for split in ("train", "test"))
    ]
    model = FMNISTClassifier()
    steps_per_epoch = len(x_train) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(_augment(x_train[idx])), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  test accuracy {accuracy(model, x_test, y_test):.4f}"
              f"  ({time.time() - start:.0f} s)")
    test_accuracy = accuracy(model, x_test, y_test)
    metadata = dict(
        test_accuracy=f"{test_accuracy:.4f}", epochs=str(epochs), batch_size=str(batch_size), lr=str(lr),
        seed=str(seed), wall_time_s=f"{time.time() - start:.0f}", torch=torch.__version__,
        command=f"python -m robuq.evaluation.features --out {out} --epochs {epochs} --seed {seed}",
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=metadata)
    print(f"test accuracy {test_accuracy:.4f}; wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB)"
          f" in {time.time() - start:.0f} s")
    return test_accuracy


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(train, as_positional=False)
