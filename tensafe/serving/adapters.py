"""LoRA adapters for serving: read an adapter folder (as task=train writes it) into plain factors.

Serving does not wrap the model in PEFT: the engine holds each adapter's factors and applies them
per batch row (see `multi_lora`), and an HE evaluator holds only the factors of its own adapter.
Only what the engine computes exactly is accepted: plain LoRA on linear layers (no DoRA, no bias,
no modules_to_save, no per-module rank or alpha overrides); anything else is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tensafe.errors import ConfigError
from tensafe.security.package import is_package

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED: dict[str, Any] = {  # adapter_config key → the value the engine needs
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
    "layer_replication": None, "alpha_pattern": {}, "rank_pattern": {}, "trainable_token_indices": None,
}


@dataclass(frozen=True)
class LoRAFactors:
    """One adapted linear module: Δ(x) = scale · x·Aᵀ·Bᵀ with PEFT's A (r × h_in) and B (h_out × r)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """(h_in, r, h_out)."""
        return self.lora_a.shape[1], self.lora_a.shape[0], self.lora_b.shape[0]

    def evaluator_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """A (h_in × r) and B (r × h_out) in float64, as an HE evaluator takes them."""
        return (self.lora_a.detach().double().cpu().numpy().T.copy(),
                self.lora_b.detach().double().cpu().numpy().T.copy())


@dataclass(frozen=True)
class Adapter:
    """A named adapter: its folder, rank and the factors of every adapted module (base-model names)."""

    name: str
    path: str
    rank: int
    modules: dict[str, LoRAFactors]
    digest: str  # SHA-256 of the package file, or of the adapter's weights file
    manifest: dict | None = None  # the verified TSSP manifest, when it came from a package
    signer: str | None = None  # the key id that signed the package


def read_adapter(name: str, source: str | Path, key: str | None = None, trust=None) -> Adapter:
    """The adapter in folder `source`, or in the TSSP package `source` (a `.tssp` file), which is
    read only if it verifies against `trust` (a `PackageTrust`); `key` names the config key to blame."""
    key = key or f"serving.adapters.{name}"
    path = Path(source)
    if is_package(path):
        return _open_package(name, path, trust, key)[0]
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(key, str(source), f"not an adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}) "
                          "nor a .tssp package")
    try:
        config, weights = (path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()
    except OSError as err:
        raise ConfigError(key, str(source), f"unreadable adapter folder: {err.strerror}") from None
    return parse_adapter(name, str(path), config, weights, key)


def adapter_record(adapter: Adapter, he: dict | None = None) -> dict:
    """What the audit chain and the serving evidence record about a served adapter: where it came
    from, its digest, and the HE parameters it runs under (None: plaintext)."""
    manifest = adapter.manifest or {}
    return {"adapter": adapter.name, "path": adapter.path, "digest": adapter.digest,
            "package_id": manifest.get("package_id"), "signed": adapter.manifest is not None, "he": he,
            "signer": adapter.signer, "version": (manifest.get("release") or {}).get("version"),
            "rank": adapter.rank, "modules": len(adapter.modules)}


def check_signed(source: str | Path, allow_unsigned: bool, key: str) -> None:
    """Refuse a bare adapter folder where only verified packages may be served."""
    if not allow_unsigned and not is_package(source):
        raise ConfigError(key, str(source), "this server serves only signed packages (serving.allow_unsigned="
                          "false): build one with `tensafe task=package` and serve the .tssp")


_MATERIALIZED = "tensafe-adapter-"


def _open_package(name: str, path: Path, trust, key: str) -> tuple[Adapter, dict[str, bytes]]:
    """The adapter of a package that verifies against `trust`, and its config and weights files."""
    if trust is None:
        raise ConfigError(key, str(path), "a package needs a trust store: set security.keystore")
    opened = trust.open(path, key, adapter=name)
    members = {m: opened.members.get(m) for m in (CONFIG_FILE, WEIGHTS_FILE)}
    config, weights = members[CONFIG_FILE], members[WEIGHTS_FILE]
    if config is None or weights is None:
        raise ConfigError(key, str(path), f"the package lacks {CONFIG_FILE} or {WEIGHTS_FILE}")
    adapter = parse_adapter(name, str(path), config, weights, key, opened.manifest, opened.digest)
    return replace(adapter, signer=opened.signer.key_id), {CONFIG_FILE: config, WEIGHTS_FILE: weights}


def materialize(name: str, source: str | Path, trust, key: str) -> tuple[Adapter, str]:
    """The adapter `source` holds and a folder an engine that loads from disk (vLLM) can read it
    from: a folder as it is, or a verified package's files written to a fresh private folder
    (0700, named for this process; the package is opened once). The engine removes that folder
    with `remove_materialized` when it drops the adapter."""
    if not is_package(source):
        return read_adapter(name, source, key), str(source)
    adapter, members = _open_package(name, Path(source), trust, key)
    folder = Path(tempfile.mkdtemp(prefix=f"{_MATERIALIZED}{os.getpid()}-{name}-"))  # mkdtemp: mode 0700
    try:
        for member, data in members.items():
            (folder / member).write_bytes(data)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return adapter, str(folder)


def _materialized_by(path: Path) -> int | None:
    """The pid that materialized `path`, if it is such a folder in the temp folder; None otherwise."""
    if path.parent != Path(tempfile.gettempdir()) or not path.name.startswith(_MATERIALIZED):
        return None
    pid = path.name[len(_MATERIALIZED):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def remove_materialized(path: str | Path) -> None:
    """Delete a decrypted copy this process made with `materialize`; anything else is left alone."""
    if _materialized_by(Path(path)) == os.getpid():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_materialized() -> list[Path]:
    """Delete decrypted copies left by tensafe processes of this user that are gone (a crash, a kill)."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{_MATERIALIZED}*"):
        pid = _materialized_by(path)
        if pid is None or pid == os.getpid() or not path.is_dir() or path.stat().st_uid != os.geteuid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def parse_adapter(name: str, origin: str, config_bytes: bytes, weights: bytes, key: str,
                  manifest: dict | None = None, digest: str | None = None) -> Adapter:
    """An adapter from its adapter_config.json and adapter_model.safetensors bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(key, origin, f"unreadable {CONFIG_FILE}: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise ConfigError(key, origin, f"peft_type is {peft_type!r}; serving takes LORA")
    for option, wanted in _UNSUPPORTED.items():
        if config.get(option, wanted) not in (wanted, None, False, {}, []):
            raise ConfigError(key, origin, f"{option}={config[option]!r} is not supported by the engine")
    rank, alpha = _number(config, "r", int, key, origin), _number(config, "lora_alpha", float, key, origin)
    if rank < 1:
        raise ConfigError(key, origin, f"{CONFIG_FILE}: r={rank}; a LoRA rank is at least 1")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    try:
        tensors = load_safetensors(weights)
    except (OSError, SafetensorError) as err:
        raise ConfigError(key, origin, f"unreadable {WEIGHTS_FILE}: {err}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in tensors.items():
        match = _KEY.match(tensor_name.removeprefix(_PEFT_PREFIX))
        if match is None:
            raise ConfigError(key, origin, f"tensor {tensor_name!r} is not a LoRA A or B matrix")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    modules = {}
    for module, pair in sorted(pairs.items()):
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ConfigError(key, origin, f"module {module!r} lacks a rank-{rank} A and B pair")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ConfigError(key, origin, f"module {module!r} has non-finite weights")
        modules[module] = LoRAFactors(a.float(), b.float(), scale)
    if not modules:
        raise ConfigError(key, origin, "the adapter has no LoRA modules")
    return Adapter(name, origin, rank, modules, digest or hashlib.sha256(weights).hexdigest(), manifest)


def _number(config: dict, field: str, kind: type, key: str, origin: str):
    """`config[field]` as an int or a finite float, or a ConfigError naming the field."""
    value = config.get(field)
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        wanted = "an integer" if kind is int else "a finite number"
        raise ConfigError(key, origin, f"{CONFIG_FILE}: {field} is {value!r}; it must be {wanted}")
    return kind(value)


def check_fits(adapter: Adapter, model: torch.nn.Module, key: str) -> None:
    """Every module of `adapter` is a linear layer of `model` with matching width."""
    named = dict(model.named_modules())
    for module, factors in adapter.modules.items():
        layer = named.get(module)
        layer = getattr(layer, "base", layer)  # already wrapped for another adapter
        if not isinstance(layer, torch.nn.Linear):
            raise ConfigError(key, adapter.path, f"module {module!r} is not a linear layer of this model")
        h_in, _, h_out = factors.shape
        if (layer.in_features, layer.out_features) != (h_in, h_out):
            raise ConfigError(
                key, adapter.path, f"module {module!r} is {h_in}→{h_out} in the adapter but "
                f"{layer.in_features}→{layer.out_features} in the model (another base model?)"
            )
