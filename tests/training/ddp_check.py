"""Run by test_ddp.py: 2-process CPU DDP (gloo) QAT; rank 0 writes what every rank ended with."""

import json
import sys

import lightning as L
import torch

from robuq.data.fmnist import FashionMNISTDataModule
from robuq.module import DiTModule
from robuq.quant import lsq_quantizers


class Gather(L.Callback):
    def __init__(self, out):
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].double().sum().item())

    def on_train_end(self, trainer, pl_module):
        steps = torch.cat([q.step.detach().flatten() for q in lsq_quantizers(pl_module.student).values()])
        ema = torch.cat([p.detach().flatten() for p in pl_module.ema.parameters()])
        gathered = {k: trainer.strategy.all_gather(v).tolist() for k, v in
                    {"steps": steps, "ema": ema.sum().reshape(1), "batches": torch.tensor(self.batches)}.items()}
        if trainer.is_global_zero:
            json.dump({"world_size": trainer.world_size, **gathered}, open(self.out, "w"))


if __name__ == "__main__":
    teacher, out = sys.argv[1:3]
    torch.manual_seed(0)
    model = DiTModule(task="qat", teacher=teacher, ema_decay=0.9, warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, use_distributed_sampler=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        logger=False, limit_val_batches=0, callbacks=[Gather(out)])
    trainer.fit(model, FashionMNISTDataModule(batch_size=4))
    if torch.distributed.is_initialized():  # a clean gloo teardown (else an abort at exit, now and then)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
