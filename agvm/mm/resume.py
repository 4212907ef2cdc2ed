"""What an exact resume needs besides the checkpoint file (``agvm.mm.checkpoint``), wired in by ``AGVMRunner``.

- ``seeded_loader``: the training DataLoader rebuilt so that every sample's data augmentation draws from generators
  seeded with (seed, epoch, rank, position in the epoch): Python ``random``, numpy's global generator and torch's CPU
  generator are seeded per sample (in the main process they are restored afterwards, so the model's own random
  draws are untouched). The augmentation is then the same whatever the number of workers, whether workers persist
  across epochs, how far they prefetched, or where the run was interrupted. The loader gets its own
  ``torch.Generator``, so creating an iterator draws nothing from the global one.
- ``AGVMEpochBasedTrainLoop``: mmengine's EpochBasedTrainLoop that, resumed from an iteration checkpoint in the
  middle of an epoch, continues at the next iteration of that epoch (the finished batches are skipped by index,
  without loading them) instead of replaying the whole epoch.
- ``AGVMIterBasedTrainLoop``: mmengine's IterBasedTrainLoop that, resumed with an ``InfiniteSampler`` (mmseg's
  iteration-based configs), skips the trained batches by index instead of loading every one of them.
- ``RNGIsolationHook``: validation inside training does not move the training generators (a run killed during
  evaluation and resumed from the checkpoint before it continues exactly like the uninterrupted run).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.dataset import InfiniteSampler
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from mmengine.runner.loops import _InfiniteDataloaderIterator
from torch.utils.data import DataLoader

from .checkpoint import rng_state, set_rng_state

__all__ = ["seeded_loader", "AGVMEpochBasedTrainLoop", "AGVMIterBasedTrainLoop", "RNGIsolationHook"]


def sample_seed(seed: int, epoch: int, rank: int, position: int, slot: int) -> int:
    """The seed of one sample: batch ``position`` of ``epoch`` on ``rank``, ``slot`` inside the batch."""
    return int(np.random.SeedSequence([seed, epoch, rank, position, slot]).generate_state(1)[0])


class _SeededDataset(torch.utils.data.Dataset):
    """Reads ``(index, seed)`` keys: seeds the generators, returns ``dataset[index]``; other attributes pass through."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        index, seed = key
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: a CUDA generator is never touched
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class _SeededBatches:
    """Wraps a batch sampler: yields ``(index, seed)`` keys and can skip the first ``skip`` batches of one pass."""

    def __init__(self, batch_sampler, seed: int, rank: int):
        self.batch_sampler, self.seed, self.rank, self.skip = batch_sampler, seed, rank, 0

    @property
    def sampler(self):  # mmengine's DistSamplerSeedHook calls sampler.set_epoch through this
        return self.batch_sampler.sampler

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        epoch = int(getattr(self.sampler, "epoch", 0))
        skip, self.skip = self.skip, 0
        for pos, batch in enumerate(self.batch_sampler):
            if pos >= skip:
                yield [(i, sample_seed(self.seed, epoch, self.rank, pos, j)) for j, i in enumerate(batch)]


def seeded_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` rebuilt with per-sample seeding (see the module docstring); everything else is kept."""
    if isinstance(loader.batch_sampler, _SeededBatches) or loader.batch_sampler is None:
        return loader
    keep = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
            "persistent_workers", "pin_memory_device", "in_order")
    kwargs = {k: getattr(loader, k) for k in keep}
    if loader.num_workers:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    batches = _SeededBatches(loader.batch_sampler, seed, get_rank())
    return DataLoader(_SeededDataset(loader.dataset), batch_sampler=batches,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


class AGVMEpochBasedTrainLoop(EpochBasedTrainLoop):
    """EpochBasedTrainLoop that resumes in the middle of an epoch at the right iteration."""

    def run_epoch(self) -> None:
        self.runner.call_hook("before_train_epoch")
        self.runner.model.train()
        n = len(self.dataloader)
        done = self._iter - self._epoch * n  # batches of this epoch trained before the checkpoint
        if not 0 <= done <= n:
            raise RuntimeError(f"cannot place iteration {self._iter} in epoch {self._epoch + 1} of {n} iterations "
                               "(the dataset size or batch size changed since the checkpoint); resume with the "
                               "checkpoint's config or start a new work dir")
        if done:
            batches = self.dataloader.batch_sampler
            if not isinstance(batches, _SeededBatches):
                raise RuntimeError("a mid-epoch checkpoint needs the training loader built by AGVMRunner; resume "
                                   "from an epoch checkpoint or start a new work dir")
            if done == n:  # the checkpoint was written after the epoch's last iteration, before its end hooks
                self.runner.logger.warning(f"resuming after the last iteration of epoch {self._epoch + 1}: its "
                                           "end-of-epoch hooks (checkpoint, evaluation) run now")
            else:
                self.runner.logger.warning(f"resuming epoch {self._epoch + 1} at iteration {done + 1} of {n} (the "
                                           f"first {done} batches are skipped without loading them)")
            batches.skip = done
        for idx, data_batch in enumerate(self.dataloader, done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1


class _SkipFirst:
    """An iterator whose first ``n`` items are None (mmengine's advance loop on resume) and then ``it``'s."""

    def __init__(self, it, n: int):
        self.it, self.n = it, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n:
            self.n -= 1
            return None
        return next(self.it)


class AGVMIterBasedTrainLoop(IterBasedTrainLoop):
    """IterBasedTrainLoop whose resume skips the trained batches by index (with an InfiniteSampler) instead of
    loading them: the same batches follow, without reading the ones already trained."""

    def run(self):
        batches = self.dataloader.batch_sampler
        if self._iter > 0 and isinstance(batches, _SeededBatches) and isinstance(batches.sampler, InfiniteSampler):
            self.runner.logger.warning(f"resuming at iteration {self._iter + 1}: the first {self._iter} batches are "
                                       "skipped by index without loading them")
            batches.skip = self._iter
            # an InfiniteSampler is one stream for its lifetime, already advanced by the iterator built with the
            # loop: restart it (its order depends only on its seed) so that positions count from 0 again
            batches.sampler.indices = batches.sampler._indices_of_rank()
            self.dataloader_iterator = _SkipFirst(_InfiniteDataloaderIterator(self.dataloader), self._iter)
        return super().run()


class RNGIsolationHook(Hook):
    """Restores the training generators after each validation (``before_val`` / ``after_val``)."""

    priority = "VERY_HIGH"

    def __init__(self):
        self._saved = None

    def before_val(self, runner) -> None:
        self._saved = rng_state()

    def after_val(self, runner) -> None:
        if self._saved is not None:
            set_rng_state(self._saved)
            self._saved = None
