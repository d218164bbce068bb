"""Held-out batches, per-layer MACs and the two sensitivity tables AMPN allocates from.

QAT sensitivity of quantized layer l at width b, on a student QAT-adapted at the base width b0:

    s_l(b) = L(student, only l at b) - L(student),    L = mean over held-out of (f_S - f_T)^2

where l's step is re-initialised for b and calibrated on one batch, and l is restored afterwards;
s_l(b0) = 0. Optionally a few distillation steps adapt the change before measuring: of l's step
alone (``search(adapt_scope="step")``: the base widths' steps are already learned, so L(student)
stays the reference), or of the whole student, in which case the reference is adapted alike so
the steps' own effect cancels: s_l(b) = L(adapt(only l at b)) - L(adapt(student)). PTQ sensitivity, for comparison,
on the full-precision teacher with only l's activations quantized (weights kept FP):

    p_l(b) = mean over held-out of (Q_b(x R) (W R)^T - x W^T)^2,   computed as Q_b(x R) R^T W^T

Every measurement sees the same fixed (x_t, t, y) and teacher outputs, in float32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robuq.diffusion import NUM_TRAIN_TIMESTEPS, Schedule
from robuq.models import dit_forward
from robuq.quant import QuantConfig, RobustQuantizer, quant_layers


@dataclass
class Batch:
    xt: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None = None  # the teacher's output


def stratified_batches(x0: torch.Tensor, y: torch.Tensor, batch_size: int, groups: int, seed: int) -> list[Batch]:
    """Noised batches whose timesteps cover all ``groups`` equal timestep ranges: sample k is in
    group g = k mod G, t uniform in [ceil(g T / G), ceil((g + 1) T / G)); noise and t seeded."""
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(len(x0)) % groups
    lo, hi = -(-group * NUM_TRAIN_TIMESTEPS // groups), -(-(group + 1) * NUM_TRAIN_TIMESTEPS // groups)
    t = lo + (torch.rand(len(x0), generator=g, dtype=torch.float64) * (hi - lo)).long()
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    xt = Schedule().q_sample(x0, t, noise)
    return [Batch(xt[i : i + batch_size], t[i : i + batch_size], y[i : i + batch_size])
            for i in range(0, len(x0), batch_size)]


def to_device(batches: list[Batch], device: torch.device) -> list[Batch]:
    return [Batch(*(None if v is None else v.to(device) for v in (b.xt, b.t, b.y, b.target))) for b in batches]


@torch.no_grad()
def add_targets(teacher: nn.Module, batches: list[Batch]) -> None:
    for b in batches:
        b.target = dit_forward(teacher, b.xt, b.t, b.y).float()


@torch.no_grad()
def distill_loss(model: nn.Module, batches: list[Batch]) -> float:
    """Mean squared error between the model's and the teacher's outputs over all held-out elements."""
    total, count = 0.0, 0
    for b in batches:
        total += (dit_forward(model, b.xt, b.t, b.y).float() - b.target).double().pow(2).sum().item()
        count += b.target.numel()
    return total / count


@torch.no_grad()
def calibrate(model: nn.Module, batch: Batch) -> None:
    """One forward pass: quantizers whose step was reset initialise it on this batch."""
    dit_forward(model, batch.xt, batch.t, batch.y)


@torch.no_grad()
def layer_macs(model: nn.Module, batch: Batch) -> dict[str, int]:
    """Multiply-accumulates per sample of every quantized layer: tokens x in x out, measured with
    forward hooks (adaLN's norm1.linear sees one vector per sample, attention and MLP one per patch)."""
    macs, handles = {}, []
    for name, layer in quant_layers(model).items():
        def hook(m, args, out, name=name):
            tokens = args[0].numel() // args[0].shape[-1]
            macs[name] = tokens // len(batch.t) * m.in_features * m.out_features
        handles.append(layer.register_forward_hook(hook))
    try:
        calibrate(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: macs[n] for n in quant_layers(model)}


def _clone_state(module: nn.Module) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in module.state_dict().items()}


Adapt = Callable[[nn.Module, "list[str] | None"], None]  # (student, changed layers or None: all) -> None


def measure_layer(student: nn.Module, name: str, bits: int, batches: list[Batch], calib: Batch,
                  adapt: Adapt | None = None) -> float:
    """Held-out distillation loss with layer ``name`` at ``bits`` (step re-initialised and calibrated,
    then ``adapt(student, [name])`` if given); the layer (or, with adapt, the whole student) is restored after."""
    quantizer = quant_layers(student)[name].act.quantizer
    restore = student if adapt is not None else quantizer
    saved = _clone_state(restore)
    try:
        quantizer.set_bits(bits, reinit=True)
        calibrate(student, calib)
        if adapt is not None:
            adapt(student, [name])
        return distill_loss(student, batches)
    finally:
        restore.load_state_dict(saved)


@torch.no_grad()
def ptq_sensitivity(teacher: nn.Module, layers: list[str], config: QuantConfig, batches: list[Batch], calib: Batch,
                    candidates: list[int]) -> dict[str, dict[int, float]]:
    """p_l(b) for every layer and width, one teacher pass per width (see the module docstring). Each
    layer gets a RobustQuantizer with the student's settings (one step: no timestep groups), initialised on ``calib``."""
    linears = {n: teacher.get_submodule(n) for n in layers}
    table: dict[str, dict[int, float]] = {n: {} for n in layers}
    for bits in candidates:
        quantizers, rotations, handles = {}, {}, []
        sums, counts, measuring = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0), [False]

        def hook(m, args, out, name):
            x_hat = quantizers[name](args[0]) @ rotations[name].T  # Q_b(x R) R^T
            if measuring[0]:
                sums[name] += (F.linear(x_hat, m.weight, m.bias) - out).double().pow(2).sum().item()
                counts[name] += out.numel()

        for n, m in linears.items():
            quantizers[n] = RobustQuantizer(
                m.in_features, bits=bits, rotation=config.rotation, block_size=config.block_size,
                random_signs=config.random_signs, seed=config.seed, signed=config.act_signed,
                mode=config.act_mode, stat=config.act_stat,
            ).to(m.weight.device)
            rotations[n] = quantizers[n].rotation_matrix(m.in_features).to(m.weight.device, m.weight.dtype)
            handles.append(m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)))
        try:
            calibrate(teacher, calib)
            measuring[0] = True
            for b in batches:
                dit_forward(teacher, b.xt, b.t, b.y)
        finally:
            for h in handles:
                h.remove()
        for n in layers:
            table[n][bits] = sums[n] / counts[n]
    return table


def digest(obj) -> str:
    """A short sha256 of tensors / nested dicts and lists of them (state dicts, batches, configs)."""
    h = hashlib.sha256()

    def feed(o):
        if torch.is_tensor(o):
            t = o.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(repr(k).encode())
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                feed(v)
        else:
            h.update(repr(o).encode())

    feed(obj)
    return h.hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a temp file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class SensitivityCache:
    """The sensitivity table on disk (JSON), rewritten atomically after every layer.

    ``fingerprint`` identifies what was measured (student and teacher weights, held-out data,
    candidates, ...); a cache with another fingerprint is refused rather than silently mixed.
    """

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path, self.fingerprint = Path(path), fingerprint
        self.data = {"fingerprint": fingerprint, "base_loss": None, "adapted_base_loss": None, "macs": None,
                     "ptq": None, "qat": {}}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"sensitivity cache {self.path} is corrupt ({e}); delete it to measure again") from None
            diff = [k for k in sorted(set(fingerprint) | set(old.get("fingerprint", {})))
                    if old.get("fingerprint", {}).get(k) != fingerprint.get(k)]
            if diff:
                what = "; ".join(f"{k}: cached {old.get('fingerprint', {}).get(k)!r}, now {fingerprint.get(k)!r}" for k in diff)
                raise ValueError(f"sensitivity cache {self.path} was measured for another setup ({what}). "
                                 "Delete it, or set another out_dir, to measure this one.")
            self.data = old

    @staticmethod
    def _table(d: dict | None) -> dict[str, dict[int, float]] | None:
        return None if d is None else {n: {int(b): s for b, s in row.items()} for n, row in d.items()}

    @property
    def qat(self) -> dict[str, dict[int, float]]:
        return self._table(self.data["qat"])

    @property
    def ptq(self) -> dict[str, dict[int, float]] | None:
        return self._table(self.data["ptq"])

    def get(self, key: str):
        return self.data.get(key)

    def update(self, **values) -> None:
        self.data.update(values)
        write_json(self.path, self.data)

    def add_row(self, layer: str, row: dict[int, float]) -> None:
        self.data["qat"][layer] = {str(b): s for b, s in row.items()}
        write_json(self.path, self.data)


def adapted_reference(student: nn.Module, batches: list[Batch], cache: SensitivityCache, adapt: Adapt) -> float:
    """L(adapt(student)) at the base widths, the reference of whole-student adaptation (cached; student restored)."""
    if cache.get("adapted_base_loss") is None:
        saved = _clone_state(student)
        try:
            adapt(student, None)
            cache.update(adapted_base_loss=distill_loss(student, batches))
        finally:
            student.load_state_dict(saved)
    return cache.get("adapted_base_loss")


def qat_sensitivity(student: nn.Module, batches: list[Batch], calib: Batch, candidates: list[int], base: int,
                    cache: SensitivityCache, reference: float, adapt: Adapt | None = None,
                    log: Callable[[str], None] = print) -> dict[str, dict[int, float]]:
    """s_l(b) = L(only l at b) - reference for every quantized layer and candidate width, resuming from
    (and extending) ``cache``."""
    layers = list(quant_layers(student))
    done = cache.qat
    if done:
        log(f"resuming: {len(done)}/{len(layers)} layers cached in {cache.path}")
    for i, name in enumerate(layers):
        if name in done:
            continue
        row = {b: 0.0 if b == base else measure_layer(student, name, b, batches, calib, adapt) - reference
               for b in candidates}
        cache.add_row(name, row)
        log(f"[{i + 1}/{len(layers)}] {name}: " + "  ".join(f"A{b} {s:+.3e}" for b, s in row.items()))
    return cache.qat
