"""Errors a user can cause. The entrypoint prints them as one line and exits with status 2."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Something the user can fix; the message says what to change."""

    exit_code = 2


class ConfigError(UserError):
    """A config value that is not allowed: names the key path, the value and what is allowed."""

    _NO_VALUE = object()

    def __init__(self, key: str, value: Any = _NO_VALUE, allowed: str = ""):
        self.key, self.value, self.allowed = key, value, allowed
        shown = key if value is ConfigError._NO_VALUE else f"{key}={value!r}"
        super().__init__(f"{shown}: {allowed}")


class DataError(UserError):
    """A dataset file that cannot be used as given (names the file and line)."""
