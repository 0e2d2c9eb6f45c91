"""Batch samplers: Poisson sampling for DP-SGD (the accountant assumes it) and shuffled batches.

Both draw the batch of optimizer step t from the stream of step t (`first_step()` is the step
the next batch is for when iteration starts), so a resumed run continues the draws instead of
repeating the first batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from tensafe.privacy.randomness import SecureRandom, SeededRandom


def poisson_batch(
    rng: SeededRandom | SecureRandom, step: int, dataset_size: int, sample_rate: float
) -> list[int]:
    """The batch of optimizer step `step`: each of the N indices independently with probability q."""
    draws = rng.for_step("batch", step)
    return np.flatnonzero(draws.uniform(dataset_size) < sample_rate).tolist()


class PoissonBatchSampler(Sampler[list[int]]):
    """Each batch contains every example independently with probability `sample_rate`.

    Batches vary in size (and may be empty); their expected size is sample_rate · N. In a job of
    `world` workers, worker `rank` keeps the sampled indices i with i mod world = rank: each record
    is still included independently with probability q, so the union of the workers' batches is a
    Poisson sample of the whole dataset at rate q, the q the accountant uses.
    """

    def __init__(
        self,
        dataset_size: int,
        sample_rate: float,
        num_batches: int,
        rng: SeededRandom | SecureRandom,
        first_step: Callable[[], int],
        shard: tuple[int, int] = (0, 1),
    ):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.dataset_size, self.sample_rate, self.num_batches = dataset_size, sample_rate, num_batches
        self.rng, self.first_step = rng, first_step
        self.rank, self.world = shard

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        start = self.first_step()
        for step in range(start, start + self.num_batches):
            batch = poisson_batch(self.rng, step, self.dataset_size, self.sample_rate)
            yield batch if self.world == 1 else [i for i in batch if i % self.world == self.rank]


class ShuffledBatchSampler(Sampler[list[int]]):
    """Fixed-size batches from a fresh permutation per epoch (non-private training)."""

    def __init__(self, dataset_size: int, batch_size: int, rng: SeededRandom, first_step: Callable[[], int]):
        self.dataset_size, self.batch_size, self.rng, self.first_step = (
            dataset_size,
            batch_size,
            rng,
            first_step,
        )

    def __len__(self) -> int:
        return max(1, self.dataset_size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.argsort(
            self.rng.for_step("shuffle", self.first_step()).uniform(self.dataset_size), kind="stable"
        )
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
