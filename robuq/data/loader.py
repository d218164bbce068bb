"""Exact, DDP-sharded, resumable data order for training.

Epoch `e` visits a permutation of the dataset seeded by (seed, e). Rank r of W takes every W-th
sample of it, `perm[r::W]`, so after k batches per rank the samples consumed by all ranks are
exactly the first k*B*W of the permutation, whatever W: a run can resume on another GPU count.
With `hflip`, the sampler also draws each sample's flip from the same seeded stream and yields
`(index, flip)` keys (see `split_key`), so augmentation is as reproducible as the order.

The position (epoch, batches) is counted in the main process as batches are handed out and
rolls over to the next epoch after the last batch: the batch at global step s is the same in a
straight run and in any resumed one. How Lightning 2.6 drives it (lightning/pytorch/loops):
- save: `FitLoop.on_save_checkpoint` stores `[loader.state_dict()]` of every train loader that
  has one (`CombinedLoader._state_dicts`) in `loops.fit_loop.state_dict.combined_loader`.
- restore: `FitLoop.setup_data` calls `load_state_dict()` before it creates the iterator, but
  only when the fit loop is restarting (max_steps-based training, or an unfinished epoch).
- epochs: `FitLoop.on_advance_start` calls `sampler.set_epoch(epoch_progress.processed)` before
  each epoch. That is how a max_epochs run resumed from an epoch-end checkpoint (no
  load_state_dict) finds its epoch. A restored loader ignores it: after a checkpoint saved in
  on_train_epoch_end (e.g. when max_steps stops a run mid-epoch), `processed` is one ahead of
  the epoch Lightning actually resumes.
- Lightning ends an epoch after `len(loader)` batches and counts a resumed epoch's batches
  itself, so `len()` is a full epoch while a resumed epoch yields only the rest. The iterator
  is lazy: it reads the position at its first batch, after `set_epoch`, also with workers.
Run the Trainer with `use_distributed_sampler=False`: this loader shards itself.
"""

import math
import warnings

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def split_key(key) -> tuple[int, bool]:
    """A dataset key is an index or an (index, flip) pair."""
    return (int(key[0]), bool(key[1])) if isinstance(key, tuple) else (int(key), False)


class Subset(Dataset):
    """`dataset` restricted to `indices`, passing (index, flip) keys through."""

    def __init__(self, dataset: Dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        i, flip = split_key(key)
        return self.dataset[(self.indices[i], flip)]


class ShardedSampler(Sampler):
    """One rank's keys of epoch `epoch`, from batch `batches` on; the position is counted by
    the loader (`advance`) as it hands batches out."""

    def __init__(self, n, batch_size, rank, world_size, seed, shuffle, drop_last, hflip):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.hflip = seed, shuffle, drop_last, hflip
        self.epoch, self.batches, self.restored = 0, 0, False
        if drop_last:  # every rank gets the same number of full batches
            self.per_rank = n // (batch_size * world_size) * batch_size
        else:  # pad by wrapping around, as DistributedSampler does
            self.per_rank = math.ceil(n / world_size)
        self.num_batches = math.ceil(self.per_rank / batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` if no state was loaded and no batch of this epoch handed out yet."""
        if not self.restored and self.batches == 0:
            self.epoch = epoch

    def advance(self) -> None:
        self.batches += 1
        if self.batches == self.num_batches:
            self.epoch, self.batches = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        flips = rng.random(self.n) < 0.5
        pos = np.arange(self.rank, self.per_rank * self.world_size, self.world_size) % self.n
        for p in pos[self.batches * self.batch_size:]:
            yield (int(order[p]), bool(flips[p])) if self.hflip else int(order[p])


class ResumableDataLoader(DataLoader):
    """DataLoader with a (seed, epoch)-seeded, rank-sharded order and a resumable position.

    rank/world_size default to torch.distributed's when it is initialised, else 0/1. Extra
    keyword arguments (num_workers, pin_memory, ...) go to DataLoader. Under Lightning, run the
    Trainer with `use_distributed_sampler=False`.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, hflip: bool = False, rank: int | None = None,
                 world_size: int | None = None, **kwargs):
        if "sampler" in kwargs or "batch_sampler" in kwargs:
            raise ValueError("ResumableDataLoader orders and shards its own samples and takes no sampler; "
                             "Lightning injects one under DDP unless the Trainer has "
                             "use_distributed_sampler=False (and with overfit_batches).")
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        sampler = ShardedSampler(len(dataset), batch_size, rank, world_size, seed, shuffle, drop_last, hflip)
        if sampler.per_rank == 0:
            raise ValueError(f"{len(dataset)} samples give no full batch of {batch_size} on each of "
                             f"{world_size} ranks: lower batch_size or use more data.")
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)

    def __iter__(self):
        return self._iter_batches()  # a generator: nothing is read until the first batch

    def _iter_batches(self):
        for batch in super().__iter__():
            self.sampler.advance()  # before handing out, so a checkpoint taken now includes it
            yield batch

    def state_dict(self) -> dict:
        s = self.sampler
        return {"epoch": s.epoch, "batches": s.batches, "batch_size": s.batch_size, "world_size": s.world_size}

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        consumed = state["batches"] * state["batch_size"] * state["world_size"]  # samples, all ranks
        batches, rest = divmod(consumed, s.batch_size * s.world_size)
        if rest:
            warnings.warn(f"resuming with batch {s.batch_size} x {s.world_size} ranks from a checkpoint of "
                          f"batch {state['batch_size']} x {state['world_size']}: {rest} samples are seen twice")
        s.epoch, s.batches, s.restored = state["epoch"], batches, True
        if batches >= s.num_batches:  # fewer batches per epoch now: the saved epoch is over
            s.epoch, s.batches = s.epoch + 1, 0


def datamodule_loader(dm, dataset: Dataset, train: bool) -> ResumableDataLoader:
    """The loader both datamodules use: shuffled, drop_last and flipped for training only; batches in
    pinned memory when the trainer runs on a GPU. (A copy from pageable memory makes the host wait
    until the GPU has finished all queued work: the GPU then idles while the host fetches the next
    batch.)"""
    trainer = dm.trainer
    pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
    return ResumableDataLoader(dataset, dm.batch_size, shuffle=train, drop_last=train, seed=dm.seed,
                               hflip=dm.hflip and train, num_workers=dm.num_workers,
                               persistent_workers=dm.num_workers > 0, pin_memory=pin)
