"""The OpenAI-compatible wire protocol: request and response models shared by server and tests."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INT64 = (-(2**63), 2**63 - 1)  # the seed range a generator takes


def _utf8(text: str) -> str:
    """`text` if it encodes as UTF-8 (a lone surrogate such as "\\ud800" does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate: not valid Unicode text") from None
    return text


class _Request(BaseModel):
    # strict: `max_tokens: true` or `stream: "yes"` are errors, not coerced; unknown fields are
    # refused with their name, so nothing that would change the answer is silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


# Parameters of OpenAI's API this server does not implement: set to anything but their neutral
# value, they are refused with a 400 naming them (the neutral values are accepted).
UNSUPPORTED = {
    "best_of": (None, 1), "suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
}


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # none: any JSON value
    strict: bool | None = None  # the schema is always enforced exactly


class ResponseFormat(_Request):
    """`text`, `json_object` (any JSON object) or `json_schema` (a document matching the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is \"json_schema\"")
        return self

    def output_schema(self) -> dict | None:
        """The JSON Schema the output must match, or None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema" and self.json_schema is not None:  # always given (validated)
            return self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
        return None


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    user: str | None = None  # accepted, not used: it changes no answer
    metadata: dict[str, str] | None = None
    store: bool | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) → bias in [−100, 100]
    response_format: ResponseFormat | None = None
    best_of: Any = None
    suffix: Any = None
    functions: Any = None
    function_call: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, value):
        for text in [value] if isinstance(value, str) else value or []:
            _utf8(text)
        return value

    @model_validator(mode="after")
    def _checked(self):
        if self.seed is not None and self.seed + self.n - 1 > INT64[1]:
            raise ValueError(f"seed + n − 1 must be at most 2^63 − 1 (choice i samples with seed + i); "
                             f"got seed={self.seed}, n={self.n}")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids, got {token[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases lie in [-100, 100], got {bias} for token {token}")
        return value

    def unsupported(self) -> str | None:
        """The first parameter set to a value this server does not implement, if any."""
        for name, neutral in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if not any(value == v and type(value) is type(v) for v in neutral) and value is not None:
                return name
        return None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


_Text = Annotated[str, Field(min_length=1)]
_Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    # text, texts, token ids, or lists of token ids
    prompt: (_Text | Annotated[list[_Text], Field(min_length=1)] | _Ids
             | Annotated[list[_Ids], Field(min_length=1)])
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)  # alternatives per token (0: the token's own)
    echo: bool = False  # the prompt's text precedes the completion

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value):
        for text in [value] if isinstance(value, str) else value:
            if isinstance(text, str):
                _utf8(text)
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(_Request):
    type: Literal["text"]
    text: str


_Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class FunctionCall(_Request):
    name: _Name
    arguments: str  # a JSON object, as text


class ToolCall(_Request):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Request):
    name: _Name
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments; none: no arguments
    strict: bool | None = None  # the schema is always enforced exactly


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: _Name


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class _Turn(_Request):
    """A chat message: its content is a string or an array of text parts."""

    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, value):
        for text in [value] if isinstance(value, str) else [part.text for part in value or []]:
            _utf8(text)
        return value

    def text(self) -> str:
        content: str | list[TextPart] | None = self.content
        if content is None or isinstance(content, str):
            return content or ""
        return "".join(part.text for part in content)


class SystemTurn(_Turn):
    role: Literal["system"]


class DeveloperTurn(_Turn):
    role: Literal["developer"]


class UserTurn(_Turn):
    role: Literal["user"]


class AssistantTurn(_Turn):
    """An earlier assistant turn: text, or the tool calls it made (then content may be null)."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # type: ignore[assignment]
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _said_something(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant turn has content, tool_calls, or both")
        return self


class ToolTurn(_Turn):
    """A tool's answer to the call `tool_call_id`."""

    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1)


ChatMessage = Annotated[SystemTurn | DeveloperTurn | UserTurn | AssistantTurn | ToolTurn,
                        Field(discriminator="role")]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @model_validator(mode="after")
    def _tools_named(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: each function name appears once")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        return self

    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """How tools may be used: not at all, at the model's choice, at least one call, or one named call."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class _Envelope(BaseModel):
    """What every completion response and stream chunk carries besides its choices."""

    id: str
    created: int
    model: str
    usage: Usage | None = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of tool call `index`: its first piece has the id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tensafe"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadAdapterRequest(_Request):
    """Loads a plaintext adapter; HE-LoRA adapters are configured at start (serving.adapters),
    so a `he` field is refused by name rather than ignored."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    path: str = Field(min_length=1)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
