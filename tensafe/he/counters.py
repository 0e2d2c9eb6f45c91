"""Operation counters for one HE call: what the evaluator did, in scheme operations."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class OpCounters:
    """Counts of homomorphic operations; rotations and key switches stay 0 in HE-LoRA."""

    ct_scalar_mults: int = 0
    ct_plain_mults: int = 0
    additions: int = 0
    rescales: int = 0
    rotations: int = 0
    key_switches: int = 0
    levels_used: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __iadd__(self, other: OpCounters) -> OpCounters:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self
