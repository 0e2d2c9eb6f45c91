"""Structured outputs and tool calls: what the model writes matches the schema asked for, checked by
an independent JSON Schema validator; what cannot be honoured is a 400 naming the parameter."""

from __future__ import annotations

import copy
import json

import httpx
import jsonschema
import openai
import pytest

from tensafe.models.loader import load_model
from tensafe.serving.app import ServerLimits, create_app
from tensafe.serving.auth import hash_api_key
from tensafe.serving.engine import EmbeddedEngine
from tests.serving.live import live_server
from tests.serving.test_robustness import AUTH, BASE, KEY, _StubEngine

LIMITS = ServerLimits(max_prompt_tokens=512, max_tokens=64)
RECORD = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tier": {"enum": ["gold", "silver"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "tier", "n"], "additionalProperties": False}
# A chat template that shows tools and earlier tool calls to the model (Hermes-style), as the
# templates of tool-trained models do; the tiny model's own ChatML template shows neither.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                                           "days": {"type": "integer", "minimum": 1,
                                                                    "maximum": 3}},
                          "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
HI = [{"role": "user", "content": "Hi"}]


def _serve(tiny_cfg, template: str | None = None):
    loaded = load_model(tiny_cfg.model, seed=0)
    tokenizer = loaded.tokenizer
    if template is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = template
    engine = EmbeddedEngine(loaded.model, tokenizer, max_running=8, prefill_chunk=64)
    return live_server(create_app(engine, BASE, [hash_api_key(KEY)], LIMITS))


@pytest.fixture(scope="module")
def client(tiny_cfg):
    with _serve(tiny_cfg) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tool_client(tiny_cfg):
    with _serve(tiny_cfg, TOOL_TEMPLATE) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}}


def test_json_schema_outputs_match_the_schema_streamed_or_not(client):
    free = client.chat.completions.create(model=BASE, messages=HI, max_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(free.choices[0].message.content), RECORD)  # unconstrained: not JSON
    for seed in range(4):
        out = client.chat.completions.create(model=BASE, messages=HI, max_tokens=64, temperature=1.0,
                                             seed=seed, response_format=_schema_format(RECORD))
        assert out.choices[0].finish_reason == "stop"  # the document is whole, then the sequence ends
        jsonschema.validate(json.loads(out.choices[0].message.content), RECORD)
    greedy = client.chat.completions.create(model=BASE, messages=HI, max_tokens=64, temperature=0,
                                            response_format=_schema_format(RECORD))
    stream = client.chat.completions.create(model=BASE, messages=HI, max_tokens=64, temperature=0,
                                            stream=True, response_format=_schema_format(RECORD))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        greedy.choices[0].message.content
    completion = client.completions.create(model=BASE, prompt="Record:", max_tokens=64, temperature=0,
                                           extra_body={"response_format": _schema_format(RECORD)})
    jsonschema.validate(json.loads(completion.choices[0].text), RECORD)


def test_json_object_outputs_are_json_objects(client):
    for seed in range(3):
        out = client.chat.completions.create(model=BASE, messages=HI, max_tokens=64, temperature=1.0,
                                             seed=seed, response_format={"type": "json_object"})
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(out.choices[0].message.content), dict)
        else:  # cut at max_tokens: what there is begins an object
            assert out.choices[0].message.content.startswith("{")


def test_schemas_that_cannot_constrain_generation_are_400s_naming_them(client):
    for schema, param in [({"type": "frobnicate"}, "response_format.json_schema.schema"),
                          ({"$ref": "#/definitions/missing"}, "response_format.json_schema.schema")]:
        with pytest.raises(openai.BadRequestError, match="cannot constrain") as err:
            client.chat.completions.create(model=BASE, messages=HI, max_tokens=4,
                                           response_format=_schema_format(schema))
        assert err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model=BASE, messages=HI, max_tokens=4,
                                       response_format={"type": "json_object", "json_schema": {"name": "x"}})


def test_an_engine_without_structured_outputs_refuses_them_by_name():
    app = create_app(_StubEngine(), BASE, [hash_api_key(KEY)], ServerLimits())
    with live_server(app) as url:
        body = {"model": BASE, "prompt": "x", "response_format": {"type": "json_object"}}
        r = httpx.post(url + "/v1/completions", headers=AUTH, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_tools_are_refused_when_the_chat_template_cannot_show_them(client):
    with pytest.raises(openai.BadRequestError, match="does not show tools") as err:
        client.chat.completions.create(model=BASE, messages=HI, max_tokens=4, tools=[WEATHER],
                                       tool_choice="required")
    assert err.value.body["param"] == "tools"
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    turns = HI + [{"role": "assistant", "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sun"}]
    with pytest.raises(openai.BadRequestError, match="earlier tool calls"):
        client.chat.completions.create(model=BASE, messages=turns, max_tokens=4)
    # tool_choice "none": the tools change nothing, so they are accepted
    assert client.chat.completions.create(model=BASE, messages=HI, max_tokens=2, tools=[WEATHER],
                                          tool_choice="none").choices


def test_a_named_tool_choice_calls_that_function_with_valid_arguments(tool_client):
    parameters = WEATHER["function"]["parameters"]
    named = {"type": "function", "function": {"name": "weather"}}
    for seed in range(3):
        out = tool_client.chat.completions.create(model=BASE, messages=HI, max_tokens=64, temperature=1.0,
                                                  seed=seed, tools=[WEATHER, CLOCK], tool_choice=named)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), parameters)
    stream = tool_client.chat.completions.create(model=BASE, messages=HI, max_tokens=64, temperature=0,
                                                 tools=[WEATHER, CLOCK], tool_choice=named, stream=True)
    pieces = [c.choices[0] for c in stream if c.choices]
    calls = [d for piece in pieces for d in piece.delta.tool_calls or []]
    assert calls[0].id and calls[0].function.name == "weather" and all(d.index == 0 for d in calls)
    assert pieces[-1].finish_reason == "tool_calls"
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in calls)), parameters)


def test_required_tool_choice_makes_calls_that_match_their_tools(tool_client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    called = 0
    for seed in range(3):
        out = tool_client.chat.completions.create(model=BASE, messages=HI, max_tokens=64, temperature=1.0,
                                                  seed=seed, tools=[WEATHER, CLOCK], tool_choice="required",
                                                  parallel_tool_calls=False)
        choice = out.choices[0]
        if choice.finish_reason == "length":  # ran out of tokens mid-call: the text so far, as content
            assert choice.message.content.startswith("[")
            continue
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        called += 1
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert called
    stream = tool_client.chat.completions.create(model=BASE, messages=HI, max_tokens=64, temperature=0,
                                                 tools=[WEATHER, CLOCK], tool_choice="required", stream=True,
                                                 parallel_tool_calls=False)
    pieces = [c.choices[0] for c in stream if c.choices]
    assert pieces[-1].finish_reason == "tool_calls"
    (delta,) = pieces[-1].delta.tool_calls
    assert delta.id.startswith("call_") and delta.index == 0
    jsonschema.validate(json.loads(delta.function.arguments), schemas[delta.function.name])


def test_tool_turns_reach_the_template_and_auto_is_refused_by_name(tool_client):
    turns = HI + [{"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sun"}]
    short = tool_client.chat.completions.create(model=BASE, messages=HI, max_tokens=1)
    long = tool_client.chat.completions.create(model=BASE, messages=turns, max_tokens=1, tools=[WEATHER],
                                               tool_choice="none")
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 20  # the tools, the call and its answer
    with pytest.raises(openai.BadRequestError, match="auto") as err:
        tool_client.chat.completions.create(model=BASE, messages=HI, max_tokens=4, tools=[WEATHER])
    assert err.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        tool_client.chat.completions.create(model=BASE, messages=HI, max_tokens=4, tools=[WEATHER],
                                            tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        tool_client.chat.completions.create(model=BASE, messages=HI, max_tokens=4, tools=[WEATHER],
                                            tool_choice="required", response_format={"type": "json_object"})
