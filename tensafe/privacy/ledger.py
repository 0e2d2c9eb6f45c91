"""The privacy ledger: the record of a run's privacy mechanism and spent (ε, δ) that travels with
every checkpoint and package as `privacy_ledger.json`, and resumes the accountant's history."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from tensafe import __version__
from tensafe.errors import UserError
from tensafe.files import write_atomically
from tensafe.privacy.accounting import AccountingError, PrivacyAccountant
from tensafe.privacy.skellam import NAME as SKELLAM_RDP
from tensafe.privacy.skellam import Sensitivity, SkellamAccountant

LEDGER_FILENAME = "privacy_ledger.json"

# Fields that only mean something when DP-SGD ran; a run without DP must leave them empty
# rather than carry numbers that look like a guarantee.
_DP_ONLY_FIELDS = (
    "noise_multiplier",
    "max_grad_norm",
    "delta",
    "epsilon",
    "accountant",
    "accountant_state",
    "grad_sample_mode",
)


class LedgerError(UserError):
    """A privacy ledger file that is missing, unreadable or inconsistent (names the file)."""


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class PrivacyLedger(BaseModel):
    """What was promised to the people in the training data, and how it was computed.

    mechanism "dp_sgd": (epsilon, delta)-DP for adding or removing one training record, as
    reported by `accountant` over `accountant_state`'s history. mechanism "none": no differential
    privacy guarantee at all; epsilon is null (unbounded), never a number.
    """

    model_config = ConfigDict(extra="forbid")

    mechanism: Literal["dp_sgd", "none"]
    # poisson: each step's batch drawn by the trainer at q = sample_rate from dataset_size records
    # (task=train). client_batches: the training service's steps over batches a client chose; the
    # server cannot prove any sampling, so every step is accounted at q = 1 and there is no N.
    sampling: Literal["poisson", "client_batches"] = "poisson"
    noise_multiplier: float | None = Field(default=None, gt=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    sample_rate: float = Field(gt=0, le=1)
    expected_batch_size: int = Field(ge=1)
    steps: int = Field(ge=0)  # noisy steps executed and accounted (a distributed re-execution counts again)
    steps_in_model: int | None = Field(default=None, ge=0)  # optimizer steps the saved model holds
    delta: float | None = Field(default=None, gt=0, lt=1)
    epsilon: float | None = Field(default=None, ge=0)
    accountant: Literal["rdp", "prv", "skellam_rdp"] | None = None
    accountant_state: dict[str, Any] | None = None
    dataset_digest: str = Field(min_length=1)
    dataset_size: int | None = Field(default=None, ge=1)  # null only for client_batches
    config_digest: str = Field(min_length=1)
    grad_sample_mode: str | None = None
    secure_mode: bool = False
    # A distributed job: workers, run id, the noise ("gaussian" with its placement, or "skellam"
    # under secure aggregation with its quantization) and the journal's attempts.
    distributed: dict[str, Any] | None = None
    created_at: datetime = Field(default_factory=_utc_now)
    updated_at: datetime = Field(default_factory=_utc_now)
    tensafe_version: str = __version__

    @computed_field  # type: ignore[prop-decorator]
    @property
    def guarantee(self) -> str:
        """Plain-language statement of what the numbers promise (written into the JSON)."""
        if self.mechanism == "none":
            return "none: trained without differential privacy; epsilon is unbounded"
        if self.sampling == "client_batches":
            return ("(epsilon, delta)-DP for adding or removing one example of the batches a client sent, "
                    "every step accounted without subsampling (q = 1)")
        return "(epsilon, delta)-DP for adding or removing one training record"

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        # `guarantee` is derived from the mechanism; a saved copy is re-derived, not trusted.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k != "guarantee"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyLedger:
        for stamp in (self.created_at, self.updated_at):
            offset = stamp.utcoffset()
            if offset is None or offset.total_seconds() != 0:
                raise ValueError(f"timestamps must be UTC with an explicit offset, got {stamp}")
        if self.updated_at < self.created_at:
            raise ValueError("updated_at is before created_at")
        if self.sampling == "poisson" and self.dataset_size is None:
            raise ValueError("a Poisson-sampled run records its dataset_size")
        if self.sampling == "client_batches" and (self.dataset_size is not None or self.sample_rate != 1):
            raise ValueError("client_batches are accounted at sample_rate 1 with no dataset_size")
        if self.mechanism == "none":
            filled = [name for name in _DP_ONLY_FIELDS if getattr(self, name) is not None]
            if filled:
                raise ValueError(f"mechanism 'none' gives no DP guarantee; {filled} must be null")
            return self
        missing = [name for name in _DP_ONLY_FIELDS if getattr(self, name) is None]
        if missing or self.epsilon is None or self.delta is None:
            raise ValueError(f"mechanism 'dp_sgd' needs {missing}")
        if not math.isfinite(self.epsilon):
            raise ValueError("epsilon of a dp_sgd run must be finite")
        if self.dataset_size is not None and self.delta >= 1 / self.dataset_size:
            raise ValueError(f"delta={self.delta} is not < 1/N for N={self.dataset_size}")
        resumed = self.resumed_accountant()
        if resumed.steps != self.steps:
            raise ValueError(f"accountant_state holds {resumed.steps} steps, ledger says {self.steps}")
        return self

    def resumed_accountant(self) -> PrivacyAccountant | SkellamAccountant:
        """The accountant that continues this run's history (resume never restarts at zero)."""
        if self.mechanism != "dp_sgd" or self.accountant is None or self.accountant_state is None:
            raise LedgerError("a run without DP (mechanism 'none') has no accountant to resume")
        state = self.accountant_state
        accountant: PrivacyAccountant | SkellamAccountant
        if self.accountant == SKELLAM_RDP:
            try:
                sensitivity = Sensitivity(float(state["l2_sensitivity"]), float(state["l1_sensitivity"]))
            except (KeyError, TypeError, ValueError) as err:
                raise AccountingError(
                    f"a {SKELLAM_RDP} accountant state names its sensitivities ({err})"
                ) from None
            accountant = SkellamAccountant(sensitivity)
        else:
            accountant = PrivacyAccountant(self.accountant)
        if state.get("accountant") != self.accountant:
            raise AccountingError(
                f"accountant_state was written by {state.get('accountant')!r}, "
                f"ledger says {self.accountant!r}"
            )
        accountant.load_state_dict(state)
        return accountant

    def save(self, directory: str | Path) -> Path:
        """Write `<directory>/privacy_ledger.json` atomically (a reader never sees half a file)."""
        target = Path(directory) / LEDGER_FILENAME
        write_atomically(target, (self.model_dump_json(indent=2) + "\n").encode())
        return target

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read a ledger from a checkpoint directory or from the JSON file itself."""
        path = Path(path)
        file = path / LEDGER_FILENAME if path.is_dir() else path
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LedgerError(f"{file}: no privacy ledger here") from None
        except (OSError, UnicodeDecodeError) as err:
            raise LedgerError(f"{file}: cannot read the privacy ledger ({err})") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<file>'}: {e['msg']}" for e in err.errors()
            )
            raise LedgerError(f"{file}: not a valid privacy ledger ({problems})") from None
        except AccountingError as err:
            raise LedgerError(f"{file}: not a valid privacy ledger ({err})") from None
