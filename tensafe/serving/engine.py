"""The embedded engine: iteration-level scheduling over per-sequence KV caches, multi-LoRA.

A scheduler thread owns the model. At every step it admits waiting sequences (up to
`max_running`), then advances each running sequence by one unit of work: one prefill chunk of at
most `prefill_chunk` prompt tokens, or one decoded token. Sequences join and leave between steps,
and a long prompt is prefilled chunk by chunk while the others keep decoding. Each sequence runs
under its own adapter (or the base model), so one step can mix adapters.

Each unit of work is its own forward pass; batching the decode steps of several sequences into one
forward pass is not done yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """New text of one sequence since its last event; `finish_reason` is set on the last one."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class _Sequence:
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[TokenEvent], None]
    pending: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    cache: object = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    finished: bool = False

    def __post_init__(self):
        self.pending = list(self.prompt)
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)


class EmbeddedEngine:
    """Serves `model` (a PEFT model with named adapters, or a plain causal LM) from one thread."""

    def __init__(self, model, tokenizer, adapters: list[str], max_running: int = 16, prefill_chunk: int = 64):
        self.model, self.tokenizer, self.adapters = model, tokenizer, list(adapters)
        self.max_running, self.prefill_chunk = max_running, prefill_chunk
        self._eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._running: list[_Sequence] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.model.eval()
        self._thread = threading.Thread(target=self._loop, name="tensafe-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._running) + self._waiting.qsize()

    def stop(self) -> None:
        """Finish every admitted and waiting sequence, then stop the scheduler thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    # --- requests ----------------------------------------------------------------------------
    async def generate(
        self, prompt: list[int], adapter: str | None, params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Events for one sequence, as the scheduler produces them."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        seq = _Sequence(prompt, adapter, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        self._waiting.put(seq)
        self._wake.set()
        while True:
            event = await events.get()
            yield event
            if event.finish_reason is not None:
                return

    # --- scheduler ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                while len(self._running) < self.max_running and not self._waiting.empty():
                    self._running.append(self._waiting.get_nowait())
                if not self._running:
                    if self._stop.is_set():
                        return
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                for seq in list(self._running):
                    self._advance(seq)
                self._running = [s for s in self._running if not s.finished]
        except BaseException as err:  # noqa: BLE001  (reported to every waiting client, never swallowed)
            self.error = err
            for seq in self._running + list(self._waiting.queue):
                seq.emit(TokenEvent("", len(seq.generated), "error"))
            raise

    def _adapter_context(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _advance(self, seq: _Sequence) -> None:
        with self._adapter_context(seq.adapter):
            if seq.pending:
                chunk, seq.pending = seq.pending[: self.prefill_chunk], seq.pending[self.prefill_chunk :]
                out = self.model(input_ids=torch.tensor([chunk]), cache=seq.cache, use_cache=True)
                seq.cache = out.cache
                if seq.pending:
                    return
            else:
                last = torch.tensor([[seq.generated[-1]]])
                out = self.model(input_ids=last, cache=seq.cache, use_cache=True)
                seq.cache = out.cache
        token = _sample(out.logits[0, -1].float(), seq.params, seq.generator)
        self._append(seq, token)

    def _append(self, seq: _Sequence, token: int) -> None:
        finish = None
        if token in self._eos:
            finish = "stop"
        else:
            seq.generated.append(token)
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        for stop in seq.params.stop:
            at = text.find(stop, max(0, len(seq.text) - len(stop)))
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and len(seq.generated) >= seq.params.max_tokens:
            finish = "length"
        if finish is None and text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next token
        delta, seq.text = text[len(seq.text) :], text
        if finish is not None:
            seq.finished, seq.cache = True, None
        seq.emit(TokenEvent(delta, len(seq.generated), finish))


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        ordered, index = torch.sort(probs, descending=True)
        keep = torch.cumsum(ordered, dim=-1) - ordered < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, index[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
