"""The privacy journal of a distributed run: one line per noisy step that was started, written
before the step's aggregate exists, kept across attempts (docs/distributed.md).

A restarted worker group resumes the model from the last checkpoint Ray registered, which may be
many steps behind what was executed. The accountant is rebuilt from the journal, not from the
checkpoint, so every executed step counts, a re-executed one again: ε never under-reports.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tensafe.errors import UserError
from tensafe.privacy.accounting import Step, _appended

JOURNAL_FILENAME = "privacy_journal.jsonl"


class JournalError(UserError):
    """A journal line that cannot be read: the run's spent privacy is unknown."""


class JournalEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempt: str = Field(min_length=1)  # the secure-aggregation session or the attempt's id
    executed: int = Field(ge=0)  # how many noisy steps the job had started before this one
    model_step: int = Field(ge=0)  # the optimizer step the model was at
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    time: float


class StepJournal:
    """Append-only JSON lines, fsynced per entry."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries = self._read()

    def _read(self) -> list[JournalEntry]:
        if not self.path.exists():
            return []
        entries = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                entries.append(JournalEntry.model_validate_json(line))
            except ValidationError as err:
                raise JournalError(
                    f"{self.path}:{number}: not a journal entry ({err.errors()[0]['msg']})"
                ) from None
        return entries

    def append(
        self, attempt: str, model_step: int, noise_multiplier: float, sample_rate: float
    ) -> JournalEntry:
        entry = JournalEntry(
            attempt=attempt,
            executed=len(self._entries),
            model_step=model_step,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            time=time.time(),
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(entry.model_dump_json() + "\n")
            out.flush()
            os.fsync(out.fileno())
        self._entries.append(entry)
        return entry

    @property
    def executed(self) -> int:
        return len(self._entries)

    def history(self) -> list[Step]:
        history: list[Step] = []
        for entry in self._entries:
            history = _appended(history, entry.noise_multiplier, entry.sample_rate, 1)
        return history

    def summary(self) -> dict[str, Any]:
        return {"steps_executed": self.executed, "attempts": len({e.attempt for e in self._entries})}

    def entries(self) -> list[dict[str, Any]]:
        return [e.model_dump() for e in self._entries]
