"""The LightningModule: full-precision DiT pretraining and W1.58A2 QAT with teacher distillation."""

from __future__ import annotations

import contextlib
import copy
import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.utils import get_total_norm

from .checkpoint import safe_load
from .cuda_graph import CapturedForward, CapturedStep, GraphedBlocks, autocast_without_cache
from .diffusion import NUM_TRAIN_TIMESTEPS, Schedule, diffusion_loss
from .models import (build_dit, check_same_architecture, dit_config, dit_forward, disable_label_dropout, frozen_forward,
                     load_dit, num_classes)
from .quant import QuantConfig, act_bits, lsq_quantizers, quantize_

TASKS = ("pretrain", "qat")
NAN_POLICIES = ("stop", "skip")


class DiTModule(L.LightningModule):
    """One module, two tasks.

    * ``pretrain``: DiT's objective (noise MSE + VLB for learned sigma) on a full-precision DiT.
    * ``qat``: student = ``quantize_(copy(teacher), quant, plan)``; teacher frozen. Loss =
      distill_weight * MSE(student(x_t, t, y), teacher(x_t, t, y)) + feature_weight * mean over
      blocks of MSE(block outputs) + diffusion_weight * DiT objective.

    Labels are dropped with p = ``label_dropout`` (null class) for classifier-free guidance, the
    same ones for student and teacher. ``ema`` is an exponential moving average of the student,
    saved in checkpoints and used for evaluation. ``fused_kernels`` (qat) switches the quantized
    layers to the fused Triton rotate+quantize path (docs/PERFORMANCE.md), used on CUDA under
    bf16/fp16 autocast; checkpoints are the same either way; ``fuse_gelu`` (with ``fused_kernels``)
    also runs each MLP's GELU inside the kernels of its output projection: less memory (DiT-XL/2,
    batch 32: 2.1 GiB), a 2% slower step on an H100; ``fuse_norms`` (with ``fused_kernels``, on by
    default) computes each DiT block's adaLN inside the q/k/v and fc1 kernels, forward and
    backward (DiT-XL/2 step as a CUDA graph: 1.19x -> 1.05x a bf16 step, 5 GiB less memory);
    ``exact_rotation: false`` (with ``fused_kernels``) lets the kernels round the rotation once to
    bf16 (DiT-XL/2 on an H200: 2 ms less per step; ~0.1% of A2 codes move by one step), recorded in
    checkpoints so that the exported model computes the same integers.
    ``compile_blocks`` compiles each
    transformer block of the student and the teacher with ``torch.compile`` (in place, so parameter
    names and checkpoints do not change; the 28 identical DiT-XL/2 blocks share their compiled
    graphs): it removes most of the per-op host overhead that makes eager steps slow (DiT-XL/2 fit on
    an H100: 385 -> 292 ms per step after ~1 min of compilation, docs/PERFORMANCE.md).
    ``cuda_graph`` (one CUDA GPU) runs the first training step eagerly, then captures the step's
    forward and backward (teacher included) as one CUDA graph and replays it: the host launches one
    graph instead of thousands of kernels (robuq.cuda_graph; DiT-XL/2 fit on an H100: 449 -> 142 ms
    per step, 128 with compiled blocks). The noise, timesteps and dropped labels are drawn outside
    the graph from the same per-step generators, so a run computes the same step either way and
    resumes exactly; losses are logged, and non-finite steps reported, one step late.
    ``graph_blocks`` (CUDA, one GPU or DDP) keeps the step eager but replays each of the student's
    transformer blocks as two CUDA graphs, its forward and its backward, captured on the second
    training step (robuq.cuda_graph.GraphedBlocks): autograd and DDP's all-reduce stay outside the
    graphs, so it serves multi-GPU runs, where ``cuda_graph`` cannot, and the fused path's host
    cost per layer (Python, Triton launches) is paid once at capture; the frozen teacher's forward
    is replayed as one graph too (unless ``feature_weight`` needs its blocks' outputs). Steps of
    another batch shape run eagerly (docs/PERFORMANCE.md section 3.4).
    """

    def __init__(
        self,
        task: str = "qat",
        model: dict | None = None,
        teacher: str | None = None,
        teacher_subfolder: str | None = None,
        quant: QuantConfig | None = None,
        plan: str | None = None,
        lr: float = 1e-4,
        quant_lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        ema_decay: float = 0.9999,
        label_dropout: float = 0.1,
        distill_weight: float = 1.0,
        feature_weight: float = 0.0,
        diffusion_weight: float = 0.0,
        nan_policy: str = "stop",
        seed: int = 0,
        fused_kernels: bool = False,
        fuse_gelu: bool = False,
        fuse_norms: bool = True,
        exact_rotation: bool = True,
        compile_blocks: bool = False,
        cuda_graph: bool = False,
        graph_blocks: bool = False,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        quant = quant if quant is not None else QuantConfig()
        self.save_hyperparameters(ignore=["quant"])
        self.hparams["quant"] = quant.to_dict() if task == "qat" else None
        self.task, self.seed, self.nan_policy = task, seed, nan_policy

        if task == "pretrain":
            if (model is None) == (teacher is None):
                raise ValueError("pretrain needs exactly one of `model` (a DiT config) or `teacher` (weights to start from)")
            student = build_dit(model) if model is not None else load_dit(teacher, teacher_subfolder)
            teacher_model = None
        else:
            if teacher is None:
                raise ValueError("qat needs `teacher`: a diffusers DiT directory, hub id or robuq .ckpt")
            teacher_model = load_dit(teacher, teacher_subfolder)
            if model is not None:
                check_same_architecture(model, dit_config(teacher_model), f"teacher {teacher!r}")
            student = copy.deepcopy(teacher_model)
            teacher_model.requires_grad_(False).eval()
            disable_label_dropout(teacher_model)
        disable_label_dropout(student)
        self.model_config = dit_config(student)
        if fused_kernels and task != "qat":
            raise ValueError("fused_kernels applies to task 'qat' (it swaps the QuantLinear forward); drop it for pretrain")
        if not exact_rotation and not fused_kernels:
            raise ValueError("exact_rotation: false chooses the fused kernels' one-rounding rotation: set fused_kernels: "
                             "true as well, or drop it (the reference path always rotates exactly)")
        if cuda_graph and graph_blocks:
            raise ValueError("cuda_graph already replays the whole step, blocks included: set one of cuda_graph and "
                             "graph_blocks (graph_blocks for DDP runs)")
        if compile_blocks and graph_blocks:
            raise ValueError("graph_blocks captures each block's own forward, and compile_blocks would trace around "
                             "the replays: set one of them (graph_blocks is the faster: docs/PERFORMANCE.md 3.4)")
        if fuse_gelu and not fused_kernels:
            raise ValueError("fuse_gelu runs the GELU inside the fused kernels: set fused_kernels: true as well, or drop it")
        if task == "qat":
            self.quant_report = quantize_(student, quant, plan)
            print(self.quant_report)
            if fused_kernels:
                self.fused_layers = _use_fused_kernels(student, fuse_gelu, fuse_norms, exact_rotation)
        self.student = student.train()  # from_pretrained returns eval mode
        self.ema = copy.deepcopy(student).requires_grad_(False)
        self.register_buffer("ema_started", torch.tensor(False))
        self.__dict__["teacher"] = teacher_model  # not a submodule: never saved, never DDP-wrapped
        self._eager_until_quant_ready = compile_blocks
        if compile_blocks:  # after the EMA copy: the EMA only evaluates
            for m in (student, teacher_model):
                _compile_blocks(m)
        self.schedule = Schedule()
        self.num_classes = num_classes(student)
        self._captured = None  # the CapturedStep, from the second training step on (cuda_graph)
        self._replayed = False  # this step's backward ran inside the replayed graph
        self._eager_step_done = False  # cuda_graph captures from the second training step on
        self._pending = None  # cuda_graph: the last replayed step's report, read one step later
        self._graphed_blocks = None  # graph_blocks: the GraphedBlocks, from the second training step on
        self._teacher_graph = None  # graph_blocks: the teacher's forward as a CapturedForward, from then on
        self._ema_pairs_of_fit = None  # the EMA's tensors and the student's, listed at train start
        self._ema_known_started = False  # the host has seen ema_started set (in this fit)
        self._grad_norm = None  # this step's total gradient norm, taken for the non-finite check, reused to clip

    # ----------------------------------------------------------------------------- data of a step
    def _generator(self, *key: int) -> torch.Generator:
        """A generator seeded by (seed, step/batch, rank): exact on resume without saving RNG state."""
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.seed, self.global_rank) + key) & 0x7FFF_FFFF_FFFF)
        return g

    def _noised(self, x0: torch.Tensor, y: torch.Tensor, g: torch.Generator, drop_labels: bool):
        b = x0.shape[0]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=g, device=self.device)
        noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        if drop_labels and self.hparams.label_dropout > 0:
            drop = torch.rand(b, generator=g, device=self.device) < self.hparams.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.schedule.q_sample(x0, t, noise), t, y, noise

    def _student_forward(self, xt, t, y):
        """The student's forward; with compiled blocks, eager until every LSQ step is initialised (from
        the first batch: data-dependent, so a compiled graph would break and recompile around it)."""
        if self._eager_until_quant_ready:
            if not all(q.initialized for q in lsq_quantizers(self.student).values()):
                with torch.compiler.set_stance("force_eager"):
                    return dit_forward(self.student, xt, t, y)
            self._eager_until_quant_ready = False
        return dit_forward(self.student, xt, t, y)

    # ----------------------------------------------------------------------------- losses
    def _losses(self, x0, xt, t, y, noise) -> dict[str, torch.Tensor]:
        """The step's losses on drawn (x_t, t, y, noise): no random draws and no host syncs here, so
        that it can be captured as a CUDA graph."""
        hp = self.hparams
        want_features = self.task == "qat" and hp.feature_weight > 0
        with _block_outputs(self.student, want_features) as s_feats:
            out = self._student_forward(xt, t, y)
        losses: dict[str, torch.Tensor] = {}
        if self.task == "pretrain":
            losses["diffusion"] = diffusion_loss(self.schedule, out, x0, xt, t, noise)
            losses["loss"] = losses["diffusion"]
            return losses
        with torch.no_grad(), _block_outputs(self.teacher, want_features) as t_feats:
            target = self._teacher_forward(xt, t, y).float()
        losses["distill"] = F.mse_loss(out.float(), target)
        total = hp.distill_weight * losses["distill"]
        if want_features:
            losses["feature"] = torch.stack([F.mse_loss(a.float(), b.float()) for a, b in zip(s_feats, t_feats)]).mean()
            total = total + hp.feature_weight * losses["feature"]
        if hp.diffusion_weight > 0:
            losses["diffusion"] = diffusion_loss(self.schedule, out, x0, xt, t, noise)
            total = total + hp.diffusion_weight * losses["diffusion"]
        losses["loss"] = total
        return losses

    def _check_batch(self, x0: torch.Tensor, y: torch.Tensor) -> None:
        """Refuse data the model cannot have been meant for (latents of another VAE or image size,
        labels of another dataset) with the reason, instead of an error deep inside the DiT or,
        worse, silent training at another resolution (diffusers re-derives pos_embed for any size)."""
        cfg = self.model_config
        want = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
        if tuple(x0.shape[1:]) != want:
            raise ValueError(
                f"the data's samples have shape {list(x0.shape[1:])} but the model takes {list(want)} "
                "(in_channels, sample_size, sample_size): latents of another VAE or image size? "
                "Prepare the data for this model, or use a model config that matches the data"
            )
        if not getattr(self, "_labels_checked", False):  # once: it costs a device sync
            self._labels_checked = True
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"the data has class labels in [{int(y.min())}, {int(y.max())}] but the model "
                                 f"has {self.num_classes} classes (labels 0..{self.num_classes - 1})")

    def training_step(self, batch, batch_idx):
        x0, y = batch
        self._check_batch(x0, y)
        xt, t, y, noise = self._noised(x0, y, self._generator(self.global_step), drop_labels=True)
        losses = None
        if self.hparams.cuda_graph:
            losses = self._replay(x0, xt, t, y, noise)
            self._report_previous_step(log=losses is not None)
        if losses is not None:  # checked and logged on the GPU and one step later: the host never waits
            self._step_losses = losses
            return losses["loss"]
        with autocast_without_cache(self.device.type):  # as the replayed step runs: bit for bit the same (GPU test)
            if self.hparams.graph_blocks:
                self._graph_blocks(xt, t, y)
            losses = self._losses(x0, xt, t, y, noise)
        loss = losses["loss"]
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every rank skips or stops together, else DDP hangs in backward
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            here = f"({loss.item()})" if not torch.isfinite(loss) else f"on another rank (here {loss.item():.4g})"
            msg = f"non-finite training loss {here} at step {self.global_step}; {self._first_bad_quantizer()}"
            if self.nan_policy == "skip":
                rank_zero_warn(msg + "; skipping this step (nan_policy=skip)")
                # Not `return None` (Lightning refuses it under DDP): a loss with zero gradient for
                # every weight keeps all ranks in the gradient all-reduce; the update is then dropped.
                self._skip_update = True
                return torch.stack([p.sum() for p in self.student.parameters() if p.requires_grad]).sum() * 0.0
            raise FloatingPointError(msg + ". The last checkpoint is intact; lower the lr or set nan_policy=skip.")
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def _replay(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """cuda_graph: the step (forward and backward) replayed from the captured graph, captured on
        the second training step of this process (the first, eager, initialises the LSQ steps, the
        EMA, the optimizer state and any compiled blocks); None where the step must run eagerly."""
        self._replayed = False
        if self._captured is None:
            if not self._eager_step_done:
                self._eager_step_done = True
                return None
            self._captured = CapturedStep(self._losses, list(self.student.parameters()), inputs)
        losses = self._captured(*inputs)
        self._replayed = losses is not None  # None: another batch shape (e.g. a last, smaller batch)
        return losses

    def _teacher_forward(self, xt, t, y) -> torch.Tensor:
        """The frozen teacher's forward: replayed from its graph (graph_blocks) where it fits, else eager."""
        out = None if self._teacher_graph is None else self._teacher_graph(xt, t, y)
        return frozen_forward(self.teacher, xt, t, y) if out is None else out

    def _graph_blocks(self, xt, t, y) -> None:
        """graph_blocks: capture the student's blocks (and the teacher's forward) on this process's second
        training step (the first, eager, initialises the LSQ steps and the optimizer state)."""
        if self._graphed_blocks is not None:
            return
        if not self._eager_step_done:
            self._eager_step_done = True
            return
        self._graphed_blocks = GraphedBlocks(self.student.transformer_blocks, lambda: self._student_forward(xt, t, y))
        if self.teacher is not None and not self.hparams.feature_weight > 0:  # (features come from hooks)
            self._teacher_graph = CapturedForward(lambda *a: frozen_forward(self.teacher, *a), (xt, t, y))

    def _gate_replayed_step(self, optimizer) -> None:
        """cuda_graph: check the replayed step on the GPU instead of the host. A non-finite loss or
        gradient sets ``found_inf``, and the fused AdamW skips the update on the GPU (as it does under
        fp16 loss scaling); the losses and the flag go to pinned host memory, read one step later."""
        losses = torch.stack([v.detach().float() for v in self._step_losses.values()])
        self._grad_norm = get_total_norm([g for g in self._captured.grads if g is not None])
        bad = (~torch.isfinite(self._grad_norm + losses.sum())).float()
        optimizer.found_inf = bad
        report = torch.cat([losses, self._grad_norm.float().reshape(1), bad.reshape(1)])
        host = torch.empty(report.shape, dtype=report.dtype, pin_memory=True).copy_(report, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending = (self.global_step, [*self._step_losses, "grad_norm"], host, done)

    def _report_previous_step(self, log: bool = True) -> None:
        """cuda_graph: the previous replayed step's losses and non-finite check, read once the GPU has
        finished that step (it runs the step just launched meanwhile), and acted on as ``nan_policy``
        says. A bad step's update was skipped on the GPU; only the EMA took one more step towards the
        unchanged weights."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step, names, host, done = pending
        done.synchronize()
        values = host.clone()
        if values[-1] > 0:
            msg = (f"non-finite loss or gradient at step {step} (losses {dict(zip(names, values.tolist()))}; the "
                   f"update was skipped on the GPU); {self._first_bad_quantizer()}")
            if self.nan_policy == "stop":
                raise FloatingPointError(msg + ". The weights and the last checkpoint are intact; lower the lr or "
                                         "set nan_policy=skip.")
            rank_zero_warn(msg + "; skipped (nan_policy=skip)")
        if log:  # host tensors: the progress bar's .item() does not wait for the GPU
            self.log_dict({f"train/{k}": v for k, v in zip(names, values)}, prog_bar=True, batch_size=1)

    def on_train_end(self) -> None:
        self._report_previous_step(log=False)
        if self._graphed_blocks is not None:  # the graphs hold their memory pool; a next fit captures anew
            self._graphed_blocks.restore()
            self._graphed_blocks, self._teacher_graph, self._eager_step_done = None, None, False
        self._ema_pairs_of_fit = None  # the module may move before the next fit

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if not self._replayed:  # else the replayed graph has computed this step's gradients
            super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if not self._replayed:  # the replay overwrites its gradients; zeroing would detach them
            optimizer.zero_grad()

    def _first_bad_quantizer(self) -> str:
        for name, q in lsq_quantizers(self.student).items():
            if not torch.isfinite(q.step).all():
                return f"first quantizer with a non-finite step: {name} (step={q.step.detach().cpu().tolist()})"
        for name, p in self.student.named_parameters():
            if not torch.isfinite(p).all():
                return f"all quantizer steps are finite; first non-finite weight: {name}"
        return "all quantizer steps are finite (and all weights: the batch or the forward made the NaN/Inf)"

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        self._check_batch(x0, y)
        losses = self._losses(x0, *self._noised(x0, y, self._generator(-1, batch_idx), drop_labels=False))
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=x0.shape[0])

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        hp = self.hparams
        steps = [p for n, p in self.student.named_parameters() if n.endswith("quantizer.step")]
        step_ids = {id(p) for p in steps}
        weights = [p for p in self.student.parameters() if id(p) not in step_ids and p.requires_grad]
        groups = [{"params": weights, "lr": hp.lr, "weight_decay": hp.weight_decay}]
        if steps:
            groups.append({"params": steps, "lr": hp.quant_lr, "weight_decay": 0.0})
        # fused on CUDA (a few launches per step; it can skip a bad step on the GPU, which cuda_graph
        # uses), but not under fp16 loss scaling, where Lightning must unscale before clipping
        fused = self.device.type == "cuda" and getattr(self.trainer.precision_plugin, "scaler", None) is None
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if hp.lr_schedule == "cosine" else 1

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.lr_schedule == "cosine":
                progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, without its refusal of fused optimizers (it assumes they unscale fp16
        gradients themselves; ours is fused only where no loss scaler runs, configure_optimizers), and
        by the total norm on_before_optimizer_step has already taken for its non-finite check."""
        norm, self._grad_norm = self._grad_norm, None
        if not optimizer.defaults.get("fused"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            elif norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give non-finite gradients (overflow in backward); stepping on
        them would write NaN weights into the next checkpoint. ``stop`` raises before the step,
        ``skip`` drops this step's update. (With fp16's GradScaler, the scaler does this itself.)"""
        if self._replayed:
            self._gate_replayed_step(optimizer)
            return
        optimizer.__dict__.pop("found_inf", None)  # set by a replayed step; an eager step checks on the host
        if getattr(self, "_skip_update", False):  # training_step found a non-finite loss (nan_policy=skip)
            for p in self.student.parameters():
                p.grad = None
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if not grads:
            return
        self._grad_norm = get_total_norm(grads)
        if torch.isfinite(self._grad_norm):  # (DDP: gradients are already all-reduced, so every rank decides the same)
            self.log("train/grad_norm", self._grad_norm)
            return
        name = next((n for n, p in self.student.named_parameters()
                     if p.grad is not None and not torch.isfinite(p.grad).all()), None)
        first = f"first: {name}" if name else "every gradient is finite, their total norm overflowed"
        msg = f"non-finite gradient at step {self.global_step} ({first}); {self._first_bad_quantizer()}"
        if self.nan_policy == "skip":
            rank_zero_warn(msg + "; skipping this step's update (nan_policy=skip)")
            self._skip_update = True
            for p in self.student.parameters():
                p.grad = None
            return
        raise FloatingPointError(msg + ". The last checkpoint is intact; lower the lr or set nan_policy=skip.")

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if getattr(self, "_skip_update", False):  # a skipped step (nan_policy=skip) moves nothing, EMA included
            self._skip_update = False
            return
        self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema = decay * ema + (1 - decay) * student; buffers and quantizer widths copied. The first
        update starts the EMA as a copy. The host remembers that it has started: reading the flag
        on the GPU would make the host wait for the GPU on every step."""
        if not self._ema_known_started:
            self._ema_known_started = True
            if not self.ema_started:
                self.ema.load_state_dict(self.student.state_dict())
                self.ema_started.fill_(True)
                return
        pairs = self._ema_pairs_of_fit or self._ema_pairs()
        torch._foreach_lerp_(pairs["ema"], pairs["student"], 1 - self.hparams.ema_decay)
        if pairs["ema_buffers"]:
            torch._foreach_copy_(pairs["ema_buffers"], pairs["student_buffers"])
        for e, s in pairs["quantizers"]:
            e.set_extra_state(s.get_extra_state())

    def _ema_pairs(self) -> dict[str, list]:
        """The EMA's tensors and quantizers with the student's. Listed once per fit in
        on_train_start, after Lightning has placed the module: walking DiT-XL/2's ~1500 modules for
        them on every step took ~30 ms of host time."""
        return {
            "ema": list(self.ema.parameters()),
            "student": list(self.student.parameters()),
            "ema_buffers": list(self.ema.buffers()),
            "student_buffers": list(self.student.buffers()),
            "quantizers": list(zip(lsq_quantizers(self.ema).values(), lsq_quantizers(self.student).values())),
        }

    def on_train_start(self) -> None:
        self._ema_pairs_of_fit = self._ema_pairs()
        self._ema_known_started = False  # (a restored checkpoint has set ema_started)

    # ----------------------------------------------------------------------------- devices & checkpoints
    def on_fit_start(self) -> None:
        self._move_teacher_and_schedule()
        if self.hparams.cuda_graph:
            self._check_cuda_graph()
        if self.hparams.graph_blocks:
            self._check_graph_blocks()

    def _check_cuda_graph(self) -> None:
        """Refuse the settings a captured step cannot honour, before the first step."""
        trainer, fix = self.trainer, "set cuda_graph: false"
        if self.device.type != "cuda":
            raise ValueError(f"cuda_graph captures the step on a CUDA GPU, but this run is on {self.device.type}; {fix}")
        if trainer.world_size > 1:
            raise ValueError(f"cuda_graph captures one process's step, but this run has {trainer.world_size} "
                             "processes (DDP's gradient all-reduce runs inside backward and is not captured); "
                             f"train on one GPU or {fix}")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"cuda_graph: each replay overwrites the gradients, so accumulate_grad_batches="
                             f"{trainer.accumulate_grad_batches} cannot accumulate them; use 1 or {fix}")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("cuda_graph: fp16 loss scaling changes the scale between steps; use precision "
                             f"bf16-mixed or 32, or {fix}")

    def _check_graph_blocks(self) -> None:
        """Refuse the settings that graphed blocks cannot honour, before the first step."""
        fix = "set graph_blocks: false"
        if self.device.type != "cuda":
            raise ValueError(f"graph_blocks replays CUDA graphs, but this run is on {self.device.type}; {fix}")
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError("graph_blocks: each block's replay rewrites the gradients it returned, so "
                             f"accumulate_grad_batches={self.trainer.accumulate_grad_batches} cannot accumulate them; "
                             f"use 1 or {fix}")
        if not hasattr(self.student, "transformer_blocks"):
            raise ValueError(f"graph_blocks graphs a DiT's transformer_blocks; {type(self.student).__name__} has none; {fix}")

    def on_validation_start(self) -> None:
        self._move_teacher_and_schedule()

    def _move_teacher_and_schedule(self) -> None:
        self.schedule = self.schedule.to(self.device)
        if self.teacher is not None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            nn.Module.to(self.teacher, device=self.device, dtype=dtype)  # diffusers' .to() warns needlessly

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["robuq"] = {
            "task": self.task,
            "model_config": self.model_config,
            "quant": self.hparams["quant"],
            "plan": act_bits(self.student) if self.task == "qat" else None,
            "exact_rotation": self.hparams.exact_rotation,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("robuq")
        if not isinstance(meta, dict) or not {"task", "model_config", "quant"} <= set(meta):
            raise ValueError("this checkpoint was not written by robuq's DiTModule (no complete 'robuq' entry)")
        if meta["task"] != self.task:
            raise ValueError(f"checkpoint is a {meta['task']!r} run, this run is {self.task!r}")
        check_same_architecture(meta["model_config"], self.model_config, "the checkpoint's model")
        if meta["quant"] != self.hparams["quant"]:
            raise ValueError(f"the checkpoint was trained with quant config {meta['quant']}, this run has {self.hparams['quant']}")
        if self.task == "qat" and meta.get("plan") is not None:
            # the quantizers' saved widths would silently override this run's plan
            ours = act_bits(self.student)
            diff = {n: (b, ours.get(n)) for n, b in meta["plan"].items() if ours.get(n) != b}
            diff.update({n: (None, b) for n, b in ours.items() if n not in meta["plan"]})
            if diff:
                shown = ", ".join(f"{n}: {a} -> {b}" for n, (a, b) in list(diff.items())[:5])
                raise ValueError(f"the checkpoint was trained with another bit plan ({len(diff)} layer(s) differ, "
                                 f"checkpoint -> this run: {shown}); resume with the plan it was trained with")


@contextlib.contextmanager
def _block_outputs(model: nn.Module, enabled: bool):
    """Collect the hidden states after every transformer block (for the feature-distillation loss)."""
    outputs: list[torch.Tensor] = []
    handles = []
    if enabled:
        for block in model.transformer_blocks:
            handles.append(block.register_forward_hook(lambda m, a, out: outputs.append(out)))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def load_for_eval(path: str, use_ema: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the student (or teacher) of a robuq checkpoint for sampling: (model in eval mode, info)."""
    ckpt = safe_load(path)
    meta = ckpt.get("robuq") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a robuq training checkpoint (no 'robuq' metadata or state_dict)")
    model = build_dit(meta["model_config"])
    disable_label_dropout(model)
    if meta["task"] == "qat":
        config = QuantConfig.from_dict(meta["quant"])
        # widths equal to the config's default are implied (16 = full precision is no plan width)
        plan = {n: b for n, b in (meta["plan"] or {}).items() if b != config.act_bits}
        quantize_(model, config, plan=plan)
    prefix = "ema." if use_ema and bool(ckpt["state_dict"].get("ema_started", False)) else "student."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model its metadata describes: {e}") from None
    info = {
        "checkpoint": str(path),
        "task": meta["task"],
        "weights": prefix.rstrip("."),
        "global_step": ckpt.get("global_step"),
        "quant": meta["quant"],
        "plan": meta["plan"],
        "exact_rotation": meta.get("exact_rotation", True),  # (checkpoints before it: always exact)
    }
    return model.eval(), info


def _compile_blocks(model: nn.Module | None) -> None:
    """``torch.compile`` each block of ``model.transformer_blocks`` in place (``nn.Module.compile``)."""
    if model is None:
        return
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no transformer_blocks to compile; "
                         "set compile_blocks: false")
    for block in blocks:
        block.compile()


def _use_fused_kernels(student: nn.Module, fuse_gelu: bool, fuse_norms: bool, exact_rotation: bool) -> dict[str, bool]:
    """Switch the student's QuantLinears to the fused Triton path (robuq.kernels.qat): it runs on CUDA
    under bf16/fp16 autocast (``--trainer.precision bf16-mixed``) and falls back to the reference
    path elsewhere, so results do not depend on the switch beyond float rounding."""
    try:
        from robuq.kernels.qat import use_fused_kernels
    except ImportError as e:
        raise ImportError(f"fused_kernels needs triton ({e}); install it (it comes with CUDA torch) or set "
                          "fused_kernels: false") from e
    fused = use_fused_kernels(student, fuse_activations=fuse_gelu, fuse_norms=fuse_norms, exact_rotation=exact_rotation)
    print(f"fused Triton QAT path on {sum(fused.values())}/{len(fused)} quantized layers "
          "(active on CUDA under bf16/fp16 autocast)")
    return fused
