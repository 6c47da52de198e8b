"""Deterministic batches: the global batch of a step is a function of (seed, step) alone.

Global sample ``j`` of step ``s`` sits at stream position ``p = s * global_batch + j``; the stream walks
through the dataset epoch by epoch, each epoch in a permutation seeded by (seed, epoch). Per-sample
randomness comes from a generator seeded by (seed, step, j). So any slice of the global batch, taken by
any process under any plan, holds exactly the same numbers.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from models.base import MicroBatch

Sample = dict[str, torch.Tensor]


class Dataset(Protocol):
    """A finite indexable collection of samples (tensors without a batch dimension)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator for per-sample randomness of global sample ``index`` of ``step``."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + index) % (2**63))


class BatchSource:
    """Cuts each step's global batch into fixed microbatches: microbatch k holds samples
    [k * microbatch, (k + 1) * microbatch), whatever pipeline runs it."""

    def __init__(
        self,
        dataset: Dataset,
        global_batch: int,
        microbatch: int,
        seed: int,
        randomness: Callable[[Sample, torch.Generator], Sample] | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        self.dataset = dataset
        self.global_batch = global_batch
        self.microbatch_size = microbatch
        self.seed = seed
        self.randomness = randomness
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // self.microbatch_size

    def _dataset_index(self, step: int, j: int) -> int:
        position = step * self.global_batch + j
        epoch, offset = divmod(position, len(self.dataset))
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            perm = torch.randperm(len(self.dataset), generator=gen)
            self._perms = {epoch: perm}  # walking forward in steps: one epoch is enough to keep
        return int(perm[offset])

    def samples(self, step: int, start: int, stop: int) -> MicroBatch:
        """Global samples [start, stop) of ``step``, stacked."""
        rows = []
        for j in range(start, stop):
            sample = dict(self.dataset[self._dataset_index(step, j)])
            if self.randomness is not None:
                sample.update(self.randomness(sample, sample_generator(self.seed, step, j)))
            rows.append(sample)
        return MicroBatch({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    def microbatch(self, step: int, k: int) -> MicroBatch:
        if not 0 <= k < self.num_microbatches:
            raise IndexError(f"microbatch {k} out of range [0, {self.num_microbatches})")
        return self.samples(step, k * self.microbatch_size, (k + 1) * self.microbatch_size)
