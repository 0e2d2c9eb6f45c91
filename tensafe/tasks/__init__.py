"""Tasks: what `task=` runs. Each exposes `run(ctx: RunContext) -> dict` (its metrics)."""
