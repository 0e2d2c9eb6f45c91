"""Writing a file so that a reader sees the whole of it or nothing (temp file, fsync, rename)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_atomically(path: str | Path, parts: bytes | Iterable[bytes]) -> Path:
    """Write `parts` to `path`: a temporary file in the same folder, flushed to disk, then renamed
    over `path`. On any failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in [parts] if isinstance(parts, (bytes, bytearray)) else parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
