"""An in-process `Collective` for n parties on n threads, to run the distributed code paths here."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


class ThreadGroup:
    """The rendezvous of n ThreadCollectives: each collective waits for every rank's input."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[Any] = [None] * n

    def exchange(self, rank: int, item: Any) -> list[Any]:
        self.slots[rank] = item
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ThreadCollective:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.n
        # what a tampering network would do to this rank's vector on the way into the sum
        self.tamper: Callable[[np.ndarray], np.ndarray] | None = None

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return self.group.exchange(self.rank, data)

    def all_reduce(self, values: np.ndarray) -> np.ndarray:
        sent = self.tamper(values.copy()) if self.tamper else values
        return np.sum(self.group.exchange(self.rank, sent), axis=0)


def run_parties(
    n: int,
    body: Callable[[ThreadCollective], Any],
    setup: Callable[[list[ThreadCollective]], None] | None = None,
) -> list[Any]:
    """`body(collective)` on n threads, one per rank; their results in rank order."""
    group = ThreadGroup(n)
    collectives = [ThreadCollective(group, rank) for rank in range(n)]
    if setup:
        setup(collectives)
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(body, collectives))
