"""The Ray launcher: task=train as a Ray Train job (TorchTrainer), on a local Ray or a cluster
(docs/distributed.md).

Every worker runs the single-process training code (`train_adapter`) on its shard with a
`DistributedWorker`: the clipped sums meet in the privacy mechanism's aggregator over
torch.distributed. Rank 0 journals each noisy step to a journal actor on the driver's node before
the step runs, reports checkpoints to Ray every `train.checkpoint_every_n_steps`, and reports its
output folder as the final checkpoint; the driver copies it into the run's output folder and
finishes the task (audit events, package, evidence) as a local run would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import OmegaConf

from tensafe.errors import ConfigError, UserError
from tensafe.privacy.accounting import Step
from tensafe.privacy.journal import JOURNAL_FILENAME, StepJournal
from tensafe.tasks.context import RunContext
from tensafe.training.checkpoints import PeriodicCheckpoint

WORKERS_FILENAME = "workers.jsonl"  # rank, pid and attempt of every worker that started
FIT_RESULT = "fit_result.json"
AGGREGATION_TIMINGS = "secure_aggregation_timings.json"  # rank 0's seconds per phase and step


class LaunchError(UserError):
    """The Ray job could not run or did not finish (names what to change or look at)."""


class JournalActor:
    """Holds the job's privacy journal on the driver's node, across worker-group restarts."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.journal = StepJournal(self.folder / JOURNAL_FILENAME)

    def append(self, attempt: str, model_step: int, noise_multiplier: float, sample_rate: float) -> int:
        return self.journal.append(attempt, model_step, noise_multiplier, sample_rate).executed

    def history(self) -> list[Step]:
        return self.journal.history()

    def summary(self) -> dict[str, Any]:
        return self.journal.summary()

    def register(self, rank: int, pid: int, node: str) -> None:
        with open(self.folder / WORKERS_FILENAME, "a", encoding="utf-8") as out:
            out.write(json.dumps({"rank": rank, "pid": pid, "node": node}) + "\n")


class RayJournal:
    """A worker's handle on the journal actor (tensafe.privacy.distributed.StepRecorder)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def append(self, attempt: str, model_step: int, noise_multiplier: float, sample_rate: float) -> None:
        import ray

        ray.get(self.actor.append.remote(attempt, model_step, noise_multiplier, sample_rate))

    def history(self) -> list[Step]:
        import ray

        return [(float(s), float(q), int(n)) for s, q, n in ray.get(self.actor.history.remote())]

    def summary(self) -> dict[str, Any]:
        import ray

        return ray.get(self.actor.summary.remote())


class RayCheckpointReport(L.Callback):
    """At every checkpoint step, rank 0 reports the checkpoint folder to Ray; the others report."""

    def __init__(self, rank: int, every_n_steps: int):
        self.rank, self.every_n_steps = rank, every_n_steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        import ray.train

        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps:
            return
        if self.rank == 0:  # the only rank that writes checkpoints (train_adapter)
            periodic = next(c for c in trainer.callbacks if isinstance(c, PeriodicCheckpoint))
            assert periodic.last is not None  # it saved this step, earlier in the callback list
            ray.train.report(
                {"step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(periodic.last))
            )
        else:
            ray.train.report({"step": step})


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: train on this rank's shard, rank 0 reports the outputs."""
    import ray
    import ray.train
    import torch.distributed as dist

    from tensafe.config import validate_config
    from tensafe.observability.logging import quiet_third_party
    from tensafe.privacy.distributed import TorchCollective
    from tensafe.privacy.mechanisms import DPSGDMechanism
    from tensafe.training.pipeline import DistributedWorker, train_adapter

    quiet_third_party()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    raw = OmegaConf.create(config["raw"])
    cfg = validate_config(raw)
    journal = RayJournal(config["journal"])
    ray.get(config["journal"].register.remote(rank, os.getpid(), ray.get_runtime_context().get_node_id()))
    executed = journal.history()
    collective = TorchCollective()
    dist.barrier()  # everyone has read the journal before rank 0 can add to it
    checkpoint = ray.train.get_checkpoint()
    resume = checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)
    with tempfile.TemporaryDirectory(prefix="tensafe-ray-") as out, resume as resume_dir:
        worker = DistributedWorker(
            collective=collective,
            run_id=config["run_id"],
            journal=journal if rank == 0 else None,
            executed=executed,
            resume_from=Path(resume_dir) if resume_dir else None,
            callbacks=[RayCheckpointReport(rank, cfg.train.checkpoint_every_n_steps)],
        )
        result = train_adapter(cfg, raw.logger, Path(out), config["config_digest"], worker=worker)
        if rank == 0:
            fit = {
                "metrics": result.metrics().model_dump(),
                "stopped_by_budget": result.stopped_by_budget,
                "output_dir": out,
            }
            (Path(out) / FIT_RESULT).write_text(json.dumps(fit, indent=2, default=str) + "\n")
            mechanism = result.mechanism
            if isinstance(mechanism, DPSGDMechanism) and (timings := mechanism.aggregation_timings()):
                (Path(out) / AGGREGATION_TIMINGS).write_text(json.dumps(timings) + "\n")
            ray.train.report({"final": 1}, checkpoint=ray.train.Checkpoint.from_directory(out))
        else:
            ray.train.report({"final": 1})


class RayLauncher:
    """task=train as a Ray Train `TorchTrainer` job; see conf/launcher/ray.yaml for the keys."""

    def __init__(
        self,
        address: str | None = None,
        num_workers: int = 2,
        resources_per_worker: dict[str, float] | None = None,
        storage_path: str | None = None,
        run_name: str | None = None,
        max_failures: int = 3,
        checkpoint_num_to_keep: int = 2,
        init: dict[str, Any] | None = None,
    ):
        # The values were checked by the config schema (RayLauncherConfig).
        self.address, self.num_workers = address, num_workers
        self.resources_per_worker = dict(resources_per_worker or {"CPU": 1})
        self.storage_path, self.run_name = storage_path, run_name
        self.max_failures, self.checkpoint_num_to_keep = max_failures, checkpoint_num_to_keep
        self.init = {k: v for k, v in (init or {}).items() if v is not None}

    def launch(self, task: Callable[..., Any], cfg: RunContext) -> Any:
        if cfg.cfg.task.name != "train":
            raise ConfigError(
                "launcher",
                "ray",
                f"runs task=train as a Ray Train job; run task={cfg.cfg.task.name} with "
                "launcher=local (sweeps go to Ray with hydra/launcher=ray)",
            )
        if not cfg.cfg.privacy.differentially_private:
            raise ConfigError(
                "privacy", cfg.cfg.privacy.mechanism,
                "launcher=ray trains with DP-SGD, whose aggregation the workers share; use privacy=dp_sgd",
            )
        return task(cfg, fit=self.fit)

    def fit(self, ctx: RunContext):
        try:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        except ImportError:
            raise ConfigError("launcher", "ray", "needs Ray: pip install 'tensafe[ray]'") from None
        from tensafe.tasks.train import FitOutcome
        from tensafe.training.metrics import TrainMetrics

        storage = Path(self.storage_path or ctx.output_dir / "ray").resolve()
        name = self.run_name or ctx.output_dir.name
        job_folder = storage / name
        job_folder.mkdir(parents=True, exist_ok=True)
        started_here = not ray.is_initialized()
        if started_here:
            local = (
                {"include_dashboard": False, "_node_ip_address": "127.0.0.1"} if self.address is None else {}
            )
            ray.init(address=self.address, **{**local, **self.init})
        try:
            actor: Any = (
                ray.remote(JournalActor)
                .options(
                    num_cpus=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(
                        ray.get_runtime_context().get_node_id(), soft=False
                    ),
                )
                .remote(str(job_folder))
            )
            result = self._trainer(ctx, actor, storage, name).fit()
            summary: dict[str, Any] = ray.get(actor.summary.remote())
        except Exception as err:
            if type(err).__name__ in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
                raise LaunchError(
                    f"the Ray Train job {name!r} failed after launcher.max_failures={self.max_failures} "
                    f"restarts: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                ) from err
            raise
        finally:
            if started_here:
                ray.shutdown()
        if result.checkpoint is None:
            raise LaunchError(f"the Ray Train job {name!r} finished without its final outputs")
        with result.checkpoint.as_directory() as final:
            shutil.copytree(final, ctx.output_dir, dirs_exist_ok=True)
        shutil.copy2(job_folder / JOURNAL_FILENAME, ctx.output_dir / JOURNAL_FILENAME)
        fit: dict[str, Any] = json.loads((ctx.output_dir / FIT_RESULT).read_text())
        (ctx.output_dir / FIT_RESULT).unlink()
        moved = {
            key: value.replace(fit["output_dir"], str(ctx.output_dir)) if isinstance(value, str) else value
            for key, value in fit["metrics"].items()
        }
        print(
            f"ray: {self.num_workers} workers, {summary['steps_executed']} noisy steps executed over "
            f"{summary['attempts']} attempt(s); journal {ctx.output_dir / JOURNAL_FILENAME}",
            flush=True,
        )
        metrics = TrainMetrics.model_validate(moved)
        return FitOutcome(metrics, Path(metrics.privacy_ledger), bool(fit["stopped_by_budget"]))

    def _trainer(self, ctx: RunContext, actor: Any, storage: Path, name: str):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        gpu = ctx.cfg.hardware.accelerator == "cuda"
        return TorchTrainer(
            _worker_loop,
            train_loop_config={
                "raw": OmegaConf.to_container(ctx.raw, resolve=True),
                "config_digest": ctx.config_digest,
                "run_id": f"{name}:{ctx.config_digest}",
                "journal": actor,
            },
            scaling_config=ScalingConfig(
                num_workers=self.num_workers, use_gpu=gpu, resources_per_worker=self.resources_per_worker
            ),
            run_config=RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=self.checkpoint_num_to_keep),
            ),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        )
