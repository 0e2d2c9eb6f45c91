"""Build model, data, privacy mechanism and trainer from a validated config, and fine-tune."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tensafe.config.schema import TenSafeConfig
from tensafe.data.collate import collate
from tensafe.data.datasets import DataBundle, build_datasets
from tensafe.data.digest import DatasetKey
from tensafe.errors import ConfigError
from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tensafe.privacy.accounting import Step
from tensafe.privacy.distributed import Collective, StepRecorder, WorkerGroup
from tensafe.privacy.mechanisms import Mechanism, build_mechanism, planned_steps
from tensafe.training.checkpoints import ADAPTER, PeriodicCheckpoint, resume_state
from tensafe.training.hardware import apply_hardware
from tensafe.training.loss import evaluate_loss
from tensafe.training.metrics import TrainMetrics
from tensafe.training.module import LoRAFineTuning
from tensafe.training.progress import ProgressLine
from tensafe.training.step_log import PrivateStepLog
from tensafe.training.trainer import build_trainer


@dataclass
class DistributedWorker:
    """One worker of a distributed job (launcher=ray): its collectives, the job's journal, the
    steps the job executed before this attempt, the checkpoint it resumes and its callbacks."""

    collective: Collective
    run_id: str
    journal: StepRecorder | None  # rank 0's
    executed: list[Step]
    resume_from: Path | None
    callbacks: list[L.Callback]


@dataclass
class TrainResult:
    model: Any  # the PEFT model
    tokenizer: Any
    data: DataBundle
    mechanism: Mechanism
    base_digest: str
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    adapter_dir: Path
    ledger_path: Path
    checkpoint_dir: Path | None
    wall_seconds: float
    stopped_by_budget: bool = False

    def metrics(self) -> TrainMetrics:
        return TrainMetrics(**{
            **self.mechanism.summary(),
            "eval_loss_base": self.eval_before["loss"],
            "eval_loss_adapter": self.eval_after["loss"],
            "eval_perplexity_base": self.eval_before["perplexity"],
            "eval_perplexity_adapter": self.eval_after["perplexity"],
            "dataset_size": self.data.train_size,
            "eval_examples": self.eval_after["examples"],
            "dataset_digest": self.mechanism.dataset_digest,
            "base_model_digest": self.base_digest,
            "adapter_dir": str(self.adapter_dir),
            "privacy_ledger": str(self.ledger_path),
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "wall_seconds": self.wall_seconds,
            "stopped_by_budget": self.stopped_by_budget,
        })


def train_adapter(
    cfg: TenSafeConfig,
    logger_cfg: DictConfig,
    output_dir: Path,
    config_digest: str,
    data: DataBundle | None = None,
    worker: DistributedWorker | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter as `cfg` says; `data` replaces the configured data (audit canaries);
    `worker` makes this process one worker of a distributed job."""
    start = time.perf_counter()
    device = apply_hardware(cfg.hardware, dp=cfg.privacy.differentially_private)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    loaded = load_model(cfg.model, seed=cfg.seed)
    if data is None:
        data = build_datasets(cfg.data, loaded.tokenizer, cfg.model.max_seq_len, cfg.seed)
    model = attach_lora(loaded.model, cfg.model.lora, cfg.hardware.gradient_checkpointing).to(device)
    pad_id = loaded.tokenizer.pad_token_id
    eval_collate = partial(collate, pad_token_id=pad_id)
    evaluate = partial(
        evaluate_loss,
        dataset=data.eval,
        collate=eval_collate,
        batch_size=cfg.hardware.micro_batch_size,
        max_examples=cfg.train.eval_max_examples,
        device=device,
    )
    with model.disable_adapter():
        eval_before = evaluate(model)

    steps = planned_steps(cfg.train.max_steps, cfg.train.epochs, cfg.train.batch_size, data.train_size)
    records = data.train.records
    resume_from = str(worker.resume_from) if worker and worker.resume_from else cfg.train.resume_from
    if worker and cfg.train.resume_from:
        raise ConfigError(
            "train.resume_from", cfg.train.resume_from,
            "a distributed job resumes from its own checkpoints (run it again with the same "
            "launcher.run_name); unset train.resume_from",
        )
    if resume_from:
        ckpt_path, resumed, dataset_key = resume_state(resume_from, cfg.privacy.mechanism, records)
    else:
        ckpt_path, resumed, dataset_key = None, None, DatasetKey.generate()
    dataset_key.save(output_dir, records)
    in_model = 0  # optimizer steps the resumed model already holds (a distributed job's checkpoint)
    if worker:
        history: list[Step] = worker.executed  # every executed step, not the checkpoint's
        if resumed:
            in_model = resumed.steps if resumed.steps_in_model is None else resumed.steps_in_model
        group: WorkerGroup | None = WorkerGroup(
            worker.collective, worker.run_id, sum(p.numel() for p in model.parameters() if p.requires_grad),
            worker.journal,
        )
    else:
        history = resumed.resumed_accountant().history if resumed and resumed.accountant else []
        group = None
    mechanism = build_mechanism(
        cfg.privacy,
        dataset_size=data.train_size,
        batch_size=cfg.train.batch_size,
        planned_steps=steps,
        seed=cfg.seed,
        dataset_digest=data.digest(dataset_key),
        resumed_history=history,
        group=group,
        steps_in_model=in_model,
    )
    module = LoRAFineTuning(
        model, mechanism, cfg.optim, cfg.hardware.micro_batch_size, pad_id, compile=cfg.hardware.compile
    )
    loader = DataLoader(
        data.train,
        batch_sampler=mechanism.batch_sampler(mechanism.steps_per_epoch()),
        collate_fn=list,
        num_workers=0,
    )
    checkpoints = PeriodicCheckpoint(
        output_dir / "checkpoints", cfg.train.checkpoint_every_n_steps, config_digest, dataset_key, records
    )
    # Rank 0 of a distributed job writes the checkpoints and prints the progress line; the other
    # workers hold the same model and would only write it again.
    leader = worker is None or worker.collective.rank == 0
    trainer = build_trainer(
        cfg.hardware,
        max_steps=steps,
        output_dir=output_dir,
        logger=instantiate(logger_cfg, save_dir=str(output_dir)),
        callbacks=[
            PrivateStepLog(output_dir),
            *([checkpoints, ProgressLine(cfg.train.log_every_n_steps, steps)] if leader else []),
            *(worker.callbacks if worker else []),
        ],
        log_every_n_steps=cfg.train.log_every_n_steps,
        progress_bar=cfg.train.progress_bar,
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
    eval_after = evaluate(model)

    adapter_dir = output_dir / ADAPTER
    model.save_pretrained(adapter_dir)
    ledger_path = mechanism.ledger(config_digest).save(output_dir)
    return TrainResult(
        model=model,
        tokenizer=loaded.tokenizer,
        data=data,
        mechanism=mechanism,
        base_digest=loaded.digest,
        eval_before=eval_before,
        eval_after=eval_after,
        adapter_dir=adapter_dir,
        ledger_path=ledger_path,
        checkpoint_dir=checkpoints.last,
        wall_seconds=time.perf_counter() - start,
        stopped_by_budget=module.stopped_by_budget,
    )
