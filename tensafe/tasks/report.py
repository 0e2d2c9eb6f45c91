"""task=report: turn a multirun sweep folder into `report.md` (one row per job) and `frontier.png`
(ε against eval loss, with the privacy–utility Pareto frontier).

The pure steps (collect_jobs, pareto_frontier, render_table, plot) work on plain folders and
need no Hydra; `run` wires them to the task's config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from omegaconf import OmegaConf

from tensafe.config.schema import ReportTask
from tensafe.errors import ConfigError
from tensafe.tasks.context import RunContext

_KEY = "task.sweep_dir"
_SHOWN_ENTRIES = 10  # how many entries of a wrong folder the error message lists


@dataclass(frozen=True)
class Job:
    """One job folder of a sweep (`<sweep>/<num>/`)."""

    num: int
    overrides: dict[str, str]  # from .hydra/overrides.yaml, key → value as typed
    metrics: dict[str, Any] | None  # None: the job failed (see `problem`)
    problem: str | None = None

    def number(self, key: str) -> float | None:
        """A numeric metric, or None where the job did not report one."""
        value = (self.metrics or {}).get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    @property
    def epsilon(self) -> float | None:
        return self.number("epsilon")

    @property
    def loss_after(self) -> float | None:
        return self.number("eval_loss_adapter")

    @property
    def is_dp(self) -> bool:
        return self.epsilon is not None

    @property
    def is_no_dp(self) -> bool:
        # train writes `"epsilon": null` when privacy=none; a job that failed has no metrics at all.
        return self.metrics is not None and "epsilon" in self.metrics and self.metrics["epsilon"] is None


def _parse_overrides(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    parsed: dict[str, str] = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        # `+key=v` and `++key=v` set the same key as `key=v`; the prefix is not part of its name.
        parsed[key.lstrip("+")] = value
    return parsed


def _read_metrics(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, "failed: no metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"failed: unreadable metrics.json ({err.__class__.__name__})"
    if not isinstance(metrics, dict):
        return None, "failed: metrics.json is not a JSON object"
    return metrics, None


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "the folder is empty"
    more = f", … ({len(names) - _SHOWN_ENTRIES} more)" if len(names) > _SHOWN_ENTRIES else ""
    return "found: " + ", ".join(names[:_SHOWN_ENTRIES]) + more


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every numbered job folder of a Hydra multirun folder, in job order (failed ones included)."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        what = "is a file" if sweep.exists() else "does not exist"
        raise ConfigError(
            _KEY, str(sweep_dir), f"{what}; point it at a multirun folder (multirun/<date>/<time>)"
        )
    folders = sorted(
        (p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    jobs = []
    for folder in folders:
        metrics, problem = _read_metrics(folder / "metrics.json")
        jobs.append(
            Job(int(folder.name), _parse_overrides(folder / ".hydra" / "overrides.yaml"), metrics, problem)
        )
    if not any(job.metrics is not None for job in jobs):
        hint = (
            "this is one job's folder, not a multirun folder; use its parent"
            if (sweep / "metrics.json").is_file()
            else _listing(sweep)
        )
        raise ConfigError(_KEY, str(sweep_dir), f"no job folder (0/, 1/, …) with a metrics.json; {hint}")
    return jobs


def varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (or that some jobs do not set)."""
    keys = sorted({k for job in jobs for k in job.overrides})
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def pareto_frontier(jobs: list[Job]) -> list[int]:
    """Job numbers of the DP runs that no other run beats: lowest eval loss for at most that ε.

    Ordered by ε. Runs without DP (ε null) or without a finite ε and loss are not candidates.
    """
    points = sorted(
        (job.epsilon, job.loss_after, job.num)
        for job in jobs
        if job.epsilon is not None
        and job.loss_after is not None
        and math.isfinite(job.epsilon)
        and math.isfinite(job.loss_after)
    )
    frontier, best = [], math.inf
    for _, loss, num in points:
        if loss < best:
            frontier.append(num)
            best = loss
    return frontier


def _order(job: Job) -> tuple:
    # DP runs by ε, then runs without DP, then failed ones; job number breaks ties.
    group = 0 if job.is_dp else 1 if job.metrics is not None else 2
    return (group, job.epsilon if job.is_dp else 0.0, job.num)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value).replace("|", "\\|")


def _note(job: Job, frontier: list[int]) -> str:
    if job.problem:
        return job.problem
    if job.num in frontier:
        return "Pareto frontier"
    return "no DP" if job.is_no_dp else ""


def render_table(jobs: list[Job], frontier: list[int]) -> str:
    """A markdown table, one row per job, sorted by ε; varying overrides are columns."""
    keys = varying_keys(jobs)
    head = ["job", *keys, "ε", "δ", "eval loss before", "eval loss after", "steps", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in sorted(jobs, key=_order):
        steps = job.number("steps")
        row = [
            str(job.num),
            *(_cell(job.overrides.get(k), "") for k in keys),
            _cell(job.epsilon, ".4g"),
            _cell(job.number("delta"), ".3g"),
            _cell(job.number("eval_loss_base"), ".4f"),
            _cell(job.loss_after, ".4f"),
            _cell(int(steps) if steps is not None else None, ""),
            _note(job, frontier),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _labels(jobs: list[Job]) -> dict[int, str]:
    """Each job's varying overrides, keys shortened to their last segment where that stays unique."""
    keys = varying_keys(jobs)
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: t if tails.count(t) == 1 else k for k, t in zip(keys, tails)}
    return {
        job.num: ", ".join(f"{short[k]}={job.overrides[k]}" for k in keys if k in job.overrides)
        for job in jobs
    }


def plot(jobs: list[Job], frontier: list[int], path: str | Path, title: str = "") -> Path:
    """Scatter of ε against eval loss after training, the frontier as a step line, and each run
    without DP as a dashed horizontal reference line. Written as PNG with the Agg backend."""
    labels = _labels(jobs)
    point: dict[int, tuple[float, float]] = {  # job → (ε, eval loss with the adapter), both finite
        j.num: (j.epsilon, j.loss_after)
        for j in jobs
        if j.epsilon is not None
        and j.loss_after is not None
        and math.isfinite(j.epsilon)
        and math.isfinite(j.loss_after)
    }
    dp = [j for j in jobs if j.num in point]
    no_dp = [(j, j.loss_after) for j in jobs if j.is_no_dp and j.loss_after is not None]

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if dp:
        ax.scatter(
            [point[j.num][0] for j in dp], [point[j.num][1] for j in dp], color="tab:blue", zorder=3,
            label="DP run",
        )
        for j in dp:
            ax.annotate(
                labels[j.num] or f"job {j.num}",
                point[j.num],
                xytext=(5, 5),
                textcoords="offset points",
                fontsize=7,
            )
        eps = [point[n][0] for n in frontier]
        loss = [point[n][1] for n in frontier]
        # Hold the last frontier loss out to the largest ε so the step reads "best loss up to ε".
        epsilons = [point[j.num][0] for j in dp]
        right = max(epsilons)
        ax.step(
            [*eps, right],
            [*loss, loss[-1]],
            where="post",
            color="tab:orange",
            linewidth=2,
            zorder=2,
            label="Pareto frontier",
        )
        if min(epsilons) > 0 and right / min(epsilons) >= 10:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short decades
        ticks = sorted(set(epsilons))
        if len(ticks) <= 8:  # label the ε values the sweep actually has
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    for i, (j, no_dp_loss) in enumerate(no_dp):
        ax.axhline(
            no_dp_loss, color="tab:gray", linestyle="--", linewidth=1.2, label="no DP" if i == 0 else None
        )
        text = f"no DP ({labels[j.num]})" if labels[j.num] else "no DP"
        ax.annotate(
            text,
            (1.0, no_dp_loss),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 4),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color="tab:gray",
        )
    if not dp and not no_dp:
        ax.text(0.5, 0.5, "no job reported eval_loss_adapter", transform=ax.transAxes, ha="center")
    deltas = {j.number("delta") for j in dp}
    delta = f" at δ = {deltas.pop():.3g}" if len(deltas) == 1 and None not in deltas else ""
    ax.set_xlabel(f"ε{delta} (lower is more private)")
    ax.set_ylabel("eval loss after training (lower is better)")
    ax.set_title(title or "privacy–utility frontier")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12, y=0.08)  # room for the point labels, which sit up and right of each point
    if dp or no_dp:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _document(sweep: Path, jobs: list[Job], frontier: list[int], digest: str) -> str:
    keys = set(varying_keys(jobs))
    common = sorted({(k, v) for job in jobs for k, v in job.overrides.items() if k not in keys})
    failed = [job.num for job in jobs if job.metrics is None]
    lines = [
        f"# Sweep report: {sweep}",
        "",
        f"{len(jobs)} jobs, {len(failed)} failed. Report config digest: `{digest}`.",
    ]
    if common:
        lines.append("Overrides shared by every job: " + ", ".join(f"`{k}={v}`" for k, v in common) + ".")
    lines += ["", render_table(jobs, frontier), "![privacy–utility frontier](frontier.png)", ""]
    return "\n".join(lines)


def run(ctx: RunContext) -> dict[str, Any]:
    sweep = Path(ctx.task_config(ReportTask).sweep_dir)
    jobs = collect_jobs(sweep)
    frontier = pareto_frontier(jobs)
    report = sweep / "report.md"
    report.write_text(_document(sweep, jobs, frontier, ctx.config_digest))
    png = plot(
        jobs,
        frontier,
        sweep / "frontier.png",
        title=f"privacy–utility frontier: {sweep.parent.name}/{sweep.name}",
    )
    metrics = {
        "jobs": len(jobs),
        "failed": [job.num for job in jobs if job.metrics is None],
        "report": str(report),
        "plot": str(png),
        "frontier": frontier,
    }
    ctx.write_metrics(metrics)
    return metrics
