"""What a training run reports: the typed content of `task=train`'s metrics.json.

One name per figure, the same in every task that writes it: `eval_loss_base` / `eval_loss_adapter`
(and the perplexities) for the held-out loss without and with the adapter (task=evaluate writes
the same names), `dataset_size` for N, the training records (as in the privacy ledger).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TrainMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mechanism: str
    epsilon: float | None  # None: no differential privacy guarantee (privacy=none)
    delta: float | None
    steps: int
    noise_multiplier: float | None = None  # DP-SGD only, as the next three
    max_grad_norm: float | None = None
    sample_rate: float | None = None
    accountant: str | None = None
    eval_loss_base: float
    eval_loss_adapter: float
    eval_perplexity_base: float
    eval_perplexity_adapter: float
    eval_examples: int
    dataset_size: int
    dataset_digest: str
    base_model_digest: str
    adapter_dir: str
    privacy_ledger: str
    checkpoint_dir: str | None
    wall_seconds: float
    stopped_by_budget: bool = False
    package: str | None = None  # train.package=true: the signed package, and its id
    package_id: str | None = None
    evidence: str | None = None  # with security.signing_key: the run's signed evidence
