"""Gradient clipping and the logged gradient norm of DiTModule: the fused-AdamW path (CUDA runs)
clips by the norm its non-finite check already took, and must clip as Lightning's own clipping does."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from robuq.module import DiTModule


class _FusedOnCPU(DiTModule):
    """configure_optimizers with ``fused=True`` where the GPU run would have it (torch has a fused CPU
    AdamW), so the module's own clipping runs instead of Lightning's."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        opt = config["optimizer"]
        groups = [{k: g[k] for k in ("params", "lr", "weight_decay")} for g in opt.param_groups]
        fused = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=True)
        factor = config["lr_scheduler"]["scheduler"].lr_lambdas[0]
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(fused, factor)
        return {**config, "optimizer": fused}


class _Grads(L.Callback):
    """The norm of the gradients the optimizer stepped on (clipped in place), per step."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.student.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


def _fit(tiny_teacher, cls, clip, algorithm="norm"):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 1, 32, 32), torch.randint(0, 10, (24,)))
    module = cls(teacher=tiny_teacher, lr=1e-3, ema_decay=0.9)
    grads = _Grads()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, gradient_clip_val=clip, gradient_clip_algorithm=algorithm,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[grads])
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module, grads.norms, trainer


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_optimizer_clips_as_lightning_does(tiny_teacher, algorithm):
    clip = 1e-3 if algorithm == "norm" else 1e-5  # small enough that every step is clipped
    ours, our_norms, trainer = _fit(tiny_teacher, _FusedOnCPU, clip, algorithm)
    assert trainer.optimizers[0].defaults["fused"]
    lightning, their_norms, _ = _fit(tiny_teacher, DiTModule, clip, algorithm)
    torch.testing.assert_close(torch.tensor(our_norms), torch.tensor(their_norms), rtol=1e-4, atol=0)
    if algorithm == "norm":
        assert all(abs(n - clip) < 1e-6 for n in our_norms)
    for a, b in zip(ours.student.parameters(), lightning.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_norm_is_logged_before_clipping(tiny_teacher):
    _, norms, trainer = _fit(tiny_teacher, _FusedOnCPU, 1e-3)
    logged = float(trainer.callback_metrics["train/grad_norm"])
    assert logged > 1e-3 and abs(norms[-1] - 1e-3) < 1e-6  # the norm before clipping, not after
