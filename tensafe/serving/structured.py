"""Structured outputs: generation constrained to JSON that matches a JSON Schema.

The embedded engine enforces the schema token by token with llguidance (the grammar engine
behind vLLM's `guidance` backend and llama.cpp): before each token is sampled, the tokens that
cannot continue a matching document are masked out; the sequence ends when the document is
complete. The API checks every schema once, up front (`Grammars.check`), so a schema the grammar
engine cannot compile is a 400 naming it, never a failure mid-generation.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

# No whitespace between JSON tokens: a small model otherwise can pad a document with newlines
# until max_tokens, and the output is the same JSON.
_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance JsonCompileOptions


def grammar(schema: dict) -> str:
    """The llguidance grammar of documents matching `schema`."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_OPTIONS)


class Grammars:
    """Compiles JSON schemas against one tokenizer (its llguidance view is built once, lazily)."""

    def __init__(self, tokenizer):
        self._tokenizer, self._ll, self._lock = tokenizer, None, threading.Lock()

    def _llg(self):
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self._tokenizer)
            return self._ll

    def check(self, schema: dict) -> str | None:
        """Why `schema` cannot constrain generation, or None if it can."""
        import llguidance

        try:
            text = grammar(schema)
        except ValueError as err:
            return str(err)
        return llguidance.LLMatcher.validate_grammar(text, self._llg()) or None

    def constraint(self, schema: dict) -> JsonConstraint:
        return JsonConstraint(self, schema)


class JsonConstraint:
    """One sequence's progress through a schema's grammar."""

    def __init__(self, grammars: Grammars, schema: dict):
        import llguidance

        self._matcher = llguidance.LLMatcher(grammars._llg(), grammar(schema), log_level=0)
        self._raise_if_error()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` with every token the grammar does not allow next set to −inf."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[0]].astype(bool)
        self._raise_if_error()
        if allowed.shape[0] < logits.shape[0]:  # model rows past the tokenizer's vocabulary
            allowed = np.concatenate([allowed, np.zeros(logits.shape[0] - allowed.shape[0], bool)])
        return logits.masked_fill(~torch.from_numpy(allowed), float("-inf"))

    def advance(self, token: int) -> None:
        self._matcher.consume_token(token)
        self._raise_if_error()

    @property
    def complete(self) -> bool:
        """The document is whole: nothing but the end of the sequence may follow."""
        return self._matcher.is_stopped()

    def _raise_if_error(self) -> None:
        if self._matcher.is_error():
            raise ValueError(f"structured output: {self._matcher.get_error()}")
