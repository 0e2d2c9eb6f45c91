"""The `tensafe` entrypoint: the Hydra app. `tensafe [overrides]` runs one job, `tensafe -m` sweeps.

User errors (bad config values, unknown options, unusable data) print one line and exit with
status 2; no traceback.
"""

from __future__ import annotations

import io
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from tensafe.errors import UserError

_CONFIG_ERROR_EXIT = 2


class _StderrGate(io.TextIOBase):
    """Holds Hydra's own stderr until a job starts, so composition errors become one line."""

    def __init__(self, real):
        self.real, self.held, self.open = real, io.StringIO(), False

    def write(self, s: str) -> int:
        return (self.real if self.open else self.held).write(s)

    def flush(self) -> None:
        self.real.flush()

    def release(self) -> None:
        self.open = True
        self.real.write(self.held.getvalue())
        self.held = io.StringIO()


def _one_line(hydra_message: str) -> str:
    lines = []
    for line in hydra_message.splitlines():
        line = line.strip()
        if not line or line.startswith("Set the environment variable HYDRA_FULL_ERROR"):
            continue
        if line.startswith("Config search path"):
            break
        lines.append(line)
    return " ".join(lines) or "config composition failed"


def _fail(message: str) -> None:
    print(f"tensafe: {message}", file=sys.__stderr__ if isinstance(sys.stderr, _StderrGate) else sys.stderr)
    sys.exit(_CONFIG_ERROR_EXIT)


@hydra.main(version_base="1.3", config_path="pkg://tensafe.conf", config_name="config")
def _job(raw: DictConfig) -> None:
    if isinstance(sys.stderr, _StderrGate):
        sys.stderr.release()
    from tensafe.observability.logging import quiet_third_party
    from tensafe.tasks.context import RunContext

    quiet_third_party()

    try:
        ctx = RunContext.create(raw, HydraConfig.get().runtime.output_dir)
        launcher = instantiate(raw.launcher)
        runner = instantiate(raw.task.runner)
        launcher.launch(runner, ctx)
    except UserError as err:
        _fail(str(err))


# `tensafe <verb> ...`: small utilities that act on artifacts (tensafe/verbs, docs/architecture.md);
# each module has `cli(argv) -> int` with argparse subcommands and --help. Everything else is the
# Hydra app.
VERBS = {name: f"tensafe.verbs.{name}" for name in ("keys", "package", "audit", "evidence")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in VERBS:
        import importlib

        verb = importlib.import_module(VERBS[sys.argv[1]])
        try:
            code = verb.cli(sys.argv[2:])
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        except UserError as err:
            _fail(str(err))
        except BrokenPipeError:
            # The reader went away (`tensafe audit show | head`): nothing more to say.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        sys.exit(code)
    gate = _StderrGate(sys.stderr)
    sys.stderr = gate
    try:
        _job()
    except SystemExit as done:
        if done.code not in (0, None) and not gate.open:
            sys.stderr = gate.real
            _fail(f"config error: {_one_line(gate.held.getvalue())}")
        raise
    finally:
        if sys.stderr is gate:
            if not gate.open:
                gate.real.write(gate.held.getvalue())
            sys.stderr = gate.real


if __name__ == "__main__":
    main()
