"""DP overhead benchmark: median step time and peak memory of
(a) a plain PyTorch + PEFT LoRA loop, (b) TenSafe without DP, (c) TenSafe with DP-SGD per
grad-sample mode — same model, same fixed batches of `batch_size` × `seq_len` tokens, one
micro-batch per step. Each variant runs in its own process so its peak memory is its own, and
the variants run in interleaved rounds (a b c… a b c…) so that a slow spell of the machine
falls on all of them. Fixed-size batches (not Poisson draws) make every variant do the same
work per step.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tensafe.benchmarks.results import machine, write

from tensafe.config.schema import DPSGD, NoPrivacy, TenSafeConfig

TARGET_B_OVER_A = 1.05
TARGET_C_OVER_B = 1.10


def _fixed_batches(
    cfg: TenSafeConfig, tokenizer, batch_size: int, seq_len: int, count: int
) -> list[list[dict]]:
    """`count` batches of `batch_size` examples of exactly `seq_len` tokens from the configured data."""
    from tensafe.data.datasets import build_datasets

    data = build_datasets(cfg.data, tokenizer, max(cfg.model.max_seq_len, seq_len), cfg.seed)
    stream = torch.cat([data.train[i]["input_ids"] for i in range(len(data.train))])
    need = batch_size * count * seq_len
    stream = stream.repeat(need // stream.numel() + 1)[:need].view(count, batch_size, seq_len)
    return [[{"input_ids": row, "labels": row.clone()} for row in batch] for batch in stream]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _plain_loop(cfg: TenSafeConfig, batches, device) -> list[float]:
    """(a): what a user would write by hand with transformers + PEFT, no framework, no DP."""
    from peft import LoraConfig, get_peft_model

    from tensafe.data.collate import collate
    from tensafe.models.loader import load_model

    loaded = load_model(cfg.model, seed=cfg.seed)
    lora = cfg.model.lora
    model = get_peft_model(
        loaded.model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int; PEFT uses alpha / r in float
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
        ),
    ).to(device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    times = []
    for examples in batches:
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate(examples, loaded.tokenizer.pad_token_id).items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


class _StepTimer:
    def __init__(self):
        import lightning as L

        class Timer(L.Callback):
            def __init__(inner):
                inner.times, inner._t = [], 0.0

            def on_train_batch_start(inner, trainer, module, batch, idx):
                inner._t = time.perf_counter()

            def on_train_batch_end(inner, trainer, module, outputs, batch, idx):
                if module.device.type == "cuda":
                    torch.cuda.synchronize()
                inner.times.append(time.perf_counter() - inner._t)

        self.callback = Timer()


def _tensafe(cfg: TenSafeConfig, batches, device) -> list[float]:
    """(b)/(c): the framework's own module, mechanism and trainer, as task=train builds them."""
    from torch.utils.data import DataLoader

    from tensafe.models.loader import load_model
    from tensafe.models.lora import attach_lora
    from tensafe.privacy.mechanisms import build_mechanism
    from tensafe.training.module import LoRAFineTuning
    from tensafe.training.trainer import build_trainer

    loaded = load_model(cfg.model, seed=cfg.seed)
    model = attach_lora(loaded.model, cfg.model.lora).to(device)
    size = len(batches[0])
    mechanism = build_mechanism(
        cfg.privacy,
        dataset_size=size * len(batches),
        batch_size=size,
        planned_steps=len(batches),
        seed=cfg.seed,
        dataset_digest="benchmark",
    )
    module = LoRAFineTuning(
        model, mechanism, cfg.optim, micro_batch_size=size, pad_token_id=loaded.tokenizer.pad_token_id
    )
    timer = _StepTimer()
    trainer = build_trainer(
        cfg.hardware, max_steps=len(batches), output_dir=Path("/tmp"), callbacks=[timer.callback]
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    return timer.callback.times


_VARIANTS = {"plain": _plain_loop, "tensafe": _tensafe}


def _measure(kind: str, cfg_dict: dict, batch_size: int, seq_len: int, steps: int, queue) -> None:
    from tensafe.models.loader import load_tokenizer
    from tensafe.observability.logging import quiet_third_party
    from tensafe.training.hardware import apply_hardware

    quiet_third_party()
    cfg = TenSafeConfig.model_validate(cfg_dict)
    device = apply_hardware(cfg.hardware, dp=cfg.privacy.mechanism != "none")
    batches = _fixed_batches(cfg, load_tokenizer(cfg.model), batch_size, seq_len, steps)
    rss_setup = _peak_rss_mb()
    times = _VARIANTS[kind](cfg, batches, device)
    queue.put(
        {
            "step_seconds": times,
            "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_before_model_load_mb": rss_setup,
            "peak_device_mb": _device_peak_mb(device),
            "threads": torch.get_num_threads(),
        }
    )


def _run_process(kind: str, cfg: TenSafeConfig, batch_size: int, seq_len: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_measure, args=(kind, cfg.model_dump(by_alias=True), batch_size, seq_len, steps, queue)
    )
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _summarise(runs: list[dict], warmup: int) -> dict:
    times = [t for run in runs for t in run["step_seconds"][warmup:]]
    return {
        "median_step_seconds": statistics.median(times),
        "measured_steps": len(times),
        "step_seconds_by_round": [run["step_seconds"] for run in runs],
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "peak_rss_before_model_load_mb": max(run["peak_rss_before_model_load_mb"] for run in runs),
        "peak_device_mb": runs[0]["peak_device_mb"],
        "threads": runs[0]["threads"],
    }


def run(
    cfg: TenSafeConfig,
    *,
    name: str,
    batch_size: int,
    seq_len: int,
    warmup_steps: int,
    measure_steps: int,
    rounds: int,
    grad_sample_modes: list[str],
    output_dir: str,
) -> dict[str, Any]:
    """Measure every variant and write `dp_overhead-<hardware>-<model>.json` under `output_dir`."""
    plain_cfg = cfg.model_copy(update={"privacy": NoPrivacy(mechanism="none")})
    plan = {"a_plain_pytorch_peft": ("plain", plain_cfg), "b_tensafe_no_dp": ("tensafe", plain_cfg)}
    dp_base = cfg.privacy if isinstance(cfg.privacy, DPSGD) else None
    for mode in grad_sample_modes:
        dp = DPSGD(
            mechanism="dp_sgd",
            target_epsilon=None,
            noise_multiplier=1.0,
            delta=None,
            max_grad_norm=dp_base.max_grad_norm if dp_base else 1.0,
            accountant="prv",
            grad_sample_mode=mode,  # type: ignore[arg-type]  # checked by the DPSGD model itself
            secure_mode=dp_base.secure_mode if dp_base else False,
            max_epsilon=None,
        )
        plan[f"c_tensafe_dp_{mode}"] = ("tensafe", cfg.model_copy(update={"privacy": dp}))
    runs: dict[str, list[dict]] = {key: [] for key in plan}
    for _ in range(rounds):
        for key, (kind, variant_cfg) in plan.items():
            runs[key].append(
                _run_process(kind, variant_cfg, batch_size, seq_len, warmup_steps + measure_steps)
            )
    variants = {key: _summarise(r, warmup_steps) for key, r in runs.items()}
    b = variants["b_tensafe_no_dp"]["median_step_seconds"]
    ratios = {
        "b_over_a": b / variants["a_plain_pytorch_peft"]["median_step_seconds"],
        "c_over_b": {m: variants[f"c_tensafe_dp_{m}"]["median_step_seconds"] / b for m in grad_sample_modes},
    }
    result = {
        "benchmark": name,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "model": cfg.model.name,
        "hardware": cfg.hardware.name,
        "precision": cfg.hardware.precision,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora": cfg.model.lora.model_dump(),
        "warmup_steps": warmup_steps,
        "measure_steps": measure_steps,
        "rounds": rounds,
        "machine": machine(torch=torch.__version__),
        "variants": variants,
        "ratios": ratios,
        "targets": {"b_over_a_max": TARGET_B_OVER_A, "c_over_b_max": TARGET_C_OVER_B},
        "targets_met": {
            "b_over_a": ratios["b_over_a"] <= TARGET_B_OVER_A,
            "c_over_b": {m: r <= TARGET_C_OVER_B for m, r in ratios["c_over_b"].items()},
        },
    }
    return write(result, output_dir, f"{name}-{cfg.hardware.name}-{cfg.model.name}.json")
