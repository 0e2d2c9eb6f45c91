"""Distributed DP-SGD: how the clipped sums of the workers become one noisy gradient
(docs/distributed.md).

Each worker Poisson-samples its shard of the records, clips per example and sums; only that
clipped sum leaves it, in one of three ways:

- `noise_placement=rank0`: the sums are all-reduced and rank 0 adds all of N(0, σ²C²). Every
  worker (and the network between them) sees the others' partial sums without noise.
- `noise_placement=workers`: each worker adds N(0, σ²C²/n) before the all-reduce. The sum has
  exactly the configured noise; one worker's contribution carries only σ/√n of it.
- `secure_aggregation=true`: each worker quantizes its sum to integers, adds a Skellam share in
  the integer domain, and the masked shares are summed (tensafe.privacy.secure_aggregation), so
  no one sees less than the aggregate; up to `tolerated_colluders` workers may subtract their own
  shares and the aggregate still has the configured noise. Accounted by the Skellam accountant.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from tensafe.errors import ConfigError
from tensafe.kernels import aggregation
from tensafe.privacy.randomness import USES, SecureRandom, SeededRandom
from tensafe.privacy.secure_aggregation import CHUNK, Party, PartyCard, PartyKeys
from tensafe.privacy.skellam import Sensitivity, skellam_noise

NOISE_PLACEMENTS = ("rank0", "workers")
# The aggregate's noise stays below this many standard deviations with probability > 1 - 2^-1000.
_NOISE_TAIL = 40


class Collective(Protocol):
    """The collectives the workers of one job share (torch.distributed in a Ray Train job)."""

    rank: int
    world_size: int

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's message, in rank order (all of the same length)."""

    def all_reduce(self, values: np.ndarray) -> np.ndarray:
        """The elementwise sum over ranks (int64 or float64); `values` may be overwritten."""


class TorchCollective:
    """`Collective` over torch.distributed's default process group (gloo on CPU)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: run inside a distributed job")
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # The sums are numpy arrays in host memory: a gloo group even when the job's is NCCL.
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        mine = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._dist.all_gather(out, mine, group=self._group)
        return [bytes(t.numpy()) for t in out]

    def all_reduce(self, values: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(values))  # summed in place: no copy of d words
        self._dist.all_reduce(tensor, group=self._group)
        return tensor.numpy()


class StepRecorder(Protocol):
    """Where a job's noisy steps are journaled before they run (tensafe.privacy.journal)."""

    def append(self, attempt: str, model_step: int, noise_multiplier: float, sample_rate: float) -> None: ...

    def summary(self) -> dict[str, Any]:
        """{"steps_executed": ..., "attempts": ...} over the whole job."""


@dataclass(frozen=True)
class Quantizer:
    """Scale by γ, round with a data-independent dither: x ↦ ⌊γx + u⌋, u ~ U[0, 1)^d.

    For any fixed dither, two clipped sums at ℓ₂ distance ≤ C round to integer vectors at ℓ₂
    distance ≤ γC + √d (each coordinate moves by less than one more than its scaled difference),
    so that is the sensitivity the noise is calibrated to; ℓ₁ ≤ min(√d·Δ₂, Δ₂²) for integer
    vectors. γ = √d / (rounding_overhead · C) keeps the rounding's share of Δ₂ at
    `rounding_overhead`.
    """

    scale: float
    dimension: int
    max_grad_norm: float

    @classmethod
    def for_clip(cls, max_grad_norm: float, dimension: int, rounding_overhead: float) -> Quantizer:
        return cls(math.sqrt(dimension) / (rounding_overhead * max_grad_norm), dimension, max_grad_norm)

    @property
    def sensitivity(self) -> Sensitivity:
        l2 = self.scale * self.max_grad_norm + math.sqrt(self.dimension)
        return Sensitivity(l2=l2, l1=min(math.sqrt(self.dimension) * l2, l2 * l2))

    def quantize(self, values: np.ndarray, dither: np.ndarray) -> np.ndarray:
        """⌊γx + u⌋ as int64."""
        return self.share(values, dither, np.zeros(values.size, dtype=np.int64))

    def share(self, values: np.ndarray, dither: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """noise + ⌊γx + u⌋, in place in `noise` (int64), for `values` float32 or float64 (a
        compiled pass where numba imports; exact: every term stays far below 2^53)."""
        aggregation.share(np.ravel(values), self.scale, dither, noise)
        return noise

    def modulus_bits_needed(
        self, dataset_size: int, sample_rate: float, workers: int, noise_std: float
    ) -> tuple[int, int]:
        """(k, records): the smallest modulus 2^k the true sum cannot wrap around, for a batch of
        `records` = `batch_tail` records all on one coordinate, every worker's rounding and the
        noise at 40σ. (A wrap would spoil that step's update, never the privacy: what is released
        is still a function of the noisy sum.)"""
        records = batch_tail(dataset_size, sample_rate)
        worst = records * self.scale * self.max_grad_norm + workers + _NOISE_TAIL * noise_std
        return math.floor(math.log2(worst)) + 2, records

    def check_headroom(
        self, dataset_size: int, sample_rate: float, workers: int, noise_std: float, modulus_bits: int
    ) -> None:
        """Refuse a modulus the true sum could wrap around (`modulus_bits_needed`)."""
        need, records = self.modulus_bits_needed(dataset_size, sample_rate, workers, noise_std)
        if need > modulus_bits:
            raise ConfigError(
                "privacy.distributed.modulus_bits",
                modulus_bits,
                f"too small: the sum of a batch of up to {records} quantized clipped gradients may reach "
                f"2^{need - 1}; use at least {need} (or a larger privacy.distributed.rounding_overhead)",
            )


def batch_tail(dataset_size: int, sample_rate: float) -> int:
    """A Poisson batch size exceeded with probability below 2^-64 (Bernstein's inequality:
    P(B ≥ Nq + t) ≤ exp(−t² / (2(Nq + t/3))))."""
    mean, log_odds = dataset_size * sample_rate, 64 * math.log(2)
    tail = log_odds / 3 + math.sqrt(log_odds**2 / 9 + 2 * log_odds * mean)
    return min(dataset_size, math.ceil(mean + tail))


def _flatten(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """The tensors, concatenated as float64."""
    return np.concatenate([t.detach().to("cpu", torch.float64).reshape(-1).numpy() for t in tensors])


def host_values(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a 1-D float32 or float64 array in host memory (a view where it can)."""
    values = tensor.detach().to("cpu").reshape(-1)
    return values.numpy() if values.dtype in (torch.float32, torch.float64) else values.float().numpy()


def unflatten(flat: np.ndarray, like: Sequence[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
    """`flat` · scale in new tensors shaped, typed and placed like `like`."""
    out, start = [], 0
    for ref in like:
        work = torch.float64 if ref.dtype == torch.float64 else torch.float32
        tensor = torch.empty(ref.shape, dtype=work)
        tensor.view(-1).copy_(torch.from_numpy(flat[start : start + ref.numel()]))
        if scale != 1.0:
            tensor.mul_(scale)
        out.append(tensor.to(ref.device, ref.dtype))
        start += ref.numel()
    return out


class GaussianAllReduce:
    """Clipped sums all-reduced with Gaussian noise placed on rank 0 or split over the workers."""

    noise = "gaussian"

    def __init__(self, collective: Collective, std: float, rng: SeededRandom | SecureRandom, placement: str):
        if placement not in NOISE_PLACEMENTS:
            raise ConfigError("privacy.distributed.noise_placement", placement, f"one of {NOISE_PLACEMENTS}")
        self.collective, self.std, self.rng, self.placement = collective, std, rng, placement
        self.attempt = uuid.uuid4().hex  # a new aggregator per attempt of the worker group

    def noisy_sum(self, summed: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]:
        flat = _flatten(summed)
        rank, n = self.collective.rank, self.collective.world_size
        if self.placement == "rank0":
            if rank == 0:  # the single-process run's noise stream
                flat += self.rng.for_step("noise", step).normal(flat.size) * self.std
        else:
            flat += self.rng.for_step("noise", step, party=rank).normal(flat.size) * (self.std / math.sqrt(n))
        return unflatten(self.collective.all_reduce(flat), summed)


@dataclass
class SecureAggregation:
    """Quantize, add a Skellam share, mask, sum, verify, unmask: the noisy sum in float units.

    The dither and the noise do not depend on the data, so the next step's are drawn on a
    background thread while the current step computes its gradients (`timings["noise_wait"]` is
    what the step still waited for them). The sum is taken in an int64 buffer reused across
    steps (a fresh d-word array costs page faults comparable to the arithmetic).
    """

    collective: Collective
    run_id: str
    quantizer: Quantizer
    share_variance: float
    modulus_bits: int
    rng: SeededRandom | SecureRandom
    seed: int
    degree: int | None = None
    threads: int = 1  # chunks processed (and noise chunks drawn) at once: numpy, BLAS, AES release the GIL
    timings: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    noise = "skellam"

    def __post_init__(self) -> None:
        keys = PartyKeys()
        rank = self.collective.rank
        cards = [
            PartyCard.from_bytes(b) for b in self.collective.all_gather_bytes(keys.card(rank).to_bytes())
        ]
        self.party = Party(self.run_id, keys, cards, rank, self.modulus_bits, self.degree)
        self.attempt = self.party.session_id.hex()
        self._drawer = ThreadPoolExecutor(1, thread_name_prefix="skellam")  # the next step's, ahead
        self._noise_pool = ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="skellam-chunk")
        self._pool = ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="secagg")
        self._next: tuple[int, Future[tuple[np.ndarray, np.ndarray]]] | None = None
        self._total = np.empty(self.quantizer.dimension, dtype=np.int64)  # masked words, summed in place

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The dither and the Skellam share of `step`, the share a CHUNK at a time on the noise
        threads (numpy's Poisson sampler releases the GIL)."""
        rank, d = self.collective.rank, self.quantizer.dimension
        dither = self.rng.for_step("dither", step, party=rank).uniform(d)
        noise = np.empty(d, dtype=np.int64)

        def piece(start: int) -> None:
            end, seed = min(start + CHUNK, d), (self.seed, USES["skellam"], step, rank, start // CHUNK)
            noise[start:end] = skellam_noise(end - start, self.share_variance, self.rng.secure, seed=seed)

        list(self._noise_pool.map(piece, range(0, d, CHUNK)))
        return dither, noise

    def _dither_and_noise(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        pending, self._next = self._next, None
        drawn = pending[1].result() if pending and pending[0] == step else self._draw(step)
        self._next = (step + 1, self._drawer.submit(self._draw, step + 1))
        return drawn

    def integer_share(self, summed: Sequence[torch.Tensor], step: int) -> np.ndarray:
        """⌊γ·x + dither⌋ plus this worker's Skellam share, for optimizer step `step`."""
        waited = time.perf_counter()
        dither, noise = self._dither_and_noise(step)
        self.timings["noise_wait"].append(time.perf_counter() - waited)
        start = 0
        for tensor in summed:
            end = start + tensor.numel()
            self.quantizer.share(host_values(tensor), dither[start:end], noise[start:end])
            start = end
        return noise

    def noisy_sum(self, summed: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]:
        """One round for the whole vector: its chunks are masked, summed, challenged, sketched and
        unmasked, the chunk work on the thread pool, three collectives per step whatever the
        chunk count."""
        clock, party, pool, total = time.perf_counter, self.party, self._pool, self._total
        t0 = clock()
        share = self.integer_share(summed, step)
        t1 = clock()
        bounds = [
            (c, start, min(start + CHUNK, share.size)) for c, start in enumerate(range(0, share.size, CHUNK))
        ]

        def mask(chunk: tuple[int, int, int]) -> np.ndarray:
            c, lo, hi = chunk
            words = party.mask(step, c, share[lo:hi])  # each < 2^k
            np.copyto(total[lo:hi], words)
            return words

        masked = list(pool.map(mask, bounds))
        t2 = clock()
        summed_words = self.collective.all_reduce(total)
        totals = [summed_words[lo:hi] for _, lo, hi in bounds]
        challenges = self.collective.all_gather_bytes(party.challenge(step, len(bounds)))  # sum is here
        sketches = self.collective.all_gather_bytes(party.sketch(step, masked, challenges, pool.map))
        t3 = clock()
        party.unmask(step, challenges, totals, sketches, pool.map)  # centres `totals` in place
        out = unflatten(summed_words, summed, 1.0 / self.quantizer.scale)
        t4 = clock()
        for name, seconds in (
            ("quantize", t1 - t0),
            ("mask", t2 - t1),
            ("sum", t3 - t2),
            ("unmask", t4 - t3),
        ):
            self.timings[name].append(seconds)
        return out


def share_variance(noise_multiplier: float, sensitivity: Sensitivity, workers: int, tolerated: int) -> float:
    """Each worker's Skellam variance: any `workers − tolerated` shares add up to (σ·Δ₂)²."""
    if not 0 <= tolerated < workers:
        raise ConfigError(
            "privacy.distributed.tolerated_colluders",
            tolerated,
            f"must be in [0, {workers - 1}] for {workers} workers",
        )
    return (noise_multiplier * sensitivity.l2) ** 2 / (workers - tolerated)


def describe(aggregator: Any) -> dict[str, Any]:
    """What the ledger records about how the noise was placed."""
    if isinstance(aggregator, SecureAggregation):
        q = aggregator.quantizer
        return {
            "noise": "skellam",
            "secure_aggregation": True,
            "quantization_scale": q.scale,
            "dimension": q.dimension,
            "modulus_bits": aggregator.modulus_bits,
            "neighbours": aggregator.party.degree,
            "share_variance": aggregator.share_variance,
        }
    return {"noise": "gaussian", "secure_aggregation": False, "noise_placement": aggregator.placement}


@dataclass
class WorkerGroup:
    """What one worker of a distributed job hands its privacy mechanism."""

    collective: Collective
    run_id: str  # names the job: binds the secure-aggregation sessions of its attempts
    dimension: int  # trainable parameters: the length of the clipped sum
    journal: StepRecorder | None  # rank 0 journals every noisy step before it runs
