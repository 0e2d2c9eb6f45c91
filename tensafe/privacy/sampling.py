"""Batch samplers: Poisson sampling for DP-SGD (the accountant assumes it) and shuffled batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from tensafe.privacy.randomness import SecureRandom, SeededRandom


class PoissonBatchSampler(Sampler[list[int]]):
    """Each batch contains every example independently with probability `sample_rate`.

    Batches vary in size (and may be empty); their expected size is sample_rate · N.
    """

    def __init__(
        self, dataset_size: int, sample_rate: float, num_batches: int, rng: SeededRandom | SecureRandom
    ):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.dataset_size, self.sample_rate, self.num_batches, self.rng = (
            dataset_size,
            sample_rate,
            num_batches,
            rng,
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            yield np.flatnonzero(self.rng.uniform(self.dataset_size) < self.sample_rate).tolist()


class ShuffledBatchSampler(Sampler[list[int]]):
    """Fixed-size batches from a fresh permutation per epoch (non-private training)."""

    def __init__(self, dataset_size: int, batch_size: int, rng: SeededRandom):
        self.dataset_size, self.batch_size, self.rng = dataset_size, batch_size, rng

    def __len__(self) -> int:
        return max(1, self.dataset_size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.argsort(self.rng.uniform(self.dataset_size), kind="stable")
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
