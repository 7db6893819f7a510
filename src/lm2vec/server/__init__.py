"""An embeddings server: OpenAI's ``POST /v1/embeddings`` and ``GET /v1/models``, text-embeddings-inference's
``POST /embed`` and ``GET /info``, ``GET /health`` and Prometheus ``GET /metrics``.

How a request travels: :mod:`.gate` (count, API key, body size) -> a route in :mod:`.openai_api` or
:mod:`.tei_api` (parse with :mod:`.errors`, limits and tokenization in :mod:`.service`) -> :mod:`.scheduler`
(token-bounded model calls that take turns between requests, on a model thread of their own; 503 when the
queue is full) -> the response, serialized off the event loop. Every error is JSON in OpenAI's shape, and
no request can stall the others: the event loop never runs the model.
"""

from .app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
