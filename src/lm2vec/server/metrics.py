"""The server's Prometheus metrics (``GET /metrics``), in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/v1/embeddings", "/v1/models", "/embed", "/info", "/health", "/metrics")  # other paths: "other"
POWERS_OF_TWO = tuple(float(2**i) for i in range(17))


class Metrics:
    """Requests by route and status, request latency, texts and tokens embedded, queue depth, model calls."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lm2vec_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram(
            "lm2vec_request_duration_seconds",
            "Time from a request's arrival to its response",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.texts = Counter("lm2vec_embedded_texts", "Texts embedded", registry=r)
        self.tokens = Counter("lm2vec_embedded_tokens", "Tokens embedded", registry=r)
        self.queue_tokens = Gauge("lm2vec_queue_tokens", "Tokens waiting for the model", registry=r)
        self.queue_requests = Gauge("lm2vec_queue_requests", "Requests with rows waiting for the model", registry=r)
        self.call_texts = Histogram(
            "lm2vec_model_call_texts", "Texts per model call", buckets=POWERS_OF_TWO[:11], registry=r
        )
        self.call_tokens = Histogram(
            "lm2vec_model_call_tokens", "Tokens per model call", buckets=POWERS_OF_TWO[4:], registry=r
        )
        self.call_seconds = Histogram("lm2vec_model_call_seconds", "Duration of model calls", registry=r)

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def model_call(self, texts: int, tokens: int, seconds: float) -> None:
        self.texts.inc(texts)
        self.tokens.inc(tokens)
        self.call_texts.observe(texts)
        self.call_tokens.observe(tokens)
        self.call_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
