"""The `search` job: AMPN sensitivities + allocation -> a bit plan `fit` reads, and its heatmap.

    python -m robuq.ampn.search --config configs/search_fmnist.yaml

Input: a QAT checkpoint at the base width, or a teacher plus a short QAT warm-up at the base width
run here. Output in ``out_dir``: ``sensitivity.json`` (the tables; also the resumable cache),
``plan.yaml`` (robuq.quant.BitPlan: ``fit --model.plan out_dir/plan.yaml``) and ``plan.png``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from robuq.ampn.allocate import METHODS, allocate, check_feasible, constrain
from robuq.ampn.heatmap import save_plan
from robuq.ampn.sensitivity import (
    Batch,
    SensitivityCache,
    adapted_reference,
    add_targets,
    calibrate,
    digest,
    distill_loss,
    layer_macs,
    ptq_sensitivity,
    qat_sensitivity,
    stratified_batches,
    to_device,
)
from robuq.checkpoint import atomic_torch_save, safe_load
from robuq.diffusion import NUM_TRAIN_TIMESTEPS, Schedule
from robuq.models import disable_label_dropout, dit_forward, load_dit, num_classes
from robuq.quant import QuantConfig, act_bits, quant_layers, quantize_, set_act_bits
from robuq.quant.plan import PLAN_BITS

console = Console(stderr=True, soft_wrap=True)
WEIGHTINGS = ("macs", "uniform")
ADAPT_SCOPES = ("step", "model")


def distill_steps(student: nn.Module, teacher: nn.Module, batches, steps: int, lr: float, quant_lr: float,
                  label_dropout: float, seed: int, log_every: int = 0, only_steps_of: list[str] | None = None) -> None:
    """``steps`` AdamW steps of MSE(student(x_t, t, y), teacher(x_t, t, y)) as in ``fit``'s QAT: t uniform,
    labels dropped with p=label_dropout, steps learned at their own lr, gradients clipped at 1, bf16
    autocast on CUDA. ``batches`` yields (x0, y); t, noise and drops are seeded by ``seed``.
    ``only_steps_of``: train only these layers' LSQ steps (everything else stays as it is)."""
    device = next(student.parameters()).device
    if only_steps_of is not None:
        layers = quant_layers(student)
        step_params, weights = [layers[n].act.quantizer.step for n in only_steps_of], []
    else:
        step_params = [p for n, p in student.named_parameters() if n.endswith("quantizer.step")]
        ids = {id(p) for p in step_params}
        weights = [p for p in student.parameters() if id(p) not in ids and p.requires_grad]
    opt = torch.optim.AdamW([{"params": weights, "lr": lr}, {"params": step_params, "lr": quant_lr}], weight_decay=0.0)
    g, schedule, null = torch.Generator().manual_seed(seed), Schedule(), num_classes(teacher)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    student.train()
    for step in range(steps):
        x0, y = next(batches)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(y),), generator=g)
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        y = torch.where(torch.rand(len(y), generator=g) < label_dropout, null, y)
        xt, t, y = (v.to(device) for v in (schedule.q_sample(x0, t, noise), t, y))
        with autocast:
            out = dit_forward(student, xt, t, y)
            with torch.no_grad():
                target = dit_forward(teacher, xt, t, y)
        loss = F.mse_loss(out.float(), target.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite distillation loss at step {step}; lower lr / quant_lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            console.print(f"warm-up step {step + 1}/{steps}: distill {loss.item():.4e}")
    student.zero_grad(set_to_none=True)
    student.eval()


def forever(loader):
    while True:
        yield from loader


def describe(data: L.LightningDataModule) -> dict:
    """The datamodule's class and own plain settings but num_workers (for fingerprints)."""
    skip = {*vars(L.LightningDataModule()), "num_workers"}
    plain = {k: v for k, v in vars(data).items()
             if k not in skip and not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
    return {"class": f"{type(data).__module__}.{type(data).__qualname__}", **plain}


def refuse_mismatch(path: Path, saved: dict, now: dict, what: str) -> None:
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        lines = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise ValueError(f"{path} holds a {what} made with other settings ({lines}). "
                         "Delete it, or set another out_dir, to start over.")


def from_checkpoint(checkpoint: str, teacher: str | None, teacher_subfolder: str | None, use_ema: bool):
    """(student, teacher source, quant config) of a robuq QAT checkpoint; the teacher defaults to the run's."""
    from robuq.module import load_for_eval

    student, info = load_for_eval(checkpoint, use_ema=use_ema)
    if info["task"] != "qat":
        raise ValueError(f"{checkpoint} is a {info['task']!r} checkpoint, not a QAT one: pass it as `teacher` "
                         "with warmup_steps > 0, or give a checkpoint of `fit` with task qat")
    if teacher is None:
        hparams = safe_load(checkpoint).get("hyper_parameters", {})
        teacher, teacher_subfolder = hparams.get("teacher"), hparams.get("teacher_subfolder")
        if teacher is None:
            raise ValueError(f"{checkpoint} does not name its teacher; set `teacher`")
    return student, load_dit(teacher, teacher_subfolder), QuantConfig.from_dict(info["quant"])


def warmed_up(teacher: nn.Module, quant: QuantConfig, data: L.LightningDataModule, out: Path, settings: dict) -> nn.Module:
    """quantize_(copy of teacher) QAT-adapted at the base width by ``settings["steps"]`` distillation steps,
    saved to (and on a rerun loaded from) out/warmup.pt."""
    student = copy.deepcopy(teacher)
    quantize_(student, quant)
    path = out / "warmup.pt"
    if path.is_file():
        saved = safe_load(path)
        refuse_mismatch(path, saved["settings"], settings, "warm-up")
        student.load_state_dict(saved["state_dict"])
        console.print(f"warm-up loaded from {path}")
        return student.eval()
    data.setup("fit")
    student.to(next(teacher.parameters()).device)
    distill_steps(student, teacher, forever(data.train_dataloader()), settings["steps"], settings["lr"],
                  settings["quant_lr"], settings["label_dropout"], settings["seed"], log_every=max(1, settings["steps"] // 10))
    atomic_torch_save({"settings": settings, "state_dict": {k: v.cpu() if torch.is_tensor(v) else v
                                                            for k, v in student.state_dict().items()}}, path)
    return student


def heldout(data: L.LightningDataModule, split: str, size: int, groups: int, seed: int) -> tuple[list[Batch], Batch]:
    """The first ``size`` samples of ``split`` as noised batches (the loader's batch size), timesteps stratified
    over ``groups``, and a calibration batch of the next samples."""
    data.setup("test" if split == "test" else "validate")
    xs, ys = [], []
    for x0, y in getattr(data, f"{split}_dataloader")():
        xs.append(x0), ys.append(y)
        if sum(map(len, ys)) >= size + len(ys[0]):
            break
    if not ys:
        raise ValueError(f"the datamodule's {split} split is empty: set heldout_split to a split it has")
    batch_size = len(ys[0])
    x0, y = torch.cat(xs), torch.cat(ys)
    if len(y) < size + batch_size:
        raise ValueError(f"the {split} split has {len(y)} samples but heldout_size {size} plus a calibration batch "
                         f"need {size + batch_size}: lower heldout_size")
    held = stratified_batches(x0[:size], y[:size], batch_size, groups, seed)
    calib = stratified_batches(x0[size : size + batch_size], y[size : size + batch_size], batch_size, groups, seed + 1)
    return held, calib[0]


def search(
    checkpoint: str | None = None,
    teacher: str | None = None,
    teacher_subfolder: str | None = None,
    use_ema: bool = True,
    quant: QuantConfig | None = None,
    data: L.LightningDataModule | None = None,
    warmup_steps: int = 500,
    lr: float = 2e-4,
    quant_lr: float = 1e-3,
    label_dropout: float = 0.1,
    candidates: list[int] = [1, 2, 3, 4, 8],  # noqa: B006 (never mutated; a list for the CLI)
    budget: float = 2.0,
    weighting: str = "macs",
    method: str = "dp",
    pinned: dict[str, int] | None = None,
    min_bits: dict[str, int] | None = None,
    heldout_split: str = "test",
    heldout_size: int = 1024,
    timestep_groups: int = 10,
    adapt_steps: int = 0,
    adapt_scope: str = "step",
    ptq: bool = True,
    verify: bool = True,
    max_states: int = 1 << 20,
    seed: int = 0,
    device: str = "auto",
    out_dir: str = "out/search",
) -> dict:
    """Measure sensitivities, allocate widths under the budget, write plan.yaml, plan.png and sensitivity.json.

    Args:
        checkpoint: robuq `.ckpt` of a QAT run at one (base) width (EMA weights if use_ema).
        teacher: full-precision DiT (diffusers dir / hub id). Default with a checkpoint: the run's teacher.
        teacher_subfolder: subfolder of `teacher` (e.g. "transformer" of a hub pipeline).
        use_ema: take the checkpoint's EMA weights.
        quant: quantization of the warm-up student (default QuantConfig()); its act_bits is the base width.
        data: LightningDataModule for warm-up/adaptation (train) and measuring (`heldout_split`); its
            batch size is used for both. Default: Fashion-MNIST, batch 128.
        warmup_steps: without a checkpoint, QAT distillation steps from the teacher at the base width
            (saved to out_dir/warmup.pt and reused on a rerun).
        lr: learning rate of the warm-up / adaptation (AdamW).
        quant_lr: learning rate of the quantizer steps.
        label_dropout: probability of the null label in warm-up / adaptation batches.
        candidates: activation widths to choose from, in 1..8; must include the base width.
        budget: average activation bits allowed (<=).
        weighting: "macs" (average weighted by each layer's MACs per forward) or "uniform".
        method: "dp" (exact) or "lagrangian" (equal slopes); the other is reported as a cross-check.
        pinned: layer name or fnmatch pattern -> fixed width.
        min_bits: layer name or fnmatch pattern -> smallest allowed width.
        heldout_split: datamodule split measured on ("test" or "val").
        heldout_size: held-out samples; the next batch of the split calibrates re-initialised steps.
        timestep_groups: held-out timesteps are stratified over this many equal ranges.
        adapt_steps: distillation steps after each width change, before measuring (0: none).
        adapt_scope: what those steps train: "step" (the changed layers' LSQ steps only) or "model"
            (the whole student, measured against the student adapted alike at the base widths; on the
            Fashion-MNIST default 5 such steps with a fresh AdamW raised the base loss 1.7x, see docs/AMPN.md).
        ptq: also measure the PTQ sensitivity (layer output MSE on the FP teacher) and the plan it gives.
        verify: measure the loss with the whole plan applied (vs the additive prediction).
        max_states: DP cost states above which the budget grid is coarsened (see allocate_dp).
        seed: held-out noise and timesteps, warm-up and adaptation randomness.
        device: "auto" (cuda if available), "cpu", "cuda", ...
        out_dir: outputs, the warm-up and the resumable cache.
    """
    start = time.time()
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    candidates = sorted(set(candidates))
    if not candidates or any(b not in PLAN_BITS for b in candidates):
        raise ValueError(f"candidates must be widths in 1..8, got {candidates}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        from robuq.data.fmnist import FashionMNISTDataModule

        data = FashionMNISTDataModule(batch_size=128)

    # --- the teacher and the student, QAT-adapted at the base width
    if checkpoint is not None:
        if quant is not None:
            raise ValueError("`quant` comes from the checkpoint: drop it, or drop `checkpoint` to warm up a new student")
        student, teacher_model, quant = from_checkpoint(checkpoint, teacher, teacher_subfolder, use_ema)
        source = str(checkpoint)
    elif teacher is None:
        raise ValueError("give `checkpoint` (a QAT run) or `teacher` (with warmup_steps > 0) to search from")
    elif warmup_steps <= 0:
        raise ValueError("sensitivities must reflect QAT: with a teacher and no checkpoint, set warmup_steps > 0")
    else:
        quant = quant or QuantConfig()
        teacher_model = load_dit(teacher, teacher_subfolder)
        source = f"{teacher} + {warmup_steps} warm-up steps"
    disable_label_dropout(teacher_model)
    teacher_model = nn.Module.to(teacher_model.float().eval().requires_grad_(False), dev)
    teacher_digest = digest(teacher_model.state_dict())
    train = dict(lr=lr, quant_lr=quant_lr, label_dropout=label_dropout, seed=seed, data=describe(data))
    if checkpoint is None:
        settings = dict(teacher=teacher_digest, quant=quant.to_dict(), steps=warmup_steps, **train)
        student = warmed_up(teacher_model, quant, data, out, settings)
    student = nn.Module.to(student.float().eval(), dev)
    widths = set(act_bits(student).values())
    if len(widths) != 1:
        raise ValueError(f"the student has mixed activation widths {sorted(widths)}; AMPN measures from a model "
                         "QAT-adapted at one base width")
    base = widths.pop()
    if base not in PLAN_BITS:
        raise ValueError(f"the student's activations are not quantized (act_bits {base}): AMPN needs a QAT student")
    if base not in candidates:
        raise ValueError(f"candidates {candidates} must include the base width {base} (its sensitivity is 0)")

    # --- held-out data, MACs and the constraints, checked before the long part
    held, calib = heldout(data, heldout_split, heldout_size, timestep_groups, seed)
    fingerprint = dict(student=digest(student.state_dict()), teacher=teacher_digest,
                       heldout=digest([[b.xt, b.t, b.y] for b in [*held, calib]]), candidates=candidates,
                       base_bits=base, quant=quant.to_dict(), adapt_steps=adapt_steps)
    held, calib = to_device(held, dev), to_device([calib], dev)[0]
    add_targets(teacher_model, held)
    macs = layer_macs(student, calib)  # its forward also initialises any quantizer not yet initialised
    weights = macs if weighting == "macs" else dict.fromkeys(macs, 1)
    check_feasible(constrain({n: dict.fromkeys(candidates, 0.0) for n in macs}, pinned, min_bits), weights, budget)

    adapt = None
    if adapt_scope not in ADAPT_SCOPES:
        raise ValueError(f"adapt_scope must be one of {ADAPT_SCOPES}, got {adapt_scope!r}")
    if adapt_steps > 0:
        fingerprint["adapt"] = dict(train, scope=adapt_scope)
        data.setup("fit")
        fixed = [b for b, _ in zip(forever(data.train_dataloader()), range(adapt_steps))]

        def adapt(model: nn.Module, layers: list[str] | None) -> None:
            only = (layers or list(quant_layers(model))) if adapt_scope == "step" else None
            distill_steps(model, teacher_model, iter(fixed), adapt_steps, lr, quant_lr, label_dropout, seed,
                          only_steps_of=only)

    # --- sensitivities, cached after every layer
    cache = SensitivityCache(out / "sensitivity.json", fingerprint)
    if cache.get("base_loss") is None:
        cache.update(source=source, base_bits=base, candidates=candidates, macs=macs, base_loss=distill_loss(student, held))
    base_loss = cache.get("base_loss")
    console.print(f"base: A{base} everywhere, held-out distillation loss {base_loss:.4e}")
    if ptq and cache.get("ptq") is None:
        table = ptq_sensitivity(teacher_model, list(macs), quant, held, calib, candidates)
        cache.update(ptq={n: {str(b): s for b, s in row.items()} for n, row in table.items()})
    reference = adapted_reference(student, held, cache, adapt) if adapt and adapt_scope == "model" else base_loss
    table = qat_sensitivity(student, held, calib, candidates, base, cache, reference, adapt, log=console.print)

    # --- allocation, its cross-check and comparisons
    kw = dict(pinned=pinned, min_bits=min_bits, max_states=max_states)
    plan_kw = dict(budget=budget, weighting=weighting, candidates=candidates, method=method, weights=weights)
    best = allocate(table, weights, budget, method, **kw)
    other = allocate(table, weights, budget, "lagrangian" if method == "dp" else "dp", **kw)
    report = dict(base_bits=base, base_loss=base_loss, predicted_loss_increase=best.predicted,
                  average_bits=best.average_bits, **best.detail,
                  cross_check=dict(method=other.method, predicted_loss_increase=other.predicted,
                                   average_bits=other.average_bits, **other.detail))
    if ptq:
        guided = allocate(cache.ptq, weights, budget, method, **kw)
        report["ptq_guided"] = dict(layers_differing=sum(guided.bits[n] != b for n, b in best.bits.items()),
                                    predicted_loss_increase=sum(table[n][b] for n, b in guided.bits.items()),
                                    average_bits=guided.average_bits, plan="plan_ptq.yaml")
        save_plan(guided.bits, out / "plan_ptq.yaml", label="PTQ-guided", average_bits=guided.average_bits,
                  source=f"{source} (PTQ sensitivity of the FP teacher)", report=report["ptq_guided"], **plan_kw)
    if verify:
        changed = [n for n, b in best.bits.items() if b != base]
        set_act_bits(student, {n: best.bits[n] for n in changed}, reinit=True)
        calibrate(student, calib)
        if adapt is not None and (changed or adapt_scope == "model"):  # as the reference was
            adapt(student, changed)
        report["measured_loss_increase"] = distill_loss(student, held) - reference

    save_plan(best.bits, out / "plan.yaml", label="AMPN", average_bits=best.average_bits, source=source, report=report,
              note=f"predicted loss increase {best.predicted:+.2e} over A{base} ({base_loss:.2e})", **plan_kw)
    return dict(plan=str(out / "plan.yaml"), heatmap=str(out / "plan.png"), table=str(cache.path), **report,
                wall_time_s=round(time.time() - start, 1))


def main(args: list[str] | None = None) -> dict:
    from jsonargparse import auto_cli

    summary = auto_cli(search, args=args, as_positional=False)
    console.print_json(data=summary)
    return summary


if __name__ == "__main__":
    main()
