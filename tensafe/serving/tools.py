"""Tool calling: tools reach the model through its chat template; calls are generated under a schema.

A model learns which tools it has only from its chat template, so tools are accepted only for a
model whose template renders them (`ChatTemplate.renders_tools`, probed once). The call itself
is generated as structured output: with `tool_choice` "required", one JSON array of
`{"name", "arguments"}` objects matching one of the tools each (at most one when
`parallel_tool_calls` is false); with a named function, that function's arguments object. Both
are exact whatever the model's own tool-call format, which is why `tool_choice` "auto" (the
model decides, in its own format, whether to call) is refused: it needs a parser per model family.
"""

from __future__ import annotations

import json
import uuid
from functools import cached_property
from typing import Any

from tensafe.serving import protocol as p

_PROBE = "tensafe_probe_7f3a"  # a function name no template writes by itself


class ChatTemplate:
    """What a tokenizer's chat template can show the model."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        ids = self._tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                  tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _text(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            return self._tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                       tokenize=False)
        except Exception:  # noqa: BLE001  (a template that cannot render this: it does not support it)
            return ""

    @cached_property
    def renders_tools(self) -> bool:
        """The template shows a request's tools to the model."""
        probe = {"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {}}}
        return _PROBE in self._text([{"role": "user", "content": "x"}], [probe])

    @cached_property
    def renders_tool_calls(self) -> bool:
        """The template shows an earlier assistant turn's tool calls to the model."""
        call = {"id": "call_0", "type": "function", "function": {"name": _PROBE, "arguments": {}}}
        turns: list[dict] = [{"role": "user", "content": "x"},
                             {"role": "assistant", "content": "", "tool_calls": [call]}]
        return _PROBE in self._text(turns)


def template_messages(messages: list[p.ChatMessage]) -> list[dict]:
    """Messages as Hugging Face chat templates take them (tool-call arguments as objects)."""
    out = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if isinstance(m, p.AssistantTurn) and m.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls
            ]
        if isinstance(m, p.ToolTurn):
            entry["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_tools(tools: list[p.Tool]) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in tools]


def _parameters(tool: p.Tool) -> dict:
    """A function's arguments schema (no parameters: an empty object)."""
    given = tool.function.parameters
    return given if given else {"type": "object", "properties": {}, "additionalProperties": False}


def call_schema(req: p.ChatCompletionRequest) -> dict:
    """The JSON Schema of the output for `req`'s tool mode ("required" or "named")."""
    tools = req.tools or []
    if isinstance(req.tool_choice, p.NamedToolChoice):
        wanted = req.tool_choice.function.name
        return _parameters(next(t for t in tools if t.function.name == wanted))
    calls = [{"type": "object",
              "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema: dict = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def tool_calls(req: p.ChatCompletionRequest, text: str) -> list[p.ToolCall]:
    """The calls a complete output for `req`'s tool mode makes."""
    document = json.loads(text)
    if isinstance(req.tool_choice, p.NamedToolChoice):
        document = [{"name": req.tool_choice.function.name, "arguments": document}]
    return [p.ToolCall(id=new_call_id(), function=p.FunctionCall(name=c["name"], arguments=json.dumps(
        c["arguments"]))) for c in document]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
