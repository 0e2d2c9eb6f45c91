"""Distributed DP-SGD on Ray: what secure aggregation costs, measured and projected.

Measured (here): samples/s of `task=train launcher=ray` with 1 and 2 workers, with and without
secure aggregation (the median step interval from the privacy journal, whose line is written at
every step), and the secure-aggregation seconds per step split into quantize (+ the wait for the
Skellam share drawn in the background), mask, sum and unmask, from rank 0.

Projected: the per-worker cost per step at 16, 256 and 2,000 workers for the rank-16 LoRA adapter
of an 8B model (Llama-3-8B shapes), from per-coordinate and per-pair costs measured on this
machine, against a DP-SGD step time modelled from FLOPs (the JSON records every assumption). The
per-worker cost grows with the neighbour count k = 2⌈log₂ n⌉ (masks) and linearly in n only for
the 2n signature checks; a complete mask graph (every pair) is projected for comparison.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tensafe.benchmarks.results import machine, median_seconds, write

from tensafe.config.schema import TenSafeConfig
from tensafe.privacy.distributed import Quantizer, host_values, unflatten
from tensafe.privacy.journal import JOURNAL_FILENAME, StepJournal
from tensafe.privacy.secure_aggregation import (
    _HEADER,
    _SIGNATURE,
    CHUNK,
    SKETCH_ROWS,
    Party,
    PartyKeys,
    default_degree,
)
from tensafe.privacy.skellam import skellam_noise

PHASES = ("quantize", "noise_wait", "mask", "sum", "unmask")


def per_unit_costs(repeats: int, modulus_bits: int = 32) -> dict[str, float]:
    """Seconds per coordinate (vector work, over one chunk of CHUNK coordinates) or per operation
    (keys, signatures), single-threaded, timing the protocol's own code on a 2-party session at
    `modulus_bits` (32-bit mask words up to 32, 64-bit above): the phases as the step runs them,
    from the float32 clipped sum to the float32 noisy sum."""
    rng = np.random.default_rng(0)
    size = CHUNK
    gradient = [torch.from_numpy(rng.normal(size=size).astype(np.float32))]
    quantizer = Quantizer.for_clip(1.0, size, 0.01)
    dither = rng.random(size)
    noises = iter([rng.integers(-(10**6), 10**6, size=size) for _ in range(repeats)])  # drawn ahead
    host = host_values(gradient[0])
    quantize = median_seconds(
        lambda: quantizer.share(host_values(gradient[0]), dither, next(noises)), repeats
    )
    ints = quantizer.share(host, dither, rng.integers(-(10**6), 10**6, size=size))
    keys = [PartyKeys(), PartyKeys()]
    cards = [k.card(r) for r, k in enumerate(keys)]
    parties = [Party("bench", keys[r], cards, r, modulus_bits) for r in range(2)]
    three = [PartyKeys() for _ in range(3)]
    middle = Party("bench", three[1], [k.card(r) for r, k in enumerate(three)], 1, modulus_bits)  # 2 peers
    rounds = []  # rank 0's sketch and unmask seconds of whole steps of the 2-party session
    for step in range(repeats):
        masked = [p.mask(step, 0, ints) for p in parties]
        total = masked[0].astype(np.int64) + masked[1].astype(np.int64)
        challenges = [p.challenge(step, 1) for p in parties]
        start = time.perf_counter()
        sketches = [parties[0].sketch(step, [masked[0]], challenges)]
        sketched = time.perf_counter()
        sketches.append(parties[1].sketch(step, [masked[1]], challenges))
        unmasking = time.perf_counter()
        parties[0].unmask(step, challenges, [total], sketches)
        unflatten(total, gradient, 1 / quantizer.scale)
        rounds.append((sketched - start, time.perf_counter() - unmasking))
    steps = iter(range(repeats, 10**6))
    ours, theirs = X25519PrivateKey.generate(), X25519PrivateKey.generate().public_key()
    signer = Ed25519PrivateKey.generate()
    message = os.urandom(_HEADER.size)
    signature, verifier = signer.sign(message), signer.public_key()
    n = float(size)
    # The chunk work on a pool of 1 and 2 threads: 4 chunks masked by the 2-neighbour party.
    chunks = [ints] * 4

    def masked_on(pool: ThreadPoolExecutor) -> None:
        step = next(steps) + 1
        list(pool.map(lambda c: middle.mask(step, c, chunks[c]), range(len(chunks))))

    def noise_on(pool: ThreadPoolExecutor) -> None:  # 2 chunks of Skellam share, as the drawer does
        list(pool.map(lambda _: skellam_noise(size, 1e7, True), range(2)))

    with ThreadPoolExecutor(1) as single, ThreadPoolExecutor(2) as double:
        pools = ((1, single), (2, double))
        pooled = {t: median_seconds(lambda p=p: masked_on(p), repeats) for t, p in pools}
        noise_pooled = {t: median_seconds(lambda p=p: noise_on(p), max(3, repeats // 2)) for t, p in pools}
    # one- and two-neighbour masks timed in pairs, back to back, so that a busy machine slows both
    # halves of a pair alike: the per-neighbour cost is the median of the pairs' differences
    ones, extra = [], []
    for _ in range(max(repeats, 3)):
        single_mask = median_seconds(lambda: parties[0].mask(next(steps) + 1, 0, ints), 1)
        double_mask = median_seconds(lambda: middle.mask(next(steps) + 1, 0, ints), 1)
        ones.append(single_mask)
        extra.append(double_mask - single_mask)
    one, per_neighbour = statistics.median(ones) / n, statistics.median(extra) / n
    two = one + per_neighbour
    return {
        "modulus_bits": modulus_bits,
        "mask_word_bytes": parties[0].word.itemsize,
        # the float32 sum scaled, dithered, floored and added to the (prefetched) noise
        "quantize_per_coordinate_s": quantize / n,
        "skellam_per_coordinate_s": median_seconds(lambda: skellam_noise(size, 1e7, True), repeats) / n,
        # a mask with two neighbours less one with one: a keystream and a modular add
        "mask_per_coordinate_per_neighbour_s": max(per_neighbour, 0.0),
        "mask_per_coordinate_base_s": max(2 * one - two, 0.0),  # the copy every mask starts with
        "sketch_per_coordinate_s": statistics.median(s for s, _ in rounds) / n,
        # range check, the sum's sketch, centring, and the float32 result
        "unmask_per_coordinate_s": statistics.median(u for _, u in rounds) / n,
        "chunk_threads_speedup_2": pooled[1] / pooled[2],  # masking 4 chunks, 2 threads over 1
        "noise_threads_speedup_2": noise_pooled[1] / noise_pooled[2],  # drawing 2 chunks of share
        "x25519_agreement_s": median_seconds(lambda: ours.exchange(theirs), 200),
        "ed25519_sign_s": median_seconds(lambda: signer.sign(message), 200),
        "ed25519_verify_s": median_seconds(lambda: verifier.verify(signature, message), 200),
    }


def lora_parameters(layers: int, hidden: int, kv_dim: int, rank: int, targets: list[str]) -> int:
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (hidden, hidden),
    }
    return layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def project(
    costs_by_word: dict[str, dict[str, float]], model: dict[str, Any], workers: list[int]
) -> dict[str, Any]:
    """Per-worker secure-aggregation seconds per step at each worker count, and its share of a step,
    from the per-unit costs of the mask word the worker count's modulus needs ("32" or "64" bits)."""
    d = lora_parameters(model["layers"], model["hidden"], model["kv_dim"], model["rank"], model["targets"])
    flops = 6 * model["model_parameters"] * model["tokens_per_worker_step"]
    step_s = flops / (model["peak_tflops"] * 1e12 * model["mfu"]) * model["dp_step_factor"]
    bandwidth = model["network_gbytes_per_s"] * 1e9
    out: dict[str, Any] = {"adapter_parameters": d, "modelled_step_seconds": step_s, "workers": {}}
    quantizer = Quantizer.for_clip(1.0, d, model["rounding_overhead"])
    noise_std = model["noise_multiplier"] * quantizer.sensitivity.l2  # the aggregate's, t = 0
    for n in workers:
        k = default_degree(n)
        sample_rate = n * model["sequences_per_worker_step"] / model["dataset_records"]
        bits, _ = quantizer.modulus_bits_needed(int(model["dataset_records"]), sample_rate, n, noise_std)
        word = "32" if bits <= 32 else "64"
        costs = costs_by_word[word]
        compute = {
            "quantize": d * costs["quantize_per_coordinate_s"],
            "mask": d * costs["mask_per_coordinate_base_s"]
            + k * d * costs["mask_per_coordinate_per_neighbour_s"],
            "sum_sketch": d * costs["sketch_per_coordinate_s"],
            # the measured sketch and unmask check 2 parties' signatures; n parties' add 2(n − 2)
            "verify_2n_signatures": 2 * (n - 2) * costs["ed25519_verify_s"],
            "unmask": d * costs["unmask_per_coordinate_s"],
        }
        # Ring all-reduce: 2·d·(n−1)/n words per worker; int64 where the plain path sends float32.
        # plus every rank's challenge and its sketch message (16 bytes per row and chunk), all-gathered
        chunks = -(-d // CHUNK)
        extra_bytes = 2 * d * (n - 1) / n * (8 - 4) + n * (
            2 * (_HEADER.size + _SIGNATURE) + 16 * SKETCH_ROWS * chunks
        )
        network = extra_bytes / bandwidth + 2 * (n - 1) * model["network_latency_s"]
        noise = d * costs["skellam_per_coordinate_s"]
        overhead = sum(compute.values()) + network
        complete_graph = overhead + (n - 1 - k) * d * costs["mask_per_coordinate_per_neighbour_s"]
        vector_work = sum(v for key, v in compute.items() if key != "verify_2n_signatures")
        two_threads = overhead - vector_work + vector_work / costs["chunk_threads_speedup_2"]
        out["workers"][str(n)] = {
            "neighbours": k,
            "modulus_bits_needed": bits,
            "mask_word_bits": int(word),
            "per_worker_seconds": {**compute, "network_extra": network},
            "skellam_noise_seconds": noise,
            "overhead_seconds": overhead,
            "overhead_fraction_of_step": overhead / step_s,
            "overhead_fraction_of_step_2_threads": two_threads / step_s,  # the measured 2-thread speedup
            "skellam_noise_seconds_2_threads": noise / costs["noise_threads_speedup_2"],
            "overhead_fraction_if_noise_not_hidden": (overhead + noise) / step_s,
            "session_setup_seconds_per_attempt": k * (costs["x25519_agreement_s"] + 2e-5),
            "complete_graph_overhead_fraction": complete_graph / step_s,
        }
    return out


def _measured_run(
    cfg: TenSafeConfig,
    work: Path,
    workers: int,
    secure: bool,
    steps: int,
    batch_size: int,
    warmup: int,
    modulus_bits: int,
    timeout_s: float,
) -> dict[str, Any]:
    tag = f"w{workers}-{'secagg' if secure else 'plain'}"
    out = work / tag
    env = {**os.environ, "HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
    args = [
        str(Path(sys.executable).with_name("tensafe")),
        "launcher=ray",
        f"launcher.num_workers={workers}",
        "launcher.init.num_cpus=2",
        f"+launcher.init._temp_dir={tempfile.mkdtemp(prefix='rb')}",
        f"model={cfg.model.name}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch_size}",
        "train.eval_max_examples=8",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        f"privacy.secure_aggregation={str(secure).lower()}",
        f"privacy.distributed.modulus_bits={modulus_bits}",
        f"hydra.run.dir={out}",
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{tag} failed: {done.stderr[-2000:]}")
    times = [e["time"] for e in StepJournal(out / JOURNAL_FILENAME).entries()]
    intervals = np.diff(times)[warmup:]
    median = float(np.median(intervals))
    result: dict[str, Any] = {
        "workers": workers,
        "secure_aggregation": secure,
        "steps": steps,
        "median_step_seconds": median,
        "samples_per_second": batch_size / median,
    }
    timings_file = out / "secure_aggregation_timings.json"
    if timings_file.exists():
        timings = json.loads(timings_file.read_text())
        result["secure_aggregation_median_seconds"] = {
            p: float(np.median(timings[p][warmup:])) for p in PHASES
        }
    return result


def run(
    cfg: TenSafeConfig,
    *,
    name: str,
    steps: int,
    batch_size: int,
    warmup_steps: int,
    measured_workers: list[int],
    micro_repeats: int,
    modulus_bits: int,
    projected_workers: list[int],
    projection: dict[str, Any],
    run_timeout_s: float,
    output_dir: str,
) -> dict[str, Any]:
    """Measure, project, and write `distributed_dp-<hardware>-<model>.json` under `output_dir`."""
    # per-unit costs first, on a quiet machine (no Ray processes starting or winding down)
    costs = {"32": per_unit_costs(micro_repeats, 32), "64": per_unit_costs(micro_repeats, 48)}
    work = Path(tempfile.mkdtemp(prefix="tensafe-ddp-bench-"))
    variants = {}
    for workers in measured_workers:
        for secure in (False, True):
            row = _measured_run(
                cfg, work, workers, secure, steps, batch_size, warmup_steps, modulus_bits, run_timeout_s
            )
            variants[f"w{workers}_{'secagg' if secure else 'plain'}"] = row
            print(
                f"  {workers} worker(s), secure aggregation {secure}: "
                f"{row['samples_per_second']:.1f} samples/s, median step {row['median_step_seconds']:.3f} s",
                flush=True,
            )
    projected = project(costs, projection, projected_workers)
    for n, row in projected["workers"].items():
        print(
            f"  projected {n} workers (k={row['neighbours']}): secure aggregation "
            f"{row['overhead_seconds']:.3f} s/step = {100 * row['overhead_fraction_of_step']:.1f}% of a "
            f"{projected['modelled_step_seconds']:.2f} s step",
            flush=True,
        )
    sixteen = projected["workers"].get("16")
    result = {
        "benchmark": name,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "model": cfg.model.name,
        "hardware": cfg.hardware.name,
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "machine": machine(),
        "variants": variants,
        "per_unit_costs_by_mask_word_bits": costs,
        "projection_assumptions": projection,
        "projection": projected,
        "targets": {"secure_aggregation_fraction_of_step_at_16_workers_max": 0.10},
        "targets_met": {"fraction_at_16": bool(sixteen and sixteen["overhead_fraction_of_step"] <= 0.10)},
        "ratios": {
            "secagg_over_plain_step_w2": variants["w2_secagg"]["median_step_seconds"]
            / variants["w2_plain"]["median_step_seconds"]
        }
        if "w2_secagg" in variants
        else {},
    }
    return write(result, output_dir, f"{name}-{cfg.hardware.name}-{cfg.model.name}.json")
