"""Prometheus metrics of the serving path, in a registry per server (tests run several)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for /metrics)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServingMetrics:
    """Request latency, time to first token, tokens and queue depth, labelled by model/adapter."""

    def __init__(self, queue_depth: Callable[[], float]):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "tensafe_inference_latency_seconds", "Request latency, arrival to last token.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "tensafe_time_to_first_token_seconds", "Arrival to the first generated token.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter(
            "tensafe_inference_tokens", "Tokens processed, by kind (prompt or completion).",
            ["model", "kind"], registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tensafe_request_queue_depth", "Sequences admitted or waiting in the engine.",
            registry=self.registry,
        )
        self.queue_depth.set_function(queue_depth)
        self.requests = Counter(
            "tensafe_requests", "API requests answered, by model (empty before one is named) and status.",
            ["model", "status"], registry=self.registry,
        )
        self.errors = Counter(
            "tensafe_request_errors", "Requests that ended in an error, by model and OpenAI error type "
            "(a stream's error event counts, though its status was 200).", ["model", "type"],
            registry=self.registry,
        )
        self.he_lora_latency = Histogram(
            "tensafe_he_lora_latency_seconds",
            "One HE-LoRA module delta (stage=total), and its stages: encrypt, evaluator (round trip), "
            "decrypt.", ["model", "stage"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )

        self.draft_tokens = Counter(
            "tensafe_speculative_draft_tokens",
            "Draft tokens of speculative decoding, by model and outcome (accepted or rejected); the "
            "acceptance rate is accepted / (accepted + rejected).", ["model", "outcome"],
            registry=self.registry,
        )

    def forget(self, model: str) -> None:
        """Drop every series of `model` (an adapter that was unloaded)."""
        by_model = {self.latency: ("model",), self.time_to_first_token: ("model",),
                    self.tokens: ("model", "kind"), self.requests: ("model", "status"),
                    self.errors: ("model", "type"), self.he_lora_latency: ("model", "stage"),
                    self.draft_tokens: ("model", "outcome")}
        for metric, names in by_model.items():
            series = {tuple(s.labels[n] for n in names) for family in metric.collect() for s in family.samples
                      if s.labels.get("model") == model and all(n in s.labels for n in names)}
            for labels in series:
                metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
