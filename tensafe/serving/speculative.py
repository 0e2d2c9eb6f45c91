"""Speculative decoding: draft tokens by n-gram prompt lookup, or from the base model.

`ngram` (no second model): a decoding sequence often repeats spans of its own prompt or output
(names, codes, quoted text, lists). Before a decode step the engine looks up the longest recent
n-gram (`ngram_min` ≤ n ≤ `ngram`) that ends the sequence's history earlier in that history, and
proposes the `tokens` tokens that followed it (one-token matches are mostly chance, so
`ngram_min` is 2 by default).
`base_model`: for rows with an adapter, the engine's own model with every adapter off drafts
`tokens` tokens greedily, one plaintext forward each, on the rows' own cache (whose positions it
adds are forgotten after). An adapter nudges the base model, so the base model's picks are often
the adapted model's; drafting costs base-model forwards, which is worth it where the adapter's
forward is the expensive one (HE-LoRA). Rows without an adapter draft nothing this way: their
draft model would be the model itself.
The step then feeds every row its last token plus its drafts; the logits at each position verify
the drafts one by one (greedy: a draft stands while it is the token the model picks), and the
row emits every accepted draft plus the model's own next token. So a step yields 1 … k+1 tokens per
row for one forward pass, and, under HE-LoRA, one encryption round trip carries k+1 tokens per row.
Greedy output is exactly the output without speculation: only tokens the model picks are emitted.
"""

from __future__ import annotations

from dataclasses import dataclass

DRAFTERS = ("ngram", "base_model")


@dataclass(frozen=True)
class Speculation:
    """`tokens` drafts per row and decode step, from n-grams of `ngram_min` … `ngram` tokens or
    from the base model (`drafter`)."""

    tokens: int
    ngram: int = 3
    ngram_min: int = 2
    drafter: str = "ngram"

    def __post_init__(self) -> None:
        if self.tokens < 1 or not 1 <= self.ngram_min <= self.ngram:
            raise ValueError(f"speculation needs tokens ≥ 1 and 1 ≤ ngram_min ≤ ngram, got {self.tokens}, "
                             f"{self.ngram_min}, {self.ngram}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"speculation drafts by {' or '.join(DRAFTERS)}, not {self.drafter!r}")


def ngram_drafts(history: list[int], tokens: int, ngram: int, ngram_min: int = 1) -> list[int]:
    """Up to `tokens` tokens that followed the latest earlier occurrence of the longest suffix of
    `history` of `ngram_min` … `ngram` tokens; [] when no such suffix occurs earlier."""
    for n in range(min(ngram, len(history) - 1), ngram_min - 1, -1):
        suffix = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):  # latest first; the suffix itself excluded
            if history[start : start + n] == suffix:
                return history[start + n : start + n + tokens]
    return []
