"""Validate a composed config once, at the entrypoint, and fingerprint it."""

from __future__ import annotations

import hashlib
import json
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ValidationError

from tensafe.config.schema import TenSafeConfig
from tensafe.errors import ConfigError

_MISSING = "???"
# Discriminated unions put the tag in the error location; users never type it.
_TAGGED = {"task", "privacy", "launcher"}


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


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (through Optional, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class owning the last key of `loc`, found by walking the schema from the root
    (for "unknown key" messages that list the keys of the right group)."""
    model: type[BaseModel] = TenSafeConfig
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if typing.get_origin(annotation) is dict and parts:  # name → spec (serving.adapters.<name>)
            annotation, _ = typing.get_args(annotation)[1], parts.pop(0)
        candidates = _models_in(annotation)
        if len(candidates) > 1 and parts:  # a tagged union: the next location part is the tag
            tag = str(parts.pop(0))
            candidates = [m for m in candidates if _tag_of(m) == tag] or candidates
        if not candidates:
            return None
        model = candidates[0]
    return model


def _tag_of(model: type[BaseModel]) -> str | None:
    for field in model.model_fields.values():
        args = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal and len(args) == 1:
            return str(args[0])
    return None


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
