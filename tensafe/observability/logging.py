"""Console logging for `tensafe` runs: our own lines stay visible, third-party chatter does not."""

from __future__ import annotations

import importlib.util
import logging
import warnings

# Messages from libraries we use correctly that say nothing to a TenSafe user.
_IGNORED_WARNINGS = (
    r".*is_gradient_checkpointing.*",  # transformers asks itself, on PEFT wrap
    r".*isinstance\(treespec, LeafSpec\).*",  # lightning's own pytree shim
    r".*Full backward hook is firing.*",  # Opacus hooks on frozen-input LoRA layers
    r".*weights_only.*",
    r"Optimal order is the largest alpha.*",  # Opacus RDP probing tiny ε during calibration
)
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "transformers", "peft", "httpx")


def quiet_third_party() -> None:
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if importlib.util.find_spec("lightning") is None:
        return  # the HE-only environment (CPython 3.10, make test-openfhe) has no training stack
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO; ours must come after)

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
