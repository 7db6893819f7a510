"""The outermost ASGI layer: counts and times every request, checks the API key and the body size.

Plain ASGI rather than FastAPI middleware, so that it sees every answer (even a 413 for a body never parsed)
and passes the client's ``receive`` through untouched: the routes watch it to notice a client that leaves.
"""

from __future__ import annotations

import hmac
import time

from .errors import APIError, error_response
from .metrics import Metrics

OPEN_PATHS = ("/health", "/metrics")  # no API key needed: probes and scrapers


class Gate:
    def __init__(
        self, app, metrics: Metrics, max_body_bytes: int, api_key: str | None, tei_paths: frozenset[str] = frozenset()
    ):
        self.app, self.metrics, self.max_body_bytes, self.api_key = app, metrics, max_body_bytes, api_key
        self.tei_paths = tei_paths  # routes whose errors take TEI's shape

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._serve(scope, receive, sending)
        finally:
            self.metrics.request(scope["path"], status, time.perf_counter() - start)

    async def _serve(self, scope, receive, send) -> None:
        if self.api_key and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(given, self.api_key.encode()):
                await _drain(receive)
                return await self._reply(scope, send, APIError(401, "missing or wrong API key", code="invalid_api_key"))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _drain(receive)
            return await self._too_large(scope, send)
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.max_body_bytes:
                if more:
                    await _drain(receive)
                return await self._too_large(scope, send)
        data, replayed = b"".join(body), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": data, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send) -> None:
        message = f"request body over the limit of {self.max_body_bytes} bytes"
        await self._reply(scope, send, APIError(413, message, code="body_too_large"))

    async def _reply(self, scope, send, err: APIError) -> None:
        async def nothing():
            return {"type": "http.disconnect"}

        await error_response(err, scope["path"] in self.tei_paths)(scope, nothing, send)


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
