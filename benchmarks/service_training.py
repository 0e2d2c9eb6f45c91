"""Training-service overhead: the median time of one DP-SGD step (forward_backward + optim_step on
B examples of T tokens) (a) in process, by the service's own Learner, (b) through a live
`tensafe task=service` with the official `tinker` client and (c) with tensafe.client; and (d) the
steps/s of two tinker clients training two models at once. The same Learner code runs in (a) and
inside the service, so b/a and c/a are what the protocol, the futures, the store and the audit
chain cost. Variants run in interleaved rounds so a slow spell of the machine falls on all of them.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensafe.benchmarks.processes import ServerProcess, free_port
from tensafe.benchmarks.results import machine, write

from tensafe.config.schema import TenSafeConfig
from tensafe.serving.auth import hash_api_key

TARGET_SERVICE_OVER_IN_PROCESS = 1.10
API_KEY = "tml-benchmark-service-key"


def _examples(batch_size: int, seq_len: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, vocab, size=(batch_size, seq_len + 1))
    return [(row[:-1].tolist(), row[1:].tolist()) for row in rows]


def _batches(
    count: int, batch_size: int, seq_len: int, vocab: int
) -> list[list[tuple[list[int], list[int]]]]:
    # a fresh batch per step: the service refuses an example repeated within a step, not across steps
    return [_examples(batch_size, seq_len, vocab, seed) for seed in range(count)]


def _in_process(cfg: TenSafeConfig, spec: dict, batches, lr: float) -> list[float]:
    from tensafe.privacy.accounting import PrivacyAccountant
    from tensafe.service import wire
    from tensafe.service.learner import Learner
    from tensafe.service.policy import effective_policy

    svc = cfg.service
    policy = effective_policy(svc.policy, None)
    learner = Learner(
        cfg.model,
        wire.LoraSpec(**spec),
        policy,
        svc.lora_alpha,
        svc.micro_batch_size,
        svc.max_datums_per_step,
    )
    accountant = PrivacyAccountant(policy.accountant)
    adam = wire.AdamStep(learning_rate=lr)
    times = []
    for batch in batches:
        start = time.perf_counter()
        learner.forward_backward(
            [wire.Example(tokens=t, target_tokens=y) for t, y in batch], forward_only=False
        )
        learner.optim_step(adam, accountant)
        times.append(time.perf_counter() - start)
    return times


def _tinker(url: str, model: str, spec: dict, batches, lr: float) -> list[float]:
    import tinker
    from tinker import types

    times = []
    with tinker.ServiceClient(base_url=url, api_key=API_KEY) as sc:
        tc = sc.create_lora_training_client(base_model=model, **spec).result()
        for batch in batches:
            data = [
                types.Datum(
                    model_input=types.ModelInput.from_ints(t),
                    loss_fn_inputs={"target_tokens": y, "weights": [1.0] * len(y)},  # type: ignore[dict-item]
                )
                for t, y in batch
            ]
            start = time.perf_counter()
            fb = tc.forward_backward(data, "cross_entropy")
            step = tc.optim_step(types.AdamParams(learning_rate=lr))
            fb.result()
            step.result()
            times.append(time.perf_counter() - start)
    return times


def _tensafe_client(url: str, model: str, spec: dict, batches, lr: float) -> list[float]:
    from tensafe import client as ts

    lora = ts.LoRAConfig(**spec)
    times = []
    with ts.ServiceClient(url, API_KEY, timeout_s=600) as sc:
        tc = sc.create_training_client(ts.TrainingConfig(model_ref=model, lora_config=lora))
        for batch in batches:
            start = time.perf_counter()
            fb = tc.forward_backward([{"tokens": t, "target_tokens": y} for t, y in batch])
            step = tc.optim_step(ts.AdamParams(learning_rate=lr))
            fb.result()
            step.result()
            times.append(time.perf_counter() - start)
    return times


def _two_clients(url: str, model: str, spec: dict, batches, lr: float) -> dict[str, float]:
    results: list[list[float]] = [[], []]
    start = time.perf_counter()
    threads = [
        threading.Thread(target=lambda i=i: results[i].extend(_tinker(url, model, spec, batches, lr)))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    steps = sum(len(r) for r in results)
    return {
        "steps": steps,
        "wall_seconds": wall,
        "steps_per_second": steps / wall,
        "median_step_seconds_per_client": statistics.median([x for r in results for x in r]),
    }


def run(
    cfg: TenSafeConfig,
    *,
    name: str,
    batch_size: int,
    seq_len: int,
    rank: int,
    warmup_steps: int,
    measure_steps: int,
    rounds: int,
    two_client_steps: int,
    learning_rate: float,
    startup_timeout_s: float,
    output_dir: str,
) -> dict[str, Any]:
    """Measure every variant and write `service_training-<hardware>-<model>.json` under `output_dir`."""
    from tensafe.models.loader import load_tokenizer

    if seq_len > cfg.model.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is over model.max_seq_len={cfg.model.max_seq_len}")
    vocab = len(load_tokenizer(cfg.model))
    spec = {"rank": rank, "train_attn": True, "train_mlp": False, "train_unembed": False}
    steps = warmup_steps + measure_steps
    work = Path(tempfile.mkdtemp(prefix="tensafe-service-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        [
            "task=service",
            f"model={cfg.model.name}",
            f"service.port={port}",
            f"service.state_dir={work / 'state'}",
            f"service.tenants={{bench:{{api_key_sha256:[{hash_api_key(API_KEY)}]}}}}",
            f"security.audit_db={work / 'audit.sqlite3'}",
            f"hydra.run.dir={work / 'run'}",
        ],
        f"{url}/api/v1/healthz",
        {},
        work / "service.log",
        startup_timeout_s,
    )
    runs: dict[str, list[list[float]]] = {
        "a_in_process": [],
        "b_service_tinker": [],
        "c_service_tensafe_client": [],
    }
    try:
        for r in range(rounds):
            batches = _batches(steps, batch_size, seq_len, vocab)
            runs["a_in_process"].append(_in_process(cfg, spec, batches, learning_rate))
            runs["b_service_tinker"].append(_tinker(url, cfg.model.name, spec, batches, learning_rate))
            runs["c_service_tensafe_client"].append(
                _tensafe_client(url, cfg.model.name, spec, batches, learning_rate)
            )
            print(
                f"  round {r + 1}/{rounds}: "
                + ", ".join(f"{k} {statistics.median(v[-1][warmup_steps:]):.3f} s" for k, v in runs.items()),
                flush=True,
            )
        two = _two_clients(
            url, cfg.model.name, spec, _batches(two_client_steps, batch_size, seq_len, vocab), learning_rate
        )
    finally:
        server.stop()
    variants: dict[str, dict[str, Any]] = {}
    for key, rounds_times in runs.items():
        measured = [t for times in rounds_times for t in times[warmup_steps:]]
        variants[key] = {
            "median_step_seconds": statistics.median(measured),
            "rounds_median_step_seconds": [statistics.median(t[warmup_steps:]) for t in rounds_times],
            "steps_measured": len(measured),
        }
    medians = {key: float(v["median_step_seconds"]) for key, v in variants.items()}
    ratios = {
        "tinker_over_in_process": medians["b_service_tinker"] / medians["a_in_process"],
        "tensafe_client_over_in_process": medians["c_service_tensafe_client"] / medians["a_in_process"],
    }
    result = {
        "benchmark": name,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "model": cfg.model.name,
        "hardware": cfg.hardware.name,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora": spec,
        "policy": cfg.service.policy.model_dump(),
        "warmup_steps": warmup_steps,
        "measure_steps": measure_steps,
        "rounds": rounds,
        "machine": machine(torch=torch.__version__),
        "variants": variants,
        "two_concurrent_clients": two,
        "ratios": ratios,
        "targets": {"service_over_in_process_max": TARGET_SERVICE_OVER_IN_PROCESS},
        "targets_met": {k: v <= TARGET_SERVICE_OVER_IN_PROCESS for k, v in ratios.items()},
    }
    return write(result, output_dir, f"{name}-{cfg.hardware.name}-{cfg.model.name}.json")
