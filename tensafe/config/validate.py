"""Validate a composed config once, at the entrypoint, and fingerprint it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ValidationError

from tensafe.config.schema import TenSafeConfig
from tensafe.errors import ConfigError

_MISSING = "???"
# Discriminated unions put the tag in the error location; users never type it.
_TAGGED = {"task", "privacy"}


def to_container(cfg: DictConfig | dict) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
    return cfg


def _find_missing(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_missing(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif node == _MISSING:
        return path
    return None


def _allowed_keys(model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    return "; allowed keys: " + ", ".join(names)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class owning the last key of `loc` (for 'unknown key' messages)."""
    from tensafe.config import schema

    owners = {
        "model": schema.ModelConfig,
        "data": schema.DataConfig,
        "hardware": schema.HardwareConfig,
        "optim": schema.OptimConfig,
        "train": schema.TrainConfig,
        ("privacy", "dp_sgd"): schema.DPSGD,
        ("privacy", "none"): schema.NoPrivacy,
        ("model", "lora"): schema.LoraConfig,
        ("model", "architecture"): schema.Architecture,
    }
    if len(loc) == 2:
        return TenSafeConfig if loc[0] not in owners else owners.get(loc[0])
    return owners.get(tuple(loc[:2])) or owners.get(tuple(loc[:-1]))


def _as_config_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    shown = [str(p) for i, p in enumerate(loc) if not (i == 1 and loc[0] in _TAGGED)]
    key = ".".join(shown) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        return ConfigError(key, first["input"], "unknown key" + _allowed_keys(_model_at(loc)))
    ctx = first.get("ctx", {})
    if kind == "union_tag_invalid":  # e.g. privacy.mechanism
        return ConfigError(
            f"{key}.{ctx['discriminator'].strip(chr(39))}", ctx["tag"], f"allowed: {ctx['expected_tags']}"
        )
    if kind == "literal_error":
        return ConfigError(key, first["input"], f"allowed: {ctx['expected']}")
    if kind == "value_error":
        return ConfigError(key, allowed=first["msg"].removeprefix("Value error, "))
    value = first["input"]
    if isinstance(value, dict):
        value = "{…}"
    return ConfigError(key, value, first["msg"].replace("Input should be", "must be"))


def validate_config(cfg: DictConfig | dict) -> TenSafeConfig:
    """Return the typed config, or raise ConfigError naming the first bad key."""
    data = to_container(cfg)
    missing = _find_missing(data)
    if missing:
        raise ConfigError(missing, _MISSING, f"required: set it, e.g. `{missing}=...`")
    try:
        return TenSafeConfig.model_validate(data)
    except ValidationError as err:
        raise _as_config_error(err) from None


def config_digest(cfg: DictConfig | dict) -> str:
    """SHA-256 over the canonical JSON of the resolved config."""
    canonical = json.dumps(to_container(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
