"""ResumableDataLoader: seeded order, DDP sharding, and exact resume through Lightning checkpoints."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from robuq.data.loader import ResumableDataLoader, split_key


class Keys(torch.utils.data.Dataset):
    """Returns the key it was asked for: (index, flip)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        return torch.tensor(split_key(key))


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.tolist())
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val", float(batch.sum()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(L.LightningDataModule):
    def __init__(self, n=22, batch_size=4, num_workers=0):
        super().__init__()
        self.n, self.batch_size, self.num_workers = n, batch_size, num_workers

    def train_dataloader(self):
        return ResumableDataLoader(Keys(self.n), self.batch_size, seed=3, hflip=True,
                                   num_workers=self.num_workers)

    def val_dataloader(self):
        return ResumableDataLoader(Keys(6), 4, shuffle=False, drop_last=False)


def fit(root, ckpt_path=None, callbacks=(), num_workers=0, **limits):
    model = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=root,
                        callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                        **{"limit_val_batches": 0, **limits})
    trainer.fit(model, Data(num_workers=num_workers), ckpt_path=ckpt_path)
    return model.seen


def check_resume(tmp_path, checkpoint: dict, short: dict, steps=None, **run):
    """Train straight; train `short` saving checkpoints; resume from each (or those at `steps`)
    with the straight run's limits: the batches from the checkpoint's step on must be identical."""
    straight = fit(tmp_path / "straight", **run)
    fit(tmp_path / "short", callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, **checkpoint)],
        **{**run, **short})
    resumed = 0
    for ckpt in sorted((tmp_path / "ck").glob("*.ckpt")):
        step = int(ckpt.stem.split("step=")[1])
        if steps is None or step in steps:
            assert fit(tmp_path / "resumed", ckpt_path=ckpt, **run) == straight[step:], ckpt.name
            resumed += 1
    assert resumed == len(steps or [0]) if steps else resumed > 0


# 22 samples, batch 4 -> 5 batches per epoch (2 samples dropped).
def test_resume_on_train_batch_end(tmp_path):
    # mid-epoch, epoch end, mid-epoch 2, epoch end 2 (checkpoints saved in on_train_batch_end)
    check_resume(tmp_path, {"every_n_train_steps": 1}, {"max_steps": 10}, steps={2, 5, 7, 10}, max_steps=13)


def test_resume_after_max_steps_stop(tmp_path):
    # The run stops mid-epoch (8) or at an epoch end (5); ModelCheckpoint saves in on_train_epoch_end,
    # where Lightning's set_epoch count runs one ahead of the epoch it resumes.
    check_resume(tmp_path / "mid", {}, {"max_steps": 8}, max_steps=13)
    check_resume(tmp_path / "end", {}, {"max_steps": 5}, max_steps=13)


def test_resume_after_validation(tmp_path):
    # Checkpoints saved after validation: mid-epoch (every 3 batches) and at epoch ends.
    check_resume(tmp_path / "mid", {}, {"max_steps": 9}, max_steps=13, limit_val_batches=1, val_check_interval=3)
    check_resume(tmp_path / "end", {}, {"max_steps": 10}, max_steps=13, limit_val_batches=1)


def test_resume_max_epochs(tmp_path):
    # Epoch-end checkpoints of an epoch-based run: Lightning does not call load_state_dict, only set_epoch.
    check_resume(tmp_path / "end", {}, {"max_epochs": 2}, max_epochs=3)
    check_resume(tmp_path / "mid", {"every_n_train_steps": 3}, {"max_epochs": 2}, max_epochs=3)


def test_resume_with_workers(tmp_path):
    straight = fit(tmp_path / "a", max_steps=8, num_workers=2)
    assert straight == fit(tmp_path / "a0", max_steps=8)  # workers do not change the data
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    first = fit(tmp_path / "b", callbacks=[ckpt], max_steps=3, num_workers=2)
    rest = fit(tmp_path / "c", ckpt_path=tmp_path / "ck" / "epoch=0-step=3.ckpt", max_steps=8, num_workers=2)
    assert first + rest == straight


def test_order_is_seeded_per_epoch():
    loader = ResumableDataLoader(Keys(40), 5, seed=1)
    e0, e1 = [b[:, 0].tolist() for b in loader], [b[:, 0].tolist() for b in loader]
    assert sorted(sum(e0, [])) == list(range(40)) and e0 != e1
    loader.sampler.set_epoch(0)
    assert [b[:, 0].tolist() for b in loader] == e0
    assert [b[:, 0].tolist() for b in ResumableDataLoader(Keys(40), 5, seed=2)] != e0


def test_two_ranks_disjoint_and_covering():
    n, batch = 103, 4
    ranks = [ResumableDataLoader(Keys(n), batch, seed=0, rank=r, world_size=2) for r in range(2)]
    single = ResumableDataLoader(Keys(n), 2 * batch, seed=0)
    seen = [[i for b in loader for i in b[:, 0].tolist()] for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == n // (2 * batch)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == n // (2 * batch) * batch
    # together they cover exactly the prefix that one rank with the global batch size sees
    assert set(seen[0]) | set(seen[1]) == {i for b in single for i in b[:, 0].tolist()}


def test_eval_padding_covers_everything():
    loaders = [ResumableDataLoader(Keys(11), 4, shuffle=False, drop_last=False, rank=r, world_size=3)
               for r in range(3)]
    seen = [[i for b in loader for i in b[:, 0].tolist()] for loader in loaders]
    assert {len(loader) for loader in loaders} == {1} and {len(s) for s in seen} == {4}
    assert set(sum(seen, [])) == set(range(11))


def test_state_dict_roundtrip_and_world_size_change():
    a = ResumableDataLoader(Keys(64), 4, seed=5, rank=0, world_size=2)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    assert state == {"epoch": 0, "batches": 3, "batch_size": 4, "world_size": 2}
    # 3 batches x 4 x 2 ranks = 24 samples consumed = 3 batches of 8 on one rank
    b = ResumableDataLoader(Keys(64), 8, seed=5, rank=0, world_size=1)
    b.load_state_dict(state)
    consumed = {i for r in range(2) for i in _first(ResumableDataLoader(Keys(64), 4, seed=5, rank=r, world_size=2), 3)}
    assert consumed.isdisjoint(i for batch in b for i in batch[:, 0].tolist())
    assert b.state_dict()["epoch"] == 1  # finished the epoch and moved on


def _first(loader, k):
    it = iter(loader)
    return [i for _ in range(k) for i in next(it)[:, 0].tolist()]


def test_refuses_injected_sampler():
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        ResumableDataLoader(Keys(8), 2, sampler=range(8))


@pytest.mark.parametrize("device, pinned", [(None, False), ("cpu", False), ("cuda", True)])
def test_datamodule_loader_pins_batches_for_a_gpu_trainer(device, pinned):
    """Batches in pinned memory when the trainer runs on a GPU: a copy from pageable memory would
    make the host wait for the GPU every step."""
    from types import SimpleNamespace

    from robuq.data.loader import datamodule_loader

    trainer = None if device is None else SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    dm = SimpleNamespace(trainer=trainer, batch_size=2, seed=0, hflip=False, num_workers=0)
    assert datamodule_loader(dm, Keys(8), train=True).pin_memory is pinned
