"""HE-LoRA micro-benchmark: one adapted layer, key holder and evaluator in one process.

For each (backend, parameter set, h, r, tokens) it times encrypt (key holder: pack X column-wise,
encrypt, serialize), evaluate (evaluator: deserialize, stage 1 ·A and rescale, stage 2 ·s·B and
rescale, serialize) and decrypt (key holder: deserialize, decrypt, unpack), and records
ciphertext bytes per layer, the max error against float64 s·X·A·B with its derived bound, and the
operation counts. Medians over `repeats`; per-batch and per-token figures.

The own-kernel evaluator and OpenFHE run the same two-stage computation, OpenFHE with its own
ct×scalar and addition calls, at its best: every OpenMP thread count from 1 to the core count is
measured (`openfhe_threads`) and the speedups compare against the fastest, and deserialized
ciphertexts are re-homed in the evaluator's context first (`adopt`: one exact addition each, timed
on its own as `adopt_upload`), without which OpenFHE's arithmetic runs about 4× slower.
OpenFHE's wheels import on CPython 3.10 here (`make bench-he`); under another interpreter the
OpenFHE rows are recorded as skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tensafe.benchmarks.results import machine

from tensafe.he.backends import build_backend
from tensafe.he.errors import BackendUnavailable
from tensafe.he.lora import Evaluator, KeyHolder, error_bound
from tensafe.he.params import preset

TARGET_SPEEDUP = 10.0  # own kernels vs OpenFHE on evaluate at h=1024, r=16, full slots


def _clock(times: dict[str, list[float]], step: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    times.setdefault(step, []).append(time.perf_counter() - start)
    return out


def backend_by_name(name: str, params, threads: int | None = None):
    """A backend by config name; `openfhe_wsum` is OpenFHE with EvalLinearWSum in place of the
    per-scalar EvalMult + EvalAdd loop: its fastest linear combination, reported for reference.
    `threads`: OpenFHE's OpenMP threads."""
    if name.startswith("openfhe"):
        from tensafe.he.backends.openfhe_backend import OpenFHEBackend

        return OpenFHEBackend(params, threads=threads or 1, weighted_sum=name == "openfhe_wsum")
    return build_backend(name, params)


def measure(backend_name: str, params_name: str, h: int, r: int, tokens: int | None, repeats: int,
            threads: int | None = None) -> dict:
    params = preset(params_name)
    holder = KeyHolder(backend_by_name(backend_name, params, threads))
    tokens = tokens or params.slots
    rng = np.random.default_rng(h * 1000 + r)
    a = rng.uniform(-1, 1, size=(h, r)) / np.sqrt(h)
    b = rng.normal(size=(r, h)) * 0.05
    s = 2.0
    evaluator = Evaluator(backend_by_name(backend_name, params, threads), holder.public_context(), a, b, s)
    x = rng.normal(size=(tokens, h))
    x *= min(1.0, evaluator.input_bound / np.abs(x).max())  # inside the adapter's safe input range

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        batch = _clock(times, "encrypt", holder.encrypt, x, evaluator.input_bound)
        upload = _clock(times, "serialize_upload", holder.to_bytes, batch)
        parsed = _clock(times, "deserialize_upload", evaluator.backend.batch_from_bytes, evaluator._public,
                        upload, evaluator.max_message_bytes)
        received = _clock(times, "adopt_upload", evaluator.backend.adopt, evaluator._public, parsed)
        result = _clock(times, "evaluate", evaluator.evaluate, received)
        download = _clock(times, "serialize_download", evaluator.dump, result)
        delta = _clock(times, "decrypt", lambda d: holder.decrypt(holder.from_bytes(d), tokens, h), download)
    med = {k: statistics.median(v) for k, v in times.items()}
    evaluator_steps = ("deserialize_upload", "adopt_upload", "evaluate", "serialize_download")
    med["evaluator_total"] = statistics.median(
        sum(times[k][i] for k in evaluator_steps) for i in range(repeats)
    )
    bound = error_bound(params, x, a, s * b, holder.secret_slot_norm2(), holder.backend.chain())
    return {
        "backend": backend_name,
        "params": params_name,
        "openfhe_threads": threads if backend_name.startswith("openfhe") else None,
        "params_described": params.describe(),
        "chain_bits": [q.bit_length() for q in holder.backend.chain()],
        "ring_degree": params.ring_degree,
        "h": h,
        "r": r,
        "tokens": tokens,
        "repeats": repeats,
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_ms_per_token": 1e3 * v / tokens for k, v in med.items()},
        "times_s": times,
        "upload_bytes": len(upload),
        "download_bytes": len(download),
        "max_error": float(np.abs(delta - s * x @ a @ b).max()),
        "error_bound": bound.bound,
        "within_bound": bool(np.abs(delta - s * x @ a @ b).max() <= bound.bound),
        "op_counts": evaluator.last_counters.as_dict(),
    }


def _line(row: dict) -> str:
    return (
        f"  {row['backend']:10} {row['params']:14} h={row['h']:<5} r={row['r']:<3} tokens={row['tokens']:<5} "
        f"threads={row['openfhe_threads'] or '-'}  encrypt {row['encrypt_s']:.3f} s  "
        f"evaluate {row['evaluate_s']:.3f} s (with wire {row['evaluator_total_s']:.3f} s, "
        f"adopt {row['adopt_upload_s']:.3f} s)  decrypt {row['decrypt_s']:.3f} s  "
        f"max err {row['max_error']:.2e} (bound {row['error_bound']:.2e})"
    )


def run(
    cfg, *, name: str, backends: list[str], params: list[str], openfhe_params: list[str],
    shapes: list[list[int]], tokens: int | None, repeats: int, output_dir: str,
) -> dict[str, Any]:
    results, skipped = [], []
    thread_counts = list(range(1, (os.cpu_count() or 1) + 1))
    for backend_name in backends:
        try:
            for params_name in openfhe_params if backend_name.startswith("openfhe") else params:
                for h, r in shapes:
                    for threads in thread_counts if backend_name.startswith("openfhe") else [None]:
                        row = measure(backend_name, params_name, h, r, tokens, repeats, threads)
                        results.append(row)
                        print(_line(row), flush=True)
        except BackendUnavailable as err:
            skipped.append({"backend": backend_name, "reason": str(err)})
    speedups = []
    best: dict[tuple, dict] = {}  # OpenFHE at its fastest thread count, per backend and shape
    for row in results:
        if row["backend"].startswith("openfhe"):
            key = (row["backend"], row["params"], row["h"], row["r"], row["tokens"])
            if key not in best or row["evaluator_total_s"] < best[key]["evaluator_total_s"]:
                best[key] = row
    for theirs in best.values():
        for own in results:
            if not own["backend"].startswith("openfhe") and (own["h"], own["r"], own["tokens"]) == (
                theirs["h"], theirs["r"], theirs["tokens"]
            ) and own["ring_degree"] == theirs["ring_degree"]:
                speedups.append({
                    "own_backend": own["backend"], "own_params": own["params"], "openfhe": theirs["backend"],
                    "openfhe_params": theirs["params"], "openfhe_threads": theirs["openfhe_threads"],
                    "h": own["h"], "r": own["r"], "tokens": own["tokens"],
                    "openfhe_evaluate_s": theirs["evaluate_s"], "own_evaluate_s": own["evaluate_s"],
                    "evaluate_speedup": theirs["evaluate_s"] / own["evaluate_s"],
                    "openfhe_evaluator_total_s": theirs["evaluator_total_s"],
                    "own_evaluator_total_s": own["evaluator_total_s"],
                    "evaluator_total_speedup": theirs["evaluator_total_s"] / own["evaluator_total_s"],
                })
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    path = out_dir / f"he_lora_micro-{cfg.hardware.name}-{tag}.json"
    result = {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(numpy=np.__version__),
        "target": {"evaluate_speedup_vs_openfhe_at_h1024_r16_full_slots": TARGET_SPEEDUP},
        "results": results,
        "speedups": speedups,
        "skipped": skipped,
        "path": str(path),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    for row in speedups:
        print(
            f"  speedup {row['own_params']} vs {row['openfhe']} {row['openfhe_params']} "
            f"h={row['h']} r={row['r']}: "
            f"{row['evaluate_speedup']:.1f}x on evaluate ({row['openfhe_evaluate_s']:.3f} s -> "
            f"{row['own_evaluate_s']:.3f} s), {row['evaluator_total_speedup']:.1f}x with the wire "
            f"({row['openfhe_evaluator_total_s']:.3f} s -> {row['own_evaluator_total_s']:.3f} s)"
        )
    for row in skipped:
        print(f"  skipped {row['backend']}: {row['reason']}")
    return result
