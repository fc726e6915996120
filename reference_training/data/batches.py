"""Global batches cut into per-rank slices, the class weights, and per-rank shards."""

from __future__ import annotations

import math

import numpy as np
import torch

from .views import _sample_seed


class GlobalBatchSampler:
    """Seeded global batches, each cut into contiguous per-rank slices.

    Every rank draws the same permutation for an epoch (from ``seed`` and ``epoch``), forms
    the same global batches of ``batch_size``, and keeps slice ``rank`` of each. So N processes
    see exactly the samples one process sees with the same global batch, and a resumed run can
    start at any ``start_step``. With ``drop_last`` off the epoch ends with a partial batch (as
    the released code's loader does), cut as evenly as it goes (``torch.tensor_split``); a
    partial batch smaller than the number of processes is dropped.

    Args:
        size: dataset size.
        batch_size: the global batch size; divisible by ``world_size``.
        seed: the run's seed.
        rank: this process's rank.
        world_size: number of processes.
        drop_last: drop the last partial batch of each epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the number of processes "
                f"({world_size})"
            )
        self.size, self.batch_size, self.seed = size, min(batch_size, size), seed
        self.rank, self.world_size = rank, world_size
        if self.batch_size % world_size:
            raise ValueError(f"the training set ({size}) is smaller than {world_size} processes")
        self.drop_last = drop_last
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + int(not self.drop_last and rest >= self.world_size)

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, -1))
        return torch.randperm(self.size, generator=generator)

    def global_batch(self, step: int) -> torch.Tensor:
        """The dataset indices of global batch ``step`` of the current epoch."""
        return self._order()[step * self.batch_size:(step + 1) * self.batch_size]

    def global_size(self, step: int) -> int:
        """The size of global batch ``step`` (``batch_size`` but for a last partial one)."""
        return min(self.batch_size, self.size - step * self.batch_size)

    def local_slice(self, global_size: int) -> slice:
        """This rank's rows of a global batch of ``global_size``."""
        bounds = [len(part) for part in torch.arange(global_size).tensor_split(self.world_size)]
        start = sum(bounds[:self.rank])
        return slice(start, start + bounds[self.rank])

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = self._order()
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield batch[self.local_slice(len(batch))].tolist()


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """method §2: ``weight_c = N_total / N_c``."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class weights need every class; counts per class are {counts.tolist()}")
    return torch.tensor(counts.sum() / counts, dtype=torch.float32)


def shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous part ``rank`` of ``range(n)`` split into ``world_size`` parts."""
    per = math.ceil(n / world_size)
    return range(min(rank * per, n), min((rank + 1) * per, n))
