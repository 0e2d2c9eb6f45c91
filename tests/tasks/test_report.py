"""task=report: a sweep folder becomes a table sorted by ε, a Pareto frontier and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from tensafe.errors import ConfigError
from tensafe.tasks import report
from tensafe.tasks.context import RunContext

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# job → (overrides, metrics or None for a job that failed before writing metrics.json)
SWEEP = {
    0: (
        ["privacy.noise_multiplier=2.0", "optim.lr=1e-3"],
        {
            "epsilon": 1.5,
            "delta": 1e-5,
            "eval_loss_base": 3.0,
            "eval_loss_adapter": 2.6,
            "noise_multiplier": 2.0,
            "steps": 20,
        },
    ),
    1: (
        ["privacy.noise_multiplier=0.6", "optim.lr=1e-3"],
        {
            "epsilon": 9.0,
            "delta": 1e-5,
            "eval_loss_base": 3.0,
            "eval_loss_adapter": 2.1,
            "noise_multiplier": 0.6,
            "steps": 20,
        },
    ),
    2: (
        ["privacy.noise_multiplier=1.0", "optim.lr=1e-3"],
        {
            "epsilon": 12.0,
            "delta": 1e-5,
            "eval_loss_base": 3.0,
            "eval_loss_adapter": 2.3,
            "noise_multiplier": 1.0,
            "steps": 20,
        },
    ),
    3: (
        ["privacy=none", "optim.lr=1e-3"],
        {
            "epsilon": None,
            "delta": None,
            "eval_loss_base": 3.0,
            "eval_loss_adapter": 1.8,
            "noise_multiplier": None,
            "steps": 20,
        },
    ),
    4: (["privacy.noise_multiplier=0.3", "optim.lr=1e-3"], None),
}


def make_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "2025-01-01" / "12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for num, (overrides, metrics) in SWEEP.items():
        hydra_dir = sweep / str(num) / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if metrics is not None:
            (sweep / str(num) / "metrics.json").write_text(json.dumps({"task": "train", **metrics}))
    return sweep


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_collect_jobs_reads_every_job_folder_and_marks_failed_ones(tmp_path):
    jobs = report.collect_jobs(make_sweep(tmp_path))
    assert [j.num for j in jobs] == [0, 1, 2, 3, 4]
    assert jobs[0].overrides == {"privacy.noise_multiplier": "2.0", "optim.lr": "1e-3"}
    assert jobs[4].metrics is None and "no metrics.json" in jobs[4].problem
    assert jobs[3].is_no_dp and not jobs[3].is_dp


def test_frontier_keeps_runs_no_smaller_epsilon_beats(tmp_path):
    jobs = report.collect_jobs(make_sweep(tmp_path))
    # job 2 (ε=12, loss 2.3) is beaten by job 1 (ε=9, loss 2.1); the no-DP job is a reference only.
    assert report.pareto_frontier(jobs) == [0, 1]


def test_table_has_one_row_per_job_sorted_by_epsilon_with_varying_overrides_only(tmp_path):
    jobs = report.collect_jobs(make_sweep(tmp_path))
    head, _, *rows = table_rows(report.render_table(jobs, report.pareto_frontier(jobs)))
    assert head == [
        "job",
        "privacy",
        "privacy.noise_multiplier",
        "ε",
        "δ",
        "eval loss before",
        "eval loss after",
        "steps",
        "note",
    ]
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[0] == ["0", "—", "2.0", "1.5", "1e-05", "3.0000", "2.6000", "20", "Pareto frontier"]
    assert rows[2][-1] == ""
    assert rows[3][1] == "none" and rows[3][3] == "—" and rows[3][-1] == "no DP"
    assert rows[4][-1] == "failed: no metrics.json" and rows[4][3] == "—"


def test_plot_writes_a_png(tmp_path):
    jobs = report.collect_jobs(make_sweep(tmp_path))
    png = report.plot(jobs, report.pareto_frontier(jobs), tmp_path / "frontier.png")
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def compose_report(sweep_dir: str):
    with initialize_config_module("tensafe.conf", version_base="1.3"):
        return compose("config", overrides=["task=report", f"task.sweep_dir={sweep_dir}", "model=tiny_llama"])


def test_run_writes_report_plot_and_metrics(tmp_path):
    sweep = make_sweep(tmp_path)
    ctx = RunContext.create(compose_report(str(sweep)), tmp_path / "out")
    metrics = report.run(ctx)
    assert metrics["jobs"] == 5 and metrics["frontier"] == [0, 1] and metrics["failed"] == [4]
    text = (sweep / "report.md").read_text()
    assert "`optim.lr=1e-3`" in text and ctx.config_digest in text
    assert (sweep / "frontier.png").read_bytes().startswith(PNG_MAGIC)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["task"] == "report" and written["frontier"] == [0, 1]


def test_missing_sweep_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="task.sweep_dir.*does not exist"):
        report.collect_jobs(tmp_path / "nowhere")


def test_folder_without_job_metrics_names_what_it_found(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ConfigError, match=r"task.sweep_dir.*no job folder.*found: 0/, notes.txt"):
        report.collect_jobs(tmp_path)


def test_single_job_folder_is_refused_with_a_hint(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="one job's folder"):
        report.collect_jobs(tmp_path)
