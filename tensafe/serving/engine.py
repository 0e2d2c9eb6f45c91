"""The embedded engine: continuous batching over a shared KV cache, many LoRA adapters per batch.

A scheduler thread owns the model. Each iteration it
1. applies adapter loads and unloads (between forward passes, never during one);
2. admits waiting requests while fewer than `max_running` sequences are in flight;
3. runs **one decode step for every decoding sequence as one batch**: one new token per row over
   the batch's KV cache (`BatchCache`, rows left-padded), with each row under its own adapter or
   the base model (`MultiLoRA`: the base projection once, each adapter group's delta on its rows);
4. runs one prefill forward of at most `prefill_chunk` prompt tokens: the waiting prompts that fit
   together, as one left-padded batch (so their tokens also share one HE ciphertext batch), or the
   next chunk of a longer prompt; a sequence whose prompt is done samples its first token and
   joins the decode batch.

A sequence with a structured output (`SamplingParams.json_schema`) carries its grammar's state
(`structured.JsonConstraint`): its row's logits are masked to the tokens the grammar allows
before sampling, and it finishes when the document is whole.

With `speculation` (`speculative.Speculation`), a greedy sequence's decode row also carries draft
tokens, from n-gram prompt lookup or from the base model (adapters off, on the batch's cache, its
positions forgotten after); the step's logits verify them, the row emits the accepted drafts
and one token of its own, and the cache forgets the rejected positions (`BatchCache.drop_last`).

So sequences join and leave the running batch at every step, and a long prompt is prefilled
chunk by chunk between decode steps instead of stalling them. A failing forward pass (e.g. an HE
evaluator that is unreachable) fails the sequences in it with an error event; the engine goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from tensafe.serving.adapters import Adapter
from tensafe.serving.base import AdapterError, SamplingParams, TokenEvent, TokenLogprob
from tensafe.serving.kv_cache import BatchCache
from tensafe.serving.multi_lora import MultiLoRA
from tensafe.serving.session import ServingSession
from tensafe.serving.speculative import Speculation, ngram_drafts
from tensafe.serving.structured import Grammars, JsonConstraint

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[TokenEvent], object]
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    cache: BatchCache | None = None  # its own cache while prefilling; then a row of the batch's
    generator: torch.Generator = field(default_factory=torch.Generator)
    text: str = ""
    prefix_offset: int = 0  # incremental detokenization: ids before this are settled text
    read_offset: int = 0
    finished: bool = False
    cancelled: bool = False
    solo: bool = False  # prefilled on its own: a batched prefill with it failed
    held: str = ""  # generated text not sent yet: it could still begin a stop string
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not sent yet
    constraint: JsonConstraint | None = None  # structured output: the schema's grammar, token by token

    def __post_init__(self):
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)


class EmbeddedEngine:
    """Serves a causal LM and the adapters of `lora` (a MultiLoRA on that model) from one thread."""

    supports = frozenset({"logprobs", "json_schema"})

    def __init__(self, model, tokenizer, lora: MultiLoRA | None = None, max_running: int = 16,
                 prefill_chunk: int = 64, session: ServingSession | None = None,
                 speculation: Speculation | None = None):
        """`session`: what this server trusts and records (default: unsigned folders allowed,
        nothing recorded); `speculation`: draft tokens for greedy sequences (default: none)."""
        self.model, self.tokenizer = model, tokenizer
        self.session = session if session is not None else ServingSession(security=None)
        self.grammars = Grammars(tokenizer)
        self.lora = lora if lora is not None else MultiLoRA(model)
        self.max_running, self.prefill_chunk = max_running, prefill_chunk
        self._serving = set(self.lora.adapters)
        self._layers = model.config.num_hidden_layers
        self._eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._prefilling: list[_Sequence] = []
        self._decoding: list[_Sequence] = []
        self._batch = BatchCache(self._layers)
        self._commands: queue.Queue[tuple[Callable[[], object], concurrent.futures.Future]] = queue.Queue()
        self._draining: dict[str, concurrent.futures.Future] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.speculation = speculation
        # draft_tokens: drafts proposed; accepted_tokens: those the model's own picks confirmed;
        # draft_forwards: the base model's drafting forwards (speculation.drafter="base_model")
        self.steps = {"decode": 0, "prefill": 0, "decode_rows": 0, "draft_tokens": 0, "accepted_tokens": 0,
                      "draft_forwards": 0}
        self._observe_drafts: Callable[[str | None, int, int], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.model.eval()
        self._thread = threading.Thread(target=self._loop, name="tensafe-engine", daemon=True)
        self._thread.start()

    @property
    def adapters(self) -> list[str]:
        return sorted(self._serving)

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._prefilling) + len(self._decoding) + self._waiting.qsize()

    def stop(self) -> None:
        """Finish every admitted and waiting sequence, then stop the scheduler thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        for he in self.lora.he.values():
            he.close()

    # --- requests ----------------------------------------------------------------------------
    async def generate(
        self, prompt: list[int], adapter: str | None, params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Events for one sequence, as the scheduler produces them."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        seq = _Sequence(prompt, adapter, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        refusal = None
        if self._stop.is_set() or not self.ready:
            refusal = "the engine is shutting down"
        elif adapter is not None and adapter not in self._serving:
            refusal = f"adapter {adapter!r} is not loaded"
        elif params.json_schema is not None:  # compiling a grammar can take a while: off the event loop
            try:
                schema = json.loads(params.json_schema)
                seq.constraint = await asyncio.to_thread(self.grammars.constraint, schema)
            except Exception as err:  # noqa: BLE001  (the API checked the schema: this is unexpected)
                refusal = f"structured output: {err}"
        if refusal is not None:
            seq.emit(TokenEvent("", 0, "error", refusal))
        else:
            self._waiting.put(seq)
            self._wake.set()
        try:
            while True:
                event = await events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True  # the client went away (or it finished): the scheduler drops it

    async def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter folder, or a `.tssp` package that verifies against the trust store."""
        if name in self._serving or name in self.lora.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        try:
            adapter = await asyncio.to_thread(self.session.open, name, path, "path")
        except Exception as err:  # noqa: BLE001  (refused and recorded by the session; its reason)
            raise AdapterError(str(err)) from None
        try:
            await self._command(lambda: self._install(adapter))
        except AdapterError as err:  # it does not fit this model
            self.session.refused(name, path, err)
            raise
        self.session.loaded(adapter)

    async def unload_adapter(self, name: str) -> None:
        if name not in self._serving:
            raise AdapterError(f"no adapter named {name!r} is loaded; GET /v1/models lists them")
        self._serving.discard(name)  # new requests for it are refused from now on
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._draining[name] = done
        self._wake.set()
        await asyncio.wrap_future(done)
        self.session.unloaded(name)

    def observe_he(self, observe: Callable[[str, str, float], None]) -> None:
        """Send every HE-LoRA stage's time to `observe(adapter, stage, seconds)`."""
        for name, he in self.lora.he.items():
            he.observe = lambda stage, seconds, name=name: observe(name, stage, seconds)

    def observe_speculation(self, observe: Callable[[str | None, int, int], None]) -> None:
        """Send every row's draft outcome to `observe(adapter or None, proposed, accepted)`."""
        self._observe_drafts = observe

    def _install(self, adapter: Adapter) -> None:
        try:
            self.lora.add(adapter)
        except Exception as err:  # noqa: BLE001  (shape mismatch etc.: reported to the caller)
            raise AdapterError(str(err)) from None
        self._serving.add(adapter.name)

    async def _command(self, fn: Callable[[], object]) -> object:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, done))
        self._wake.set()
        return await asyncio.wrap_future(done)

    # --- scheduler ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._schedule()
        except BaseException as err:  # a scheduler bug: fail every request rather than leave it hanging
            log.exception("the engine's scheduler stopped")
            for seq in self._prefilling + self._decoding + list(self._waiting.queue):
                seq.emit(TokenEvent("", len(seq.generated), "error", f"engine stopped: {err!r}"))
            raise

    def _schedule(self) -> None:
        while True:
            self._run_commands()
            while self.in_flight - self._waiting.qsize() < self.max_running and not self._waiting.empty():
                self._prefilling.append(self._waiting.get_nowait())
            if not self._prefilling and not self._decoding:
                if self._stop.is_set():
                    return
                self._wake.clear()  # then look again: a request queued before the clear is seen now
                if self._waiting.empty() and self._commands.empty():
                    self._wake.wait(0.5 if self._draining else None)
                continue
            if self._decoding:
                self._decode_step()
            if self._prefilling:
                self._prefill_step()

    def _run_commands(self) -> None:
        while not self._commands.empty():
            fn, done = self._commands.get_nowait()
            try:
                done.set_result(fn())
            except BaseException as err:  # noqa: BLE001  (handed to the awaiting caller)
                done.set_exception(err)
        active = {s.adapter for s in self._prefilling + self._decoding + list(self._waiting.queue)}
        for name in [n for n in self._draining if n not in active]:
            self.lora.remove(name)
            self._draining.pop(name).set_result(None)

    def _fail(self, seqs: list[_Sequence], err: BaseException) -> None:
        """End `seqs` with an error event saying why; the engine goes on with the others."""
        log.error("generation failed for %d sequence(s): %s: %s", len(seqs), type(err).__name__, err,
                  exc_info=err)
        message = f"{type(err).__name__}: {err}"
        for seq in seqs:
            seq.finished, seq.cache = True, None
            seq.emit(TokenEvent("", len(seq.generated), "error", message))

    def _sample_rows(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Each row's next token; a row whose sampling fails fails alone."""
        for seq, row in zip(seqs, logits, strict=True):
            try:
                allowed = row if seq.constraint is None else seq.constraint.mask(row)
                token = _sample(allowed, seq.params, seq.generator, seq.generated)
                if seq.constraint is not None:
                    seq.constraint.advance(token)
                if seq.params.logprobs is not None and token not in self._eos:
                    seq.logprobs.append(token_logprob(row, token, seq.params.logprobs))
                self._append(seq, token)
            except Exception as err:  # noqa: BLE001  (this sequence's parameters or logits)
                self._fail([seq], err)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, cache: BatchCache, adapters: list[str | None],
                 keep: int = 1) -> torch.Tensor:
        """The logits of the last `keep` positions of every row: [rows, keep, vocabulary]."""
        self.lora.route(adapters)
        try:
            positions = cache.positions(ids.shape[1]).clamp(min=0)  # left padding: masked, any position
            out = self.model(input_ids=ids, cache=cache.cache(), position_ids=positions,
                             attention_mask=cache.attention_mask(ids.shape[1]), use_cache=True,
                             logits_to_keep=keep)
        finally:
            self.lora.route([])
        return out.logits[:, -keep:].float()

    def _room(self, seq: _Sequence) -> int:
        """How many drafts `seq`'s next step may carry: greedy, unconstrained sequences only (a
        draft is checked against the one token greedy decoding picks), within max_tokens."""
        spec = self.speculation
        if spec is None or seq.params.temperature != 0 or seq.constraint is not None:
            return 0
        if spec.drafter == "base_model" and seq.adapter is None:
            return 0  # its draft model would be the model itself
        room = seq.params.max_tokens - len(seq.generated) - 1  # the step's own token is always emitted
        return max(0, min(spec.tokens, room))

    def _drafts(self, seqs: list[_Sequence]) -> list[list[int]]:
        """Every decoding row's drafts for the next step (`speculation.drafter`)."""
        rooms = [self._room(seq) for seq in seqs]
        spec = self.speculation
        if spec is None or not any(rooms):
            return [[] for _ in seqs]
        if spec.drafter == "ngram":
            return [ngram_drafts(seq.prompt + seq.generated, room, spec.ngram, spec.ngram_min) if room else []
                    for seq, room in zip(seqs, rooms, strict=True)]
        return self._base_model_drafts(seqs, rooms)

    def _base_model_drafts(self, seqs: list[_Sequence], rooms: list[int]) -> list[list[int]]:
        """Up to rooms[i] greedy tokens per row from the model with every adapter off, one forward
        of the whole batch each, on the batch's cache; the positions they add are forgotten after.
        A drafting forward that fails drafts nothing (the step then decodes as usual)."""
        layers = self._batch.layers
        assert layers is not None  # decoding rows have a cache
        lengths = [layer.length for layer in layers]
        drafts: list[list[int]] = [[] for _ in seqs]
        last = torch.tensor([[seq.generated[-1]] for seq in seqs])
        try:
            for _ in range(max(rooms)):
                picks = self._forward(last, self._batch, [None] * len(seqs))[:, 0].argmax(dim=-1)
                for row, room in enumerate(rooms):
                    if len(drafts[row]) < room:
                        drafts[row].append(int(picks[row]))
                last = picks[:, None]
        except Exception:  # noqa: BLE001
            log.exception("base-model drafting failed; this step decodes without drafts")
            drafts = [[] for _ in seqs]
        finally:
            for layer, length in zip(layers, lengths, strict=True):
                layer.length = length  # the drafting positions are not the adapted model's
        self.steps["draft_forwards"] += max(rooms) if any(drafts) else 0
        return drafts

    def _decode_step(self) -> None:
        """One token for every decoding row, as one batch. If the batched forward fails, the rows
        are run again in groups by adapter from the cache as it was, and only the groups that fail
        again are failed (an unreachable HE evaluator fails its adapter's rows, not the others)."""
        seqs, layers = self._decoding, self._batch.layers
        assert layers is not None  # decoding rows have a cache
        drafts = self._drafts(seqs)
        lengths = [layer.length for layer in layers]
        width = 1 + max(map(len, drafts))  # rows with fewer drafts are filled up; those never stand
        ids = [[s.generated[-1], *d, *[s.generated[-1]] * (width - 1 - len(d))]
               for s, d in zip(seqs, drafts, strict=True)]
        try:
            logits = self._forward(torch.tensor(ids), self._batch, [s.adapter for s in seqs], keep=width)
        except Exception as err:  # noqa: BLE001
            for layer, length in zip(layers, lengths, strict=True):
                layer.length = length  # drop whatever the failed forward appended
            self._decode_by_adapter(err)
            return
        self.steps["decode"] += 1
        self.steps["decode_rows"] += len(seqs)
        if width == 1:
            self._sample_rows(seqs, logits[:, 0])
        else:
            used = [self._verify(seq, rows, draft)
                    for seq, rows, draft in zip(seqs, logits, drafts, strict=True)]
            self._batch.drop_last([width - n for n in used])
        self._drop_finished()

    def _verify(self, seq: _Sequence, logits: torch.Tensor, draft: list[int]) -> int:
        """Emit `seq`'s tokens from a drafted step's logits ([1 + drafts, vocabulary]): its pick at
        each position, going on while the pick equals the draft that position fed. Returns the
        positions used (the accepted drafts plus one)."""
        used = 0
        while True:
            self._sample_rows([seq], logits[used : used + 1])
            used += 1
            if seq.finished or used > len(draft) or seq.generated[-1:] != draft[used - 1 : used]:
                break
        accepted = used - 1
        self.steps["draft_tokens"] += len(draft)
        self.steps["accepted_tokens"] += accepted
        if self._observe_drafts is not None and draft:
            self._observe_drafts(seq.adapter, len(draft), accepted)
        return used

    def _decode_by_adapter(self, first_error: BaseException) -> None:
        seqs, batch = self._decoding, self._batch
        groups: dict[str | None, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(seq.adapter, []).append(i)
        self._decoding, self._batch = [], BatchCache(self._layers)
        if len(groups) == 1:  # nothing to tell apart: the one group failed
            self._fail(seqs, first_error)
            return
        for rows in groups.values():
            part = BatchCache(self._layers)
            part.layers, part.pad = batch.layers, batch.pad.clone()
            part.keep(rows)  # copies these rows out of the batch's buffers
            group = [seqs[i] for i in rows]
            try:
                logits = self._forward(torch.tensor([[s.generated[-1]] for s in group]), part,
                                       [s.adapter for s in group])[:, 0]
            except Exception as err:  # noqa: BLE001
                self._fail(group, err)
                continue
            self.steps["decode"] += 1
            self.steps["decode_rows"] += len(group)
            self._sample_rows(group, logits)
            going_on = [i for i, s in enumerate(group) if not s.finished]
            if going_on:
                part.keep(going_on)
                self._batch.extend(part)
                self._decoding += [group[i] for i in going_on]

    def _drop_finished(self) -> None:
        seqs = self._decoding
        keep = [i for i, s in enumerate(seqs) if not s.finished]
        if len(keep) < len(seqs):
            self._batch.keep(keep)
            self._decoding = [seqs[i] for i in keep]

    def _prefill_step(self) -> None:
        """One prefill forward: a left-padded batch of fresh prompts that fit the token budget
        together, or else the next chunk of the oldest (long) prompt. A failed batch is split:
        its prompts are prefilled alone from then on, so only the one that fails alone fails."""
        first = self._prefilling[0]
        if first.prefilled == 0 and len(first.prompt) <= self.prefill_chunk and not first.solo:
            group: list[_Sequence] = []
            width = 0
            for seq in self._prefilling:
                if seq.prefilled or seq.solo or len(seq.prompt) > self.prefill_chunk:
                    continue
                if group and max(width, len(seq.prompt)) * (len(group) + 1) > self.prefill_chunk:
                    break
                group.append(seq)
                width = max(width, len(seq.prompt))
            cache = BatchCache(self._layers, rows=len(group))
            cache.pad = torch.tensor([width - len(s.prompt) for s in group])
            pad_id = next(iter(self._eos), 0)
            ids = torch.tensor([[pad_id] * (width - len(s.prompt)) + s.prompt for s in group])
            try:
                logits = self._forward(ids, cache, [s.adapter for s in group])[:, 0]
            except Exception as err:  # noqa: BLE001
                if len(group) == 1:
                    self._fail(group, err)
                    self._prefilling = [s for s in self._prefilling if not s.finished]
                else:
                    for seq in group:
                        seq.solo = True
                return
            self.steps["prefill"] += 1
            for seq in group:
                seq.prefilled = len(seq.prompt)
            self._prefilled(group, logits, cache)
            return
        if first.cache is None:
            first.cache = BatchCache(self._layers, rows=1)
        chunk = first.prompt[first.prefilled : first.prefilled + self.prefill_chunk]
        try:
            logits = self._forward(torch.tensor([chunk]), first.cache, [first.adapter])[:, 0]
        except Exception as err:  # noqa: BLE001
            self._fail([first], err)
            self._prefilling = self._prefilling[1:]
            return
        self.steps["prefill"] += 1
        first.prefilled += len(chunk)
        if first.prefilled == len(first.prompt):
            self._prefilled([first], logits, first.cache)
            first.cache = None

    def _prefilled(self, seqs: list[_Sequence], logits: torch.Tensor, cache: BatchCache) -> None:
        """Sample each sequence's first token; those that go on join the decode batch."""
        self._sample_rows(seqs, logits)
        done = {id(seq) for seq in seqs}
        self._prefilling = [s for s in self._prefilling if id(s) not in done]
        going_on = [i for i, s in enumerate(seqs) if not s.finished]
        if going_on:
            cache.keep(going_on)
            self._batch.extend(cache)
            self._decoding += [seqs[i] for i in going_on]

    def _append(self, seq: _Sequence, token: int) -> None:
        if seq.cancelled:
            seq.finished = True
            return
        finish = None
        if token in self._eos:
            finish = "stop"
        else:
            seq.generated.append(token)
        text = seq.held + self._detokenize(seq)  # generated text not sent yet
        for stop in seq.params.stop:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and seq.constraint is not None and seq.constraint.complete:
            finish = "stop"  # the JSON document is whole
        if finish is None and len(seq.generated) >= seq.params.max_tokens:
            finish = "length"
        held = 0 if finish is not None else _stop_prefix(text, seq.params.stop)
        delta, seq.held = text[: len(text) - held], text[len(text) - held :]
        if finish is None and not delta:
            return  # nothing to send yet (incomplete UTF-8, or text that may begin a stop string)
        seq.text += delta
        if finish is not None:
            seq.finished, seq.cache = True, None
        logprobs, seq.logprobs = tuple(seq.logprobs), []
        seq.emit(TokenEvent(delta, len(seq.generated), finish, logprobs=logprobs))

    def _detokenize(self, seq: _Sequence) -> str:
        """Text that `seq.generated` adds since the last call, decoding only a short window."""
        ids = seq.generated
        settled = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        current = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(current) <= len(settled) or current.endswith("\ufffd"):
            return ""
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return current[len(settled) :]


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under the raw logits, and the `top` most likely tokens'."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    values, index = torch.topk(logprobs, min(top, logprobs.shape[0])) if top else ((), ())
    return TokenLogprob(token, float(logprobs[token]),
                        tuple((int(i), float(v)) for i, v in zip(index, values, strict=True)))


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, generated) -> torch.Tensor:
    """The logits after `logit_bias` and the presence and frequency penalties (see SamplingParams)."""
    if params.logit_bias:
        logits = logits.clone()
        tokens, biases = zip(*params.logit_bias, strict=True)
        logits[list(tokens)] += torch.tensor(biases, dtype=logits.dtype)
    if (params.presence_penalty or params.frequency_penalty) and len(generated):
        counts = torch.bincount(torch.tensor(list(generated)), minlength=logits.shape[0])[: logits.shape[0]]
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back until it is
    known whether the stop string follows)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[len(text) - size :]):
                longest = size
                break
    return longest


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
            generated: Sequence[int] = ()) -> int:
    logits = adjusted_logits(logits.double(), params, generated)
    if not torch.isfinite(logits).any():
        raise ValueError("the model produced no finite logit for this sequence")
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # shifted by the maximum first: a tiny temperature sends the others to −inf (greedy), not to NaN
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1:
        ordered, index = torch.sort(probs, descending=True)
        keep = torch.cumsum(ordered, dim=-1) - ordered < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, index[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
