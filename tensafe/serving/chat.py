"""POST /v1/chat/completions: chat through the model's template, structured outputs and tool calls."""

from __future__ import annotations

import asyncio

from fastapi import Request

from tensafe.observability.metrics import ServingMetrics
from tensafe.serving import protocol as p
from tensafe.serving.base import Engine, TokenEvent
from tensafe.serving.errors import APIError
from tensafe.serving.generation import Generation, ServerLimits
from tensafe.serving.generation import finish_reason as _finish
from tensafe.serving.tools import (
    ChatTemplate,
    call_schema,
    new_call_id,
    template_messages,
    template_tools,
)
from tensafe.serving.tools import tool_calls as parse_tool_calls


class Chat(Generation):
    """Chat completions; `template` is what the model's chat template can show it (tools, calls)."""

    def __init__(self, engine: Engine, base_model: str, limits: ServerLimits, metrics: ServingMetrics,
                 per_key: dict[str, int]):
        super().__init__(engine, base_model, limits, metrics, per_key)
        self.template = ChatTemplate(engine.tokenizer)

    async def chat_schema(self, req: p.ChatCompletionRequest) -> str | None:
        """The structured output a chat request asks for: its response_format, or its forced tool call."""
        mode = req.tool_mode()
        if mode != "none" and not self.template.renders_tools:
            raise APIError(400, f"tools: the chat template of {self.base_model!r} does not show tools to "
                           "the model, so it cannot call them; remove tools (or send tool_choice \"none\")",
                           param="tools", code="unsupported_parameter")
        if mode == "auto":
            raise APIError(400, "tool_choice: \"auto\" needs a parser of this model's own tool-call format, "
                           "which this server does not have; send \"required\" or {\"type\": \"function\", "
                           "\"function\": {\"name\": …}} (the call is then generated under its JSON schema), "
                           "or \"none\"", param="tool_choice", code="unsupported_parameter")
        if mode == "none":
            return await self.checked_schema(self.response_schema(req), self.format_param(req))
        if self.response_schema(req) is not None:
            raise APIError(400, "response_format: a forced tool call is generated under its own schema; send "
                           "one of response_format and tool_choice", param="response_format")
        return await self.checked_schema(call_schema(req), "tools")

    async def create(self, req: p.ChatCompletionRequest, request: Request):
        request.state.model = req.model
        adapter = self.adapter_for(req.model)
        top = (req.top_logprobs or 0) if req.logprobs else None
        schema = await self.chat_schema(req)
        params = self.sampling(req, req.max_completion_tokens or req.max_tokens, 1, top, schema)
        calling = req.tool_mode() in ("required", "named")
        called = any(isinstance(m, p.AssistantTurn) and m.tool_calls for m in req.messages)
        if called and not self.template.renders_tool_calls:
            raise APIError(400, f"messages: the chat template of {self.base_model!r} does not show earlier "
                           "tool calls to the model; send those turns as text", param="messages",
                           code="unsupported_parameter")
        messages = template_messages(req.messages)
        tools = template_tools(req.tools) if req.tools and self.template.renders_tools else None

        def encode():
            try:
                return self.template.render(messages, tools)
            except Exception as err:  # noqa: BLE001  (the template's own check, e.g. role order)
                raise APIError(400, f"messages: the chat template of {self.base_model!r} cannot render "
                               f"them: {type(err).__name__}: {str(err)[:300]}", param="messages") from None

        prompts = [self.check_prompt(await asyncio.to_thread(encode))]
        rid, created = p.new_id("chatcmpl"), p.now()
        if req.stream:

            def chunk(choices: list[p.ChatChunkChoice], totals: p.Usage | None = None):
                return p.ChatCompletionChunk(
                    id=rid, created=created, model=req.model, choices=choices, usage=totals
                )

            pending: dict[int, str] = {}  # "required" calls: the array's text until it is whole
            started: set[int] = set()  # named calls whose first piece (id and name) is sent

            def choice(index: int, ev: TokenEvent) -> p.ChatChunkChoice:
                lp = self.chat_logprobs(list(ev.logprobs)) if params.logprobs is not None else None
                finish = ev.finish_reason
                if not calling:
                    delta = p.Delta(content=ev.text or None)
                elif isinstance(req.tool_choice, p.NamedToolChoice):
                    first = index not in started
                    started.add(index)
                    delta = p.Delta(tool_calls=[p.ToolCallDelta(
                        index=0, id=new_call_id() if first else None, type="function" if first else None,
                        function=p.FunctionCallDelta(name=req.tool_choice.function.name if first else None,
                                                     arguments=ev.text))])
                    finish = "tool_calls" if finish == "stop" else finish
                else:
                    pending[index] = pending.get(index, "") + ev.text
                    delta = p.Delta()
                    if finish == "stop":
                        delta, finish = p.Delta(tool_calls=[p.ToolCallDelta(
                            index=k, id=c.id, type="function", function=p.FunctionCallDelta(
                                name=c.function.name, arguments=c.function.arguments))
                            for k, c in enumerate(parse_tool_calls(req, pending.pop(index)))]), "tool_calls"
                    elif finish is not None:  # cut short: the text so far, as content
                        delta = p.Delta(content=pending.pop(index) or None)
                return p.ChatChunkChoice(index=index, delta=delta, finish_reason=_finish(finish), logprobs=lp)

            # OpenAI's first chunk of each choice carries the role
            roles = [chunk([p.ChatChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
                     for i in range(req.n)]
            return self.stream(request, req, prompts, adapter, params, chunk, choice, roles)
        texts_out, finish, tokens, logprobs = await self.collect(request, prompts, adapter, params, req.n)
        choices = []
        for i in sorted(finish):
            message, reason = p.AssistantMessage(content=texts_out[i]), finish[i]
            if calling and reason == "stop":
                calls = parse_tool_calls(req, texts_out[i])
                message, reason = p.AssistantMessage(content=None, tool_calls=calls), "tool_calls"
            lp = self.chat_logprobs(logprobs[i]) if params.logprobs is not None else None
            choices.append(p.ChatChoice(index=i, message=message, finish_reason=reason, logprobs=lp))
        return p.ChatCompletionResponse(id=rid, created=created, model=req.model, choices=choices,
                                        usage=self.usage(prompts, sum(tokens.values())))
