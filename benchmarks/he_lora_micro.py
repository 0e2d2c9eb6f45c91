"""HE-LoRA micro-benchmark: one adapted layer, key holder and evaluator in one process.

For each (backend, parameter set, h, r, tokens) it times encrypt (key holder: pack X column-wise,
encrypt, serialize), evaluate (evaluator: deserialize, stage 1 ·A and rescale, stage 2 ·s·B and
rescale, serialize) and decrypt (key holder: deserialize, decrypt, unpack), and records
ciphertext bytes per layer, the max error against float64 s·X·A·B with its derived bound, and the
operation counts. Medians over `repeats`; per-batch and per-token figures.

The own-kernel evaluator and OpenFHE run the same two-stage computation, OpenFHE with its own
ct×scalar and addition calls. OpenFHE's wheels import on CPython 3.10 here (`make bench-he`);
under another interpreter the OpenFHE rows are recorded as skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tensafe.he.backends import build_backend
from tensafe.he.errors import BackendUnavailable
from tensafe.he.lora import Evaluator, KeyHolder, error_bound
from tensafe.he.params import preset

TARGET_SPEEDUP = 10.0  # own kernels vs OpenFHE on evaluate at h=1024, r=16, full slots


def _timed(fn, repeats: int) -> tuple[Any, list[float]]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times


def measure(backend_name: str, params_name: str, h: int, r: int, tokens: int | None, repeats: int) -> dict:
    params = preset(params_name)
    holder = KeyHolder(build_backend(backend_name, params))
    tokens = tokens or params.slots
    rng = np.random.default_rng(h * 1000 + r)
    a = rng.uniform(-1, 1, size=(h, r)) / np.sqrt(h)
    b = rng.normal(size=(r, h)) * 0.05
    s = 2.0
    x = rng.normal(size=(tokens, h))
    evaluator = Evaluator(build_backend(backend_name, params), holder.public_context(), a, b, s)

    upload, t_enc = _timed(lambda: holder.to_bytes(holder.encrypt(x)), repeats)
    download, t_eval = _timed(lambda: evaluator.evaluate_bytes(upload), repeats)
    delta, t_dec = _timed(lambda: holder.decrypt(holder.from_bytes(download), tokens), repeats)

    bound = error_bound(params, x, a, s * b, None, holder.secret_slot_norm2(), holder.backend.chain())
    med = {k: statistics.median(v) for k, v in (("encrypt", t_enc), ("evaluate", t_eval), ("decrypt", t_dec))}
    return {
        "backend": backend_name,
        "params": params_name,
        "params_described": params.describe(),
        "chain_bits": [q.bit_length() for q in holder.backend.chain()],
        "ring_degree": params.ring_degree,
        "h": h,
        "r": r,
        "tokens": tokens,
        "repeats": repeats,
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_ms_per_token": 1e3 * v / tokens for k, v in med.items()},
        "times_s": {"encrypt": t_enc, "evaluate": t_eval, "decrypt": t_dec},
        "upload_bytes": len(upload),
        "download_bytes": len(download),
        "max_error": float(np.abs(delta - s * x @ a @ b).max()),
        "error_bound": bound.bound,
        "within_bound": bool(np.abs(delta - s * x @ a @ b).max() <= bound.bound),
        "op_counts": evaluator.last_counters.as_dict(),
    }


def run(
    cfg, *, name: str, backends: list[str], params: list[str], openfhe_params: list[str],
    shapes: list[list[int]], tokens: int | None, repeats: int, output_dir: str,
) -> dict[str, Any]:
    results, skipped = [], []
    for backend_name in backends:
        try:
            for params_name in openfhe_params if backend_name == "openfhe" else params:
                for h, r in shapes:
                    row = measure(backend_name, params_name, h, r, tokens, repeats)
                    results.append(row)
                    print(
                        f"  {backend_name:10} {params_name:14} h={h:<5} r={r:<3} tokens={row['tokens']:<5} "
                        f"encrypt {row['encrypt_s']:.3f} s  evaluate {row['evaluate_s']:.3f} s  "
                        f"decrypt {row['decrypt_s']:.3f} s  max err {row['max_error']:.2e} "
                        f"(bound {row['error_bound']:.2e})",
                        flush=True,
                    )
        except BackendUnavailable as err:
            skipped.append({"backend": backend_name, "reason": str(err)})
    speedups = []
    for theirs in (row for row in results if row["backend"] == "openfhe"):
        for own in results:
            if own["backend"] != "openfhe" and (own["h"], own["r"], own["tokens"]) == (
                theirs["h"], theirs["r"], theirs["tokens"]
            ) and own["ring_degree"] == theirs["ring_degree"]:
                speedups.append({
                    "own_backend": own["backend"], "own_params": own["params"],
                    "openfhe_params": theirs["params"], "h": own["h"], "r": own["r"], "tokens": own["tokens"],
                    "openfhe_evaluate_s": theirs["evaluate_s"], "own_evaluate_s": own["evaluate_s"],
                    "evaluate_speedup": theirs["evaluate_s"] / own["evaluate_s"],
                })
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    path = out_dir / f"he_lora_micro-{cfg.hardware.name}-{tag}.json"
    result = {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "numpy": np.__version__,
        },
        "target": {"evaluate_speedup_vs_openfhe_at_h1024_r16_full_slots": TARGET_SPEEDUP},
        "results": results,
        "speedups": speedups,
        "skipped": skipped,
        "path": str(path),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    for row in speedups:
        print(
            f"  speedup {row['own_params']} vs OpenFHE {row['openfhe_params']} h={row['h']} r={row['r']}: "
            f"{row['evaluate_speedup']:.1f}x on evaluate ({row['openfhe_evaluate_s']:.3f} s -> "
            f"{row['own_evaluate_s']:.3f} s)"
        )
    for row in skipped:
        print(f"  skipped {row['backend']}: {row['reason']}")
    return result
