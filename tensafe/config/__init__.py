"""Pydantic schemas for every config group and the one place the composed config is validated."""

from tensafe.config.schema import TenSafeConfig
from tensafe.config.validate import config_digest, validate_config

__all__ = ["TenSafeConfig", "config_digest", "validate_config"]
