"""TSSP packaging: build (sign, and encrypt), verify (signatures + payload digest) and open (decrypt +
member digests) times and the size overhead, for the embedded model's adapter and for a synthetic
8B-scale adapter (Llama-3-8B shapes: 32 layers, hidden 4096, MLP 14336, 8 KV heads of 128; LoRA on
every linear layer). Medians of `repeats`; one fresh signing and recipient key per run."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tensafe.benchmarks.results import machine, median_seconds

from tensafe.security.crypto import Recipient, Signer
from tensafe.security.package import adapter_members, build_package, read_package, verify_bytes

LLAMA3_8B = {"layers": 32, "hidden": 4096, "intermediate": 14336, "kv": 1024}


def _synthetic_8b(folder: Path, rank: int, dtype: str) -> None:
    from safetensors.torch import save_file

    h, m, kv = LLAMA3_8B["hidden"], LLAMA3_8B["intermediate"], LLAMA3_8B["kv"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, m), "mlp.up_proj": (h, m),
              "mlp.down_proj": (m, h)}
    to = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LLAMA3_8B["layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator).to(to)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator).to(to)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": sorted(s.split(".")[1] for s in shapes),
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B (shapes only; synthetic weights)",
    }))


def _embedded(cfg, folder: Path) -> None:
    from tensafe.models.loader import load_model
    from tensafe.models.lora import random_adapter

    random_adapter(load_model(cfg.model, seed=cfg.seed).model, cfg.model.lora, seed=0).save_pretrained(folder)


def measure(name: str, folder: Path, repeats: int, work: Path) -> list[dict]:
    members = adapter_members(folder)
    raw = sum(len(v) for v in members.values())
    signer, recipient = Signer.generate(), Recipient.generate()
    trusted = {signer.key_id: signer.public}
    rows = []
    for encrypted in (False, True):
        path = work / f"{name}-{'enc' if encrypted else 'plain'}.tssp"
        recipients = [recipient.public] if encrypted else []
        opener = recipient if encrypted else None
        build_s = median_seconds(
            lambda p=path, r=recipients: build_package(p, members, {"name": name}, signer, r), repeats
        )
        verify_s = median_seconds(lambda p=path: verify_bytes(p.read_bytes(), trusted), repeats)
        open_s = median_seconds(lambda p=path, o=opener: read_package(p, trusted, o), repeats)
        size = path.stat().st_size
        rows.append({"adapter": name, "encrypted": encrypted, "members_bytes": raw, "package_bytes": size,
                     "overhead_bytes": size - raw, "overhead_percent": 100 * (size - raw) / raw,
                     "build_s": build_s, "verify_s": verify_s, "open_s": open_s,
                     "build_mb_per_s": raw / 1e6 / build_s, "open_mb_per_s": raw / 1e6 / open_s})
        print(f"  {name:22} {'encrypted' if encrypted else 'signed   '} {raw / 1e6:8.2f} MB  "
              f"+{size - raw:6d} B ({100 * (size - raw) / raw:.3f}%)  build {build_s:.3f} s  "
              f"verify {verify_s:.3f} s  open {open_s:.3f} s", flush=True)
    return rows


def run(cfg, *, name: str, rank: int, dtype: str, repeats: int, output_dir: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tensafe-packaging-bench-"))
    _embedded(cfg, work / "embedded")
    _synthetic_8b(work / "synthetic_8b", rank, dtype)
    results = measure(f"{cfg.model.name}_r{cfg.model.lora.r}", work / "embedded", repeats, work)
    results += measure(f"llama3_8b_shapes_r{rank}_{dtype}", work / "synthetic_8b", repeats, work)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"packaging-{cfg.hardware.name}.json"
    result = {
        "benchmark": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "repeats": repeats, "results": results, "path": str(path),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result
