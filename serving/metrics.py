"""Prometheus metrics for ``GET /metrics``, named after TGI's where TGI has one.

Each app gets its own registry, so two servers in one process (the tests) do not collide.
prometheus_client adds ``_total`` to counters (``tgi_request_count_total``); the rest of each
name is TGI's.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKENS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = r = CollectorRegistry()

        def seconds(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=_LATENCY, registry=r)

        def tokens(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=_TOKENS, registry=r)

        self.requests = Counter("tgi_request_count", "Generation requests received", registry=r)
        self.success = Counter("tgi_request_success", "Requests answered", registry=r)
        self.failure = Counter("tgi_request_failure", "Requests failed", ["err"], registry=r)
        self.cancelled = Counter(
            "tinycloud_request_cancelled", "Requests whose client left first", registry=r
        )
        self.duration = seconds("tgi_request_duration", "Request time (s)")
        self.validation_duration = seconds("tgi_request_validation_duration", "Validation (s)")
        self.queue_duration = seconds("tgi_request_queue_duration", "Time in the queue (s)")
        self.inference_duration = seconds("tgi_request_inference_duration", "Inference (s)")
        self.time_per_token = seconds(
            "tgi_request_mean_time_per_token_duration", "Inference time per token (s)"
        )
        self.first_token = seconds("tgi_request_first_token_duration", "Time to first token (s)")
        self.generated = tokens("tgi_request_generated_tokens", "Tokens per request")
        self.input_length = tokens("tgi_request_input_length", "Input tokens per request")
        self.max_new_tokens = tokens("tgi_request_max_new_tokens", "max_new_tokens per request")
        self.tokens = Counter("tgi_generated_tokens", "Tokens generated", registry=r)
        queue = Gauge("tgi_queue_size", "Requests waiting for a slot", registry=r)
        queue.set_function(lambda: engine.queue_size)
        batch = Gauge("tgi_batch_current_size", "Sequences decoding together", registry=r)
        batch.set_function(lambda: engine.batch_size)
        in_flight = Gauge("tinycloud_requests_in_flight", "Queued + decoding", registry=r)
        in_flight.set_function(lambda: engine.in_flight)
        steps = Gauge("tinycloud_decode_steps", "Batched decode steps run", registry=r)
        steps.set_function(lambda: engine.steps)

    def render(self) -> bytes:
        return generate_latest(self.registry)
