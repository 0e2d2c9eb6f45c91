"""Checkpoints: adapter weights, resumable trainer state, the privacy ledger and the dataset key,
side by side."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from tensafe.data.digest import KEY_FILE, DatasetKey
from tensafe.errors import ConfigError, DataError
from tensafe.privacy.ledger import LEDGER_FILENAME, PrivacyLedger

ADAPTER = "adapter"
TRAINER_STATE = "trainer_state.ckpt"


def write_checkpoint(
    folder: Path, trainer: L.Trainer, module, config_digest: str, dataset_key: DatasetKey, records: list[dict]
) -> Path:
    """`folder/adapter/`, `folder/trainer_state.ckpt` (LoRA weights, optimizer, loop, accountant),
    `folder/privacy_ledger.json` and `folder/private/dataset_key.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    module.model.save_pretrained(folder / ADAPTER)
    trainer.save_checkpoint(folder / TRAINER_STATE)
    module.mechanism.ledger(config_digest).save(folder)
    dataset_key.save(folder, records)
    return folder


class PeriodicCheckpoint(L.Callback):
    """Every `every_n_steps` optimizer steps (0: never) and once at the end of training."""

    def __init__(
        self, root: Path, every_n_steps: int, config_digest: str, dataset_key: DatasetKey, records: list[dict]
    ):
        self.root, self.every_n_steps, self.config_digest = root, every_n_steps, config_digest
        self.dataset_key, self.records = dataset_key, records
        self.last: Path | None = None

    def _save(self, trainer: L.Trainer, module) -> None:
        self.last = write_checkpoint(
            self.root / f"step-{trainer.global_step:06d}", trainer, module, self.config_digest,
            self.dataset_key, self.records,
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        target = self.root / f"step-{trainer.global_step:06d}"
        if self.last != target:
            self._save(trainer, module)


def resume_state(
    folder: str, mechanism_name: str, records: list[dict]
) -> tuple[Path, PrivacyLedger, DatasetKey]:
    """The trainer state to resume from, its ledger and its dataset key, after checking they belong
    to this run's training records and mechanism."""
    path = Path(folder)
    state, ledger_path = path / TRAINER_STATE, path / LEDGER_FILENAME
    if not state.is_file() or not ledger_path.is_file() or not (path / KEY_FILE).is_file():
        raise ConfigError(
            "train.resume_from",
            folder,
            f"not a checkpoint folder (needs {TRAINER_STATE}, {LEDGER_FILENAME} and {KEY_FILE})",
        )
    ledger = PrivacyLedger.load(ledger_path)
    if ledger.mechanism != mechanism_name:
        raise ConfigError(
            "train.resume_from",
            folder,
            f"checkpoint was trained with privacy={ledger.mechanism}, this run uses {mechanism_name}",
        )
    try:
        key = DatasetKey.load(path)
    except DataError as err:
        raise ConfigError("train.resume_from", folder, str(err)) from None
    if ledger.dataset_digest != key.digest(records):
        raise ConfigError(
            "train.resume_from",
            folder,
            "checkpoint was trained on other data (its dataset digest, keyed by its "
            f"{KEY_FILE}, differs for this run's training records)",
        )
    return state, ledger, key
