"""What the generation routes share (completions and chat): turning a request into sampling
parameters under the server's limits, running its prompt × n sequences on the engine with a
deadline and disconnect detection, and writing OpenAI's response shapes and server-sent events.
`completions.Completions` and `chat.Chat` are its two routes; `app.create_app` wires them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from tensafe.observability.metrics import ServingMetrics
from tensafe.serving import protocol as p
from tensafe.serving.auth import hash_api_key
from tensafe.serving.base import Engine, SamplingParams, TokenEvent, TokenLogprob
from tensafe.serving.errors import APIError

log = logging.getLogger(__name__)
_DEADLINE, _GONE = -1, -2  # what a request's watchdog puts in its event queue


@dataclass(frozen=True)
class ServerLimits:
    """What one request, and one API key, may ask of the server."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20  # enforced on the bytes read, whatever Content-Length says
    max_sequences_per_request: int = 32  # prompts × n
    max_sequences_per_key: int = 64  # sequences in flight for one API key
    request_timeout_s: float = 600.0  # no request outlives this: it ends with an error
    body_timeout_s: float = 30.0  # a request's body arrives whole within this, or it is a 408


def finish_reason(reason: str | None) -> Any:
    """A finished choice's reason as the API reports it: stop, length or tool_calls (an error
    ends the request before any choice carries it)."""
    if reason not in (None, "stop", "length", "tool_calls"):
        raise ValueError(f"not an OpenAI finish reason: {reason!r}")
    return reason


class Generation:
    """The shared half of the generation routes, over one engine. `per_key` counts the sequences
    each API key (by its SHA-256) has in flight; the routes share one."""

    def __init__(self, engine: Engine, base_model: str, limits: ServerLimits, metrics: ServingMetrics,
                 per_key: dict[str, int]):
        self.engine, self.base_model, self.limits, self.metrics = engine, base_model, limits, metrics
        self.per_key = per_key

    def adapter_for(self, model: str) -> str | None:
        if model == self.base_model:
            return None
        if model in self.engine.adapters:
            return model
        raise APIError(404, f"model {model!r} does not exist; GET /v1/models lists them", param="model",
                       code="model_not_found")

    @staticmethod
    def response_schema(req: p._Sampling) -> dict | None:
        return req.response_format.output_schema() if req.response_format is not None else None

    async def checked_schema(self, schema: dict | None, param: str) -> str | None:
        """`schema` as JSON text once the grammar engine has compiled it (a 400 naming `param` if
        not)."""
        if schema is None:
            return None
        if "json_schema" not in self.engine.supports:
            raise APIError(400, f"{param}: structured outputs are not supported by this engine; remove "
                           "it",
                           param=param, code="unsupported_parameter")
        problem = await asyncio.to_thread(self.engine.grammars.check, schema)
        if problem is not None:
            raise APIError(400, f"{param}: this JSON schema cannot constrain generation: {problem[:500]}",
                           param=param, code="invalid_schema")
        return json.dumps(schema)

    @staticmethod
    def format_param(req: p._Sampling) -> str:
        given = req.response_format
        schema_given = given is not None and given.type == "json_schema"
        return "response_format.json_schema.schema" if schema_given else "response_format"

    def sampling(self, req: p._Sampling, max_tokens: int | None, prompts: int, logprobs: int | None = None,
                 json_schema: str | None = None) -> SamplingParams:
        refused = req.unsupported()
        if refused is None and logprobs is not None and "logprobs" not in self.engine.supports:
            refused = "logprobs"
        if refused is not None:
            raise APIError(400, f"{refused} is not supported by this server; remove it or send its "
                           "neutral value", param=refused, code="unsupported_parameter")
        if prompts * req.n > self.limits.max_sequences_per_request:
            raise APIError(400, f"{prompts} prompt(s) × n={req.n} is {prompts * req.n} sequences, over this "
                           f"server's limit of {self.limits.max_sequences_per_request} per request",
                           param="n", code="too_many_sequences")
        max_tokens = max_tokens or self.limits.max_tokens
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of "
                           f"{self.limits.max_tokens}",
                           param="max_tokens")
        bias = tuple((int(token), float(value)) for token, value in (req.logit_bias or {}).items())
        self.check_ids([token for token, _ in bias], "logit_bias")
        return SamplingParams(max_tokens, req.temperature, req.top_p, req.seed, tuple(req.stop_strings()),
                              req.presence_penalty, req.frequency_penalty, bias, logprobs, json_schema)

    def check_ids(self, ids: list[int], param: str) -> None:
        """Refuse token ids outside the tokenizer's vocabulary (ids are ≥ 0 by the request schema)."""
        if ids and max(ids) >= len(self.engine.tokenizer):
            raise APIError(400, f"{param}: token id {max(ids)} is not in the vocabulary "
                           f"({len(self.engine.tokenizer)} tokens)", param=param)

    def token_text(self, token: int) -> str:
        return self.engine.tokenizer.decode([token], skip_special_tokens=False)

    def completion_logprobs(self, items: list[TokenLogprob], start: int = 0) -> p.CompletionLogprobs:
        """OpenAI's completion logprobs; `start`: the text offset of the first token (after an echo)."""
        tokens = [self.token_text(t.token) for t in items]
        offsets, at = [], start
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return p.CompletionLogprobs(
            tokens=tokens, token_logprobs=[t.logprob for t in items], text_offset=offsets,
            top_logprobs=[{self.token_text(i): v for i, v in t.top} for t in items],
        )

    def chat_logprobs(self, items: list[TokenLogprob]) -> p.ChoiceLogprobs:
        def top(i: int, v: float) -> p.TopLogprob:
            text = self.token_text(i)
            return p.TopLogprob(token=text, logprob=v, bytes=list(text.encode("utf-8")))

        return p.ChoiceLogprobs(content=[
            p.ChatTokenLogprob(**top(t.token, t.logprob).model_dump(),
                               top_logprobs=[top(i, v) for i, v in t.top])
            for t in items
        ])

    def check_prompt(self, ids: list[int]) -> list[int]:
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                           f"{self.limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        return ids

    async def run(self, request: Request, prompts: list[list[int]], adapter: str | None,
                  params: SamplingParams, n: int) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) for prompt × n sequences, interleaved as they are produced. The
        request ends with an error at `request_timeout_s`, and is abandoned (its sequences leave
        the engine) when the client disconnects."""
        label = adapter or self.base_model
        arrived, first = time.perf_counter(), None
        key = hash_api_key(request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        count = len(prompts) * n
        if self.per_key.get(key, 0) + count > self.limits.max_sequences_per_key:
            raise APIError(429, f"this API key has {self.per_key.get(key, 0)} sequences in flight; the "
                           f"limit is {self.limits.max_sequences_per_key}: wait for some to finish",
                           "rate_limit_error",
                           code="rate_limit_exceeded")
        self.per_key[key] = self.per_key.get(key, 0) + count
        self.metrics.tokens.labels(label, "prompt").inc(sum(len(ids) for ids in prompts))
        merged: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                seq_params = dataclasses.replace(params, seed=seed)

                async def pump(index=i * n + j, ids=ids, seq_params=seq_params):
                    try:
                        async for event in self.engine.generate(ids, adapter, seq_params):
                            await merged.put((index, event))
                    except Exception as err:  # noqa: BLE001  (an engine fault ends this request, said)
                        log.exception("generation of choice %d failed", index)
                        await merged.put((index, TokenEvent("", 0, "error", f"{type(err).__name__}: {err}")))

                jobs.append(asyncio.create_task(pump()))
        done = 0
        produced: dict[int, int] = {}  # completion tokens so far, per unfinished choice
        deadline = arrived + self.limits.request_timeout_s

        async def watchdog():
            """Once a second at most: the deadline, and whether the client is still there."""
            while True:
                await asyncio.sleep(max(0.0, min(1.0, deadline - time.perf_counter())))
                if time.perf_counter() >= deadline:
                    return await merged.put((_DEADLINE, None))
                if await request.is_disconnected():
                    return await merged.put((_GONE, None))

        jobs.append(asyncio.create_task(watchdog()))
        try:
            while done < len(jobs) - 1:
                index, event = await merged.get()
                if index == _DEADLINE:
                    raise APIError(504, f"the request ran past serving.request_timeout_s="
                                   f"{self.limits.request_timeout_s:g} s and was stopped", "server_error",
                                   code="timeout")
                if index == _GONE:
                    return  # nobody is waiting for the answer: stop generating it
                if event.finish_reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", "server_error")
                if first is None:
                    first = time.perf_counter()
                    self.metrics.time_to_first_token.labels(label).observe(first - arrived)
                if event.finish_reason is not None:
                    done += 1
                    produced.pop(index, None)
                    self.metrics.tokens.labels(label, "completion").inc(event.completion_tokens)
                else:
                    produced[index] = event.completion_tokens
                yield index, event
            self.metrics.latency.labels(label).observe(time.perf_counter() - arrived)
        finally:
            if produced:  # a client that left (or a deadline): its tokens were generated all the same
                self.metrics.tokens.labels(label, "completion").inc(sum(produced.values()))
            self.per_key[key] -= count
            if not self.per_key[key]:
                del self.per_key[key]
            for job in jobs:
                job.cancel()

    async def collect(self, request, prompts, adapter, params, n):
        """Whole texts, finish reasons, token counts and token logprobs per choice index."""
        texts, finish, tokens, logprobs = {}, {}, {}, {}
        async for index, ev in self.run(request, prompts, adapter, params, n):
            texts[index] = texts.get(index, "") + ev.text
            logprobs.setdefault(index, []).extend(ev.logprobs)
            if ev.finish_reason is not None:
                finish[index], tokens[index] = ev.finish_reason, ev.completion_tokens
        return texts, finish, tokens, logprobs

    def stream(self, request, req: p._Sampling, prompts, adapter, params, chunk, choice,
               first: list) -> StreamingResponse:
        """The server-sent events of a streamed request: the `first` chunks, then one chunk per
        event (`chunk([choice(index, event)])`), then the usage if asked for."""

        async def chunks():
            for item in first:
                yield item
            async for item in self.streamed(request, req, prompts, adapter, params, chunk, choice):
                yield item

        return self.sse(chunks(), req.model)

    async def streamed(self, request, req: p._Sampling, prompts, adapter, params, chunk, choice):
        tokens: dict[int, int] = {}
        async for index, ev in self.run(request, prompts, adapter, params, req.n):
            yield chunk([choice(index, ev)])
            if ev.finish_reason is not None:
                tokens[index] = ev.completion_tokens
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], self.usage(prompts, sum(tokens.values())))

    @staticmethod
    def usage(prompts: list[list[int]], completion: int) -> p.Usage:
        prompt_tokens = sum(len(ids) for ids in prompts)
        return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion)

    def sse(self, chunks: AsyncIterator, model: str) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {chunk.model_dump_json()}\n\n"
            except APIError as err:  # headers are sent: the error travels as an event, as OpenAI's does
                self.metrics.errors.labels(model, err.body.type).inc()
                yield f"data: {p.ErrorResponse(error=err.body).model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")
