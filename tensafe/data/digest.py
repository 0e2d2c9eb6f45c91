"""The dataset digest: an HMAC-SHA256 of the training records under a key that only the data
owner keeps, so the digest identifies the training set to whoever holds the key and to nobody
else. (An unkeyed hash would let anyone who knows all records but one test candidates for the
missing one.) The digest goes into the ledger, metrics, evidence and packages; the key stays in
the run's `private/dataset_key.json`, and each checkpoint's, so a resumed run proves it trains on
the same records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tensafe.errors import DataError
from tensafe.files import write_atomically

ALGORITHM = "hmac-sha256"
KEY_BYTES = 32
KEY_FILE = Path("private") / "dataset_key.json"


def canonical_records(records: list[dict]) -> bytes:
    """The records' canonical JSON: the same training set gives the same bytes, whatever file it came from."""
    return json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class DatasetKey:
    key: bytes

    @classmethod
    def generate(cls) -> DatasetKey:
        return cls(os.urandom(KEY_BYTES))

    def digest(self, records: list[dict]) -> str:
        return f"{ALGORITHM}:" + hmac.new(self.key, canonical_records(records), hashlib.sha256).hexdigest()

    def save(self, folder: str | Path, records: list[dict]) -> Path:
        """`folder/private/dataset_key.json` (mode 0600): the key and the digest it gives."""
        body = {
            "algorithm": ALGORITHM,
            "key": self.key.hex(),
            "digest": self.digest(records),
            "records": len(records),
        }
        target = Path(folder) / KEY_FILE
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return write_atomically(target, (json.dumps(body, indent=2) + "\n").encode())

    @classmethod
    def load(cls, folder: str | Path) -> DatasetKey:
        path = Path(folder) / KEY_FILE
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            if body["algorithm"] != ALGORITHM:
                raise ValueError(f"algorithm {body['algorithm']!r}, expected {ALGORITHM!r}")
            key = bytes.fromhex(body["key"])
            if len(key) != KEY_BYTES:
                raise ValueError(f"a {len(key)}-byte key, expected {KEY_BYTES}")
        except FileNotFoundError:
            raise DataError(f"{path}: no dataset key here") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: not a dataset key file ({err})") from None
        return cls(key)
