"""Prometheus metrics for ``GET /metrics``, named after TGI's where TGI has one.

Each app gets its own registry, so two servers in one process (the tests) do not collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKENS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tgi_request", "Requests received", registry=r)
        self.success = Counter("tgi_request_success", "Requests answered", registry=r)
        self.failure = Counter("tgi_request_failure", "Requests failed", ["err"], registry=r)
        self.duration = Histogram(
            "tgi_request_duration", "Request time (s)", buckets=_LATENCY, registry=r
        )
        self.first_token = Histogram(
            "tgi_request_first_token_duration",
            "Time to first token (s)",
            buckets=_LATENCY,
            registry=r,
        )
        self.generated = Histogram(
            "tgi_request_generated_tokens", "Tokens per request", buckets=_TOKENS, registry=r
        )
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
