"""HE-LoRA packings at decode and prefill sizes: one adapted layer, both roles in one process.

For every (packing, ring, h, r, tokens) it times the key holder (quantize or pack, encrypt,
serialize; deserialize, decrypt, decode; for coefficient packing also the re-encryption of U
between the stages) and the evaluator (deserialize, both stages, serialize), counts the bytes each
way, and checks the decrypted Δ against float64 s·X·A·B and its derived bound. Medians over
`repeats`.

- `coefficients`: the two-round coefficient-encoded protocol (`tensafe.he.coefficient_lora`) at
  every ring of `coefficient_rings`; `coefficients_one_round`: its one-round form (W = s·A·B) at
  decode sizes (up to `one_round_max_tokens` tokens and `one_round_max_h` wide), where saving a
  round trip can be worth its h/r times more products; `…_private`: both with circuit privacy
  (`tensafe.he.circuit_private`) at `circuit_private_rings`, up to `circuit_private_max_tokens`.
- `slots`: CKKS column packing on TenSafe's kernels (`ckks_numpy`) at the smallest preset whose
  slots hold the tokens.
- `openfhe`: the same slot-packed computation on OpenFHE, at every OpenMP thread count from 1 to
  the core count (the fastest is the baseline); `openfhe_coefficients`: the coefficient-packed
  block products on OpenFHE (BFV, `MakeCoefPackedPlaintext`), which caps the plaintext modulus at
  32 bits and so runs at fewer input and weight bits (see `openfhe_coefficients`). Slot packing
  costs the same for any token count up to N/2, so OpenFHE runs once per shape, at the largest
  token count under `openfhe_max_tokens`.
  Its wheels import on CPython 3.10 here (`make bench-he-packing`); elsewhere it is skipped, with
  the reason.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tensafe.benchmarks.he_lora_micro import backend_by_name
from tensafe.benchmarks.results import machine

from tensafe.he.circuit_private import (
    CircuitPrivateEvaluator,
    CircuitPrivateKeyHolder,
    CircuitPrivateParameters,
    circuit_private_delta,
)
from tensafe.he.coefficient import (
    CoefficientParameters,
    choose_blocks,
    decode_outputs,
    encode_inputs,
    encode_weights,
)
from tensafe.he.coefficient_lora import (
    CoefficientEvaluator,
    CoefficientKeyHolder,
    coefficient_delta,
    quantize_rows,
    quantize_weights,
)
from tensafe.he.counters import OpCounters
from tensafe.he.errors import BackendUnavailable
from tensafe.he.lora import Evaluator, KeyHolder, error_bound
from tensafe.he.params import preset

SLOT_PRESETS = ("n4096", "n8192", "n16384", "n32768")  # TenSafe's chains, smallest first


def _factors(h: int, r: int) -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(h * 1000 + r)
    return rng.uniform(-1, 1, size=(h, r)) / np.sqrt(h), rng.normal(size=(r, h)) * 0.05, 2.0


def _x(tokens: int, h: int) -> np.ndarray:
    return np.random.default_rng(tokens + h).normal(size=(tokens, h))


def _timed(spent: dict[str, float], role: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    spent[role] += time.perf_counter() - start
    return out


def coefficients(ring: int, h: int, r: int, tokens: int, repeats: int, rounds: int = 2,
                 private: bool = False) -> dict:
    a, b, s = _factors(h, r)
    holder: CoefficientKeyHolder | CircuitPrivateKeyHolder
    evaluator: CoefficientEvaluator | CircuitPrivateEvaluator
    if private:
        holder = CircuitPrivateKeyHolder(CircuitPrivateParameters.for_ring(ring), rounds=rounds)
        evaluator = CircuitPrivateEvaluator(holder.public_context(), a, b, s)
    else:
        holder = CoefficientKeyHolder(CoefficientParameters.for_ring(ring), rounds=rounds)
        evaluator = CoefficientEvaluator(holder.public_context(), a, b, s)
    x = _x(tokens, h)
    widths = [(h, r), (r, h)] if rounds == 2 else [(h, h)]  # (inputs, outputs) of each stage
    holder_s, evaluator_s, up, down = [], [], 0, 0
    for _ in range(repeats):
        spent = {"holder": 0.0, "evaluator": 0.0}
        values, up, down = x, 0, 0
        for stage, (h_in, h_out) in enumerate(widths, start=1):
            upload, quantized = _timed(spent, "holder", holder.upload, values, h_out)
            reply = _timed(spent, "evaluator", evaluator.evaluate_bytes, upload, stage)
            values = _timed(spent, "holder", holder.download, reply, quantized,
                            evaluator.weight_scales[stage - 1], h_in, h_out)
            up, down = up + len(upload), down + len(reply)
        holder_s.append(spent["holder"])
        evaluator_s.append(spent["evaluator"])
    counters = OpCounters()
    if isinstance(holder, CircuitPrivateKeyHolder) and isinstance(evaluator, CircuitPrivateEvaluator):
        delta, bound = circuit_private_delta(holder, evaluator, x)
        counters = evaluator.last_counters
    elif isinstance(holder, CoefficientKeyHolder) and isinstance(evaluator, CoefficientEvaluator):
        delta, bound = coefficient_delta(holder, evaluator, x, counters)
    error = np.abs(delta - s * x @ a @ b)
    packing = ("coefficients" if rounds == 2 else "coefficients_one_round") + ("_private" if private else "")
    return _row(packing, f"{packing}-n{ring}", ring, h, r, tokens, repeats, holder_s, evaluator_s,
                up, down, rounds, float(error.max()), float(bound.max()), bool((error <= bound).all()),
                counters.as_dict(), None)


def slots(backend_name: str, params_name: str, h: int, r: int, tokens: int, repeats: int,
          threads: int | None = None) -> dict:
    params = preset(params_name)
    a, b, s = _factors(h, r)
    holder = KeyHolder(backend_by_name(backend_name, params, threads))
    evaluator = Evaluator(backend_by_name(backend_name, params, threads), holder.public_context(), a, b, s)
    x = _x(tokens, h)
    x *= min(1.0, evaluator.input_bound / np.abs(x).max())  # inside the adapter's safe input range
    holder_s, evaluator_s, delta = [], [], None
    upload = download = b""
    for _ in range(repeats):
        start = time.perf_counter()
        upload = holder.to_bytes(holder.encrypt(x, evaluator.input_bound))
        middle = time.perf_counter()
        download = evaluator.evaluate_bytes(upload)
        end = time.perf_counter()
        delta = holder.decrypt(holder.from_bytes(download), tokens, h)
        holder_s.append(middle - start + time.perf_counter() - end)
        evaluator_s.append(end - middle)
    bound = error_bound(params, x, a, s * b, holder.secret_slot_norm2(), holder.backend.chain())
    error = float(np.abs(delta - s * x @ a @ b).max())
    packing = "openfhe" if backend_name.startswith("openfhe") else "slots"
    return _row(packing, params_name, params.ring_degree, h, r, tokens, repeats, holder_s, evaluator_s,
                len(upload), len(download), 1, error, bound.bound, error <= bound.bound,
                evaluator.last_counters.as_dict(), threads)


OPENFHE_COEFFICIENT_BITS = 31  # OpenFHE refuses coefficient-packed plaintexts over a 32-bit modulus


def openfhe_coefficients(h: int, r: int, tokens: int, repeats: int, threads: int) -> dict:
    """The same two-stage block products on OpenFHE: BFV, coefficient-packed plaintexts
    (`MakeCoefPackedPlaintext`), ct × pt `EvalMult` and `EvalAdd`, public-key encryption, at the ring
    OpenFHE picks for 128-bit security. Its coefficient encoding caps the plaintext modulus t at
    32 bits (2^31 here), so every result must stay below 2^30: inputs and weights get
    (30 − ⌈log2 h_in⌉)/2 bits each, against 22 and 20 in TenSafe's engine, and the error is larger."""
    from tensafe.he.backends.openfhe_backend import load_openfhe

    ofhe = load_openfhe()
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="openmp")
    parameters = ofhe.CCParamsBFVRNS()
    parameters.SetPlaintextModulus(1 << OPENFHE_COEFFICIENT_BITS)
    parameters.SetMultiplicativeDepth(1)
    parameters.SetSecurityLevel(ofhe.SecurityLevel.HEStd_128_classic)
    cc = ofhe.GenCryptoContext(parameters)
    cc.Enable(ofhe.PKESchemeFeature.PKE)
    cc.Enable(ofhe.PKESchemeFeature.LEVELEDSHE)
    ring = cc.GetRingDimension()
    keys = cc.KeyGen()
    a, b, s = _factors(h, r)
    stages = [a, s * b]
    x = _x(tokens, h)
    holder_s, evaluator_s, up, down, values = [], [], 0, 0, x
    encoded: dict[int, list[list]] = {}
    for _ in range(repeats):
        spent = {"holder": 0.0, "evaluator": 0.0}
        values, up, down = x, 0, 0
        for index, w in enumerate(stages):
            h_in, h_out = w.shape
            bits = (OPENFHE_COEFFICIENT_BITS - 1 - math.ceil(math.log2(h_in))) // 2
            weights = quantize_weights(w, bits)
            blocks = choose_blocks(ring, tokens, h_in, h_out)
            if index not in encoded:  # the evaluator encodes its weights once
                polys = encode_weights(weights.values, blocks, ring)
                encoded[index] = [[cc.MakeCoefPackedPlaintext([int(v) for v in poly]) for poly in row]
                                  for row in polys]
            start = time.perf_counter()
            quantized = quantize_rows(values, bits)
            cts = [[cc.Encrypt(keys.publicKey, cc.MakeCoefPackedPlaintext([int(v) for v in poly]))
                    for poly in row] for row in encode_inputs(quantized.values, blocks, ring)]
            middle = time.perf_counter()
            out = []
            for row in cts:
                results = []
                for ob in range(len(encoded[index][0])):
                    acc = cc.EvalMult(row[0], encoded[index][0][ob])
                    for ib in range(1, len(row)):
                        acc = cc.EvalAdd(acc, cc.EvalMult(row[ib], encoded[index][ib][ob]))
                    results.append(acc)
                out.append(results)
            end = time.perf_counter()
            polys = np.zeros((len(out), len(out[0]), ring), dtype=np.int64)
            for tb, results in enumerate(out):
                for ob, ct in enumerate(results):
                    plain = cc.Decrypt(keys.secretKey, ct)
                    plain.SetLength(ring)
                    polys[tb, ob] = plain.GetCoefPackedValue()
            values = decode_outputs(polys, blocks, tokens, h_out)
            values = values / (quantized.scales[:, None] * weights.scale)
            spent["holder"] += middle - start + time.perf_counter() - end
            spent["evaluator"] += end - middle
            up += sum(len(ofhe.Serialize(ct, ofhe.BINARY)) for row in cts for ct in row)
            down += sum(len(ofhe.Serialize(ct, ofhe.BINARY)) for row in out for ct in row)
        holder_s.append(spent["holder"])
        evaluator_s.append(spent["evaluator"])
    exact = s * x @ a @ b
    error = float(np.abs(values - exact).max())
    products = sum(len(encoded[i]) * len(encoded[i][0]) for i in encoded)
    return _row("openfhe_coefficients", f"openfhe-bfv-n{ring}-t{OPENFHE_COEFFICIENT_BITS}", ring, h, r,
                tokens, repeats, holder_s, evaluator_s, up, down, 2, error, None, None,
                {"ct_plain_mults": products}, threads)


def _row(packing, params, ring, h, r, tokens, repeats, holder_s, evaluator_s, up, down, rounds, error, bound,
         within, counters, threads) -> dict:
    holder_med, evaluator_med = statistics.median(holder_s), statistics.median(evaluator_s)
    return {
        "packing": packing, "params": params, "ring_degree": ring, "h": h, "r": r, "tokens": tokens,
        "openfhe_threads": threads, "repeats": repeats, "round_trips": rounds,
        "key_holder_s": holder_med, "evaluator_s": evaluator_med, "total_s": holder_med + evaluator_med,
        "total_ms_per_token": 1e3 * (holder_med + evaluator_med) / tokens,
        "key_holder_times_s": holder_s, "evaluator_times_s": evaluator_s,
        "upload_bytes": up, "download_bytes": down,
        "max_error": error, "error_bound": bound, "within_bound": within, "op_counts": counters,
    }


def _smallest_slots(tokens: int) -> str:
    """The smallest secure preset whose slots hold `tokens`."""
    return next(name for name in SLOT_PRESETS if preset(name).slots >= tokens)


def _line(row: dict) -> str:
    threads = f" threads={row['openfhe_threads']}" if row["openfhe_threads"] else ""
    return (f"  {row['packing']:12} {row['params']:20} h={row['h']:<5} r={row['r']:<3} "
            f"tokens={row['tokens']:<5}{threads}  key holder {row['key_holder_s']:.4f} s  "
            f"evaluator {row['evaluator_s']:.4f} s  "
            f"up {row['upload_bytes'] / 1e6:.2f} MB  down {row['download_bytes'] / 1e6:.2f} MB  "
            f"max err {row['max_error']:.1e} (bound "
            f"{'none derived' if row['error_bound'] is None else format(row['error_bound'], '.1e')})")


def run(
    cfg, *, name: str, shapes: list[list[int]], tokens: list[int], coefficient_rings: list[int],
    one_round_max_tokens: int, one_round_max_h: int, circuit_private_rings: list[int],
    circuit_private_max_tokens: int, slot_backends: list[str], openfhe_max_tokens: int, repeats: int,
    output_dir: str,
) -> dict[str, Any]:
    results: list[dict] = []
    skipped: list[dict] = []
    for h, r in shapes:
        for count in tokens:
            for ring in coefficient_rings:
                results.append(coefficients(ring, h, r, count, repeats))
                print(_line(results[-1]), flush=True)
                one_round = count <= one_round_max_tokens and h <= one_round_max_h
                if one_round:
                    results.append(coefficients(ring, h, r, count, repeats, rounds=1))
                    print(_line(results[-1]), flush=True)
                if ring in circuit_private_rings and count <= circuit_private_max_tokens:
                    for rounds in (2, 1) if one_round else (2,):
                        results.append(coefficients(ring, h, r, count, repeats, rounds, private=True))
                        print(_line(results[-1]), flush=True)
            if "ckks_numpy" in slot_backends:
                results.append(slots("ckks_numpy", _smallest_slots(count), h, r, count, repeats))
                print(_line(results[-1]), flush=True)
        if "openfhe" in slot_backends:
            count = max(t for t in tokens if t <= openfhe_max_tokens)
            try:
                for threads in range(1, (os.cpu_count() or 1) + 1):
                    results.append(slots("openfhe", _smallest_slots(count), h, r, count, repeats, threads))
                    print(_line(results[-1]), flush=True)
                    results.append(openfhe_coefficients(h, r, count, repeats, threads))
                    print(_line(results[-1]), flush=True)
            except BackendUnavailable as err:
                if not skipped:
                    skipped.append({"packing": "openfhe", "reason": str(err)})
    comparisons = []
    for row in results:
        if not row["packing"].startswith("coefficients"):
            continue
        same = [o for o in results
                if (o["h"], o["r"]) == (row["h"], row["r"]) and o["packing"] in ("slots", "openfhe")]
        slot = next((o for o in same if o["packing"] == "slots" and o["tokens"] == row["tokens"]), None)
        openfhe = [o for o in same if o["packing"] == "openfhe" and o["tokens"] >= row["tokens"]
                   and o["params"] == _smallest_slots(row["tokens"])]
        best = min(openfhe, key=lambda o: o["total_s"]) if openfhe else None
        theirs = [o for o in results if o["packing"] == "openfhe_coefficients"
                  and (o["h"], o["r"], o["tokens"]) == (row["h"], row["r"], row["tokens"])]
        best_coefficients = min(theirs, key=lambda o: o["total_s"]) if theirs else None
        comparisons.append({
            "packing": row["packing"], "h": row["h"], "r": row["r"], "tokens": row["tokens"],
            "coefficient_ring": row["ring_degree"], "round_trips": row["round_trips"],
            "coefficients_total_s": row["total_s"],
            "slots_total_s": slot["total_s"] if slot else None,
            "speedup_vs_slots": slot["total_s"] / row["total_s"] if slot else None,
            "openfhe_best_threads": best["openfhe_threads"] if best else None,
            "openfhe_total_s": best["total_s"] if best else None,
            "speedup_vs_openfhe": best["total_s"] / row["total_s"] if best else None,
            "openfhe_coefficients_best_threads": (best_coefficients["openfhe_threads"]
                                                  if best_coefficients else None),
            "openfhe_coefficients_total_s": best_coefficients["total_s"] if best_coefficients else None,
            "speedup_vs_openfhe_coefficients": (best_coefficients["total_s"] / row["total_s"]
                                                if best_coefficients else None),
            "bytes_vs_slots": ((row["upload_bytes"] + row["download_bytes"])
                               / (slot["upload_bytes"] + slot["download_bytes"])) if slot else None,
        })
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    path = out_dir / f"he_lora_packing-{cfg.hardware.name}-{tag}.json"
    result = {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(numpy=np.__version__),
        "results": results, "comparisons": comparisons, "skipped": skipped, "path": str(path),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    for row in comparisons:
        vs_openfhe = "" if row["speedup_vs_openfhe"] is None else (
            f", {row['speedup_vs_openfhe']:.0f}x vs OpenFHE ({row['openfhe_best_threads']} threads)")
        vs_slots = "" if row["speedup_vs_slots"] is None else f"{row['speedup_vs_slots']:.1f}x vs slots"
        print(f"  {row['packing']} n{row['coefficient_ring']} ({row['round_trips']} round trips) "
              f"h={row['h']} r={row['r']} tokens={row['tokens']}: "
              f"{row['coefficients_total_s']:.4f} s, {vs_slots}{vs_openfhe}")
    for row in skipped:
        print(f"  skipped {row['packing']}: {row['reason']}")
    return result
