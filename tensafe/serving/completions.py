"""POST /v1/completions."""

from __future__ import annotations

import asyncio

from fastapi import Request

from tensafe.serving import protocol as p
from tensafe.serving.base import TokenEvent
from tensafe.serving.errors import APIError
from tensafe.serving.generation import Generation
from tensafe.serving.generation import finish_reason as _finish


class Completions(Generation):
    """Text completions: prompts as text or token ids, `echo`, per-token `logprobs`."""

    async def create(self, req: p.CompletionRequest, request: Request):
        request.state.model = req.model
        adapter = self.adapter_for(req.model)
        given = req.prompts()
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs would need the prompt's log-probabilities, which this "
                           "server does not compute; drop one of them", param="echo",
                           code="unsupported_parameter")
        schema = await self.checked_schema(self.response_schema(req), self.format_param(req))
        params = self.sampling(req, req.max_tokens, len(given), req.logprobs, schema)
        self.check_ids([i for ids in given if not isinstance(ids, str) for i in ids], "prompt")

        def encode() -> tuple[list[list[int]], list[str]]:  # off the event loop: long prompts stall nothing
            ids = [self.engine.tokenizer(t).input_ids if isinstance(t, str) else list(t) for t in given]
            texts = [t if isinstance(t, str) else self.engine.tokenizer.decode(t) for t in given]
            return ids, texts if req.echo else []

        encoded, texts = await asyncio.to_thread(encode)
        prompts = [self.check_prompt(ids) for ids in encoded]
        rid, created = p.new_id("cmpl"), p.now()
        if req.stream:

            def chunk(choices: list[p.CompletionChoice], totals: p.Usage | None = None):
                return p.CompletionResponse(
                    id=rid, created=created, model=req.model, choices=choices, usage=totals
                )

            def choice(index: int, ev: TokenEvent) -> p.CompletionChoice:
                lp = self.completion_logprobs(list(ev.logprobs)) if params.logprobs is not None else None
                return p.CompletionChoice(index=index, text=ev.text, finish_reason=_finish(ev.finish_reason),
                                          logprobs=lp)

            # with echo, the prompts' text first, as its own chunk per choice
            echoed = [chunk([p.CompletionChoice(index=index, text=texts[index // req.n], finish_reason=None)])
                      for index in range(len(given) * req.n)] if req.echo else []
            return self.stream(request, req, prompts, adapter, params, chunk, choice, echoed)
        texts_out, finish, tokens, logprobs = await self.collect(request, prompts, adapter, params, req.n)
        choices = []
        for i in sorted(finish):
            echo = texts[i // req.n] if req.echo else ""
            lp = self.completion_logprobs(logprobs[i]) if params.logprobs is not None else None
            choices.append(p.CompletionChoice(index=i, text=echo + texts_out[i], finish_reason=finish[i],
                                              logprobs=lp))
        return p.CompletionResponse(id=rid, created=created, model=req.model, choices=choices,
                                    usage=self.usage(prompts, sum(tokens.values())))
