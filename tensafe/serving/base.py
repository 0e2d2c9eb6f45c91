"""What the API layer needs from an engine (embedded or vLLM): the request types and the interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tensafe.serving.session import ServingSession
    from tensafe.serving.structured import Grammars


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling parameters, checked by the API. The penalties count the tokens generated so
    far (as vLLM does): logit[t] −= presence·[count(t) > 0] + frequency·count(t); `logit_bias` adds
    to the logits of the token ids it names. Both act before the temperature."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    json_schema: str | None = None  # the output is one JSON document matching this schema (JSON text)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its raw distribution, before penalties,
    bias and temperature, as vLLM reports by default) and the `top` most likely tokens'."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """New text of one sequence since its last event; `finish_reason` is set on the last one
    ("stop", "length", or "error" with `error` saying what went wrong)."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this event's text comes from, when asked


class AdapterError(Exception):
    """An adapter cannot be loaded or unloaded as asked; the message says what to change."""


class Engine(Protocol):
    tokenizer: Any
    supports: frozenset[str]  # optional request features it implements: "logprobs", "json_schema"
    grammars: Grammars  # compiles the JSON schemas of structured outputs against `tokenizer`
    session: ServingSession  # what it trusts and records; `task=serve` signs its evidence

    @property
    def adapters(self) -> list[str]: ...

    @property
    def ready(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None:
        """Finish every admitted and waiting request, then stop."""

    def generate(
        self, prompt: list[int], adapter: str | None, params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Events for one sequence (prompt token ids; adapter None = the base model)."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Load the adapter folder `path` as `name` while serving; AdapterError if it cannot."""

    async def unload_adapter(self, name: str) -> None:
        """Stop serving `name` once its in-flight requests finish; AdapterError if unknown."""

    def observe_he(self, observe: Callable[[str, str, float], None]) -> None:
        """Send each HE-LoRA stage's time to `observe(adapter, stage, seconds)` (if it has any)."""

    def observe_speculation(self, observe: Callable[[str | None, int, int], None]) -> None:
        """Send each row's speculative drafts to `observe(adapter, proposed, accepted)` (if it drafts)."""
