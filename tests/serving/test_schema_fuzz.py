"""Schemathesis against the server's own OpenAPI document (the model name pinned, a valid key):
no 5xx, and every status, content type and body matches what the document says."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tensafe.models.loader import load_model
from tensafe.serving.app import Exposure, ServerLimits, create_app
from tensafe.serving.auth import hash_api_key
from tensafe.serving.engine import EmbeddedEngine
from tensafe.serving.multi_lora import MultiLoRA
from tests.serving.live import live_server

KEY = "sk-schema"
BASE = "tiny-llama"
EXAMPLES = 150  # per operation


def _pin_model(ctx, body):
    """A real model name, so that generation runs rather than every case answering 404."""
    if isinstance(body, dict) and "model" in body:
        body["model"] = BASE
    return body


def test_generated_requests_get_documented_answers_and_no_server_error(tiny_cfg):
    loaded = load_model(tiny_cfg.model, seed=0)
    engine = EmbeddedEngine(loaded.model, loaded.tokenizer, MultiLoRA(loaded.model), max_running=8,
                            prefill_chunk=64)
    app = create_app(engine, BASE, [hash_api_key(KEY)],
                     ServerLimits(max_prompt_tokens=256, max_tokens=64, max_body_bytes=8192),
                     exposure=Exposure(docs=True))
    with live_server(app) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        schema.hook("map_body")(_pin_model)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
        statuses: dict[str, set[int]] = {}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None, derandomize=True)
            def check(case):
                # every check but "schema-valid data is accepted": the document cannot express the
                # cross-field rules (seed + n − 1 < 2^63, limits, parameters refused unless neutral)
                response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                                  excluded_checks=[positive_data_acceptance])
                statuses.setdefault(case.operation.path, set()).add(response.status_code)

            check()
    # generation really ran (not only refusals), and bad input was answered with 400s
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert {200, 400} <= statuses[path], statuses
