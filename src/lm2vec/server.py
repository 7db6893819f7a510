"""An OpenAI-compatible embeddings server: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``.

Requests are tokenized as they arrive and queued; the model takes everything queued (up to
``batch_texts`` texts, after a 2 ms pause) as one model batch, so concurrent clients share forward passes
(dynamic batching). Bad requests get OpenAI's JSON error shape with a 4xx status, and the
server keeps serving: malformed JSON 400, missing or wrong API key 401, unknown model 404, too many or
too long inputs and oversized bodies 413, wrong types or values 422.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt, StrictStr

from .encoder import Encoder
from .outputs import Precision, postprocess


@dataclass
class ServerSettings:
    """Limits and identity of one server; the defaults suit a small model on a CPU."""

    model_name: str
    api_key: str | None = None
    max_inputs: int = 2048  # texts per request, as OpenAI
    max_chars: int = 100_000  # characters per text
    max_body_bytes: int = 8 * 1024 * 1024
    batch_texts: int = 256  # texts merged into one model call
    batch_size: int = 32  # texts per forward pass within it
    normalize: bool = True  # unit vectors, as OpenAI's


class EmbeddingRequest(BaseModel):
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None
    prompt_name: StrictStr | None = None  # lm2vec: a named instruction saved with the model
    precision: Precision = "float32"  # lm2vec: int8, uint8, binary, ubinary as sentence-transformers


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class DynamicBatcher:
    """Merges the token rows of concurrent requests into shared model calls, run on the event loop's thread.

    The model runs on the loop's own thread, blocking it while it computes: requests that arrive meanwhile
    wait in the socket buffers and join the next call. A worker thread would be the usual design, but torch's
    intra-op threads did not follow it there: 256 sentences took 7.6 s on a worker thread (1.1 cores busy)
    against 3.4 s on the main thread (2 cores), measured on 2 cores with torch 2.13.
    """

    def __init__(self, embed: Callable[[list[list[int]], list[int]], torch.Tensor], batch_texts: int):
        self.embed, self.batch_texts = embed, batch_texts
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.model_calls = 0

    async def __call__(self, ids: list[list[int]], prefix: list[int], finish: Callable[[torch.Tensor], object]):
        """The request's rows embedded and passed through ``finish``."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Job(ids, prefix, finish, future))
        return await future

    def _run(self, jobs: list[Job]) -> list:
        vectors = self.embed([row for job in jobs for row in job.ids], [p for job in jobs for p in job.prefix])
        bounds = np.cumsum([0] + [len(job.ids) for job in jobs])
        return [job.finish(vectors[start:end]) for job, start, end in zip(jobs, bounds, bounds[1:], strict=False)]

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            await asyncio.sleep(0.002)  # let requests already received (read during the last call) join this one
            count = len(jobs[0].ids)
            while count < self.batch_texts and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                count += len(jobs[-1].ids)
            try:
                results = self._run(jobs)
            except Exception as err:  # the requests fail, the server goes on
                results = [err] * len(jobs)
            self.model_calls += 1
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():  # a client that went away leaves a cancelled future
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)


@dataclass
class Job:
    ids: list[list[int]]
    prefix: list[int]
    finish: Callable[[torch.Tensor], object]
    future: asyncio.Future


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets a 413 JSON error (read and dropped, not parsed)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _drain(receive)
            return await self._reject(scope, receive, send)
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.max_bytes:
                await _drain(receive) if more else None
                return await self._reject(scope, receive, send)
        data, replayed = b"".join(body), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": data, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send) -> None:
        message = f"request body over the limit of {self.max_bytes} bytes"
        await JSONResponse(error_body(message, code="body_too_large"), status_code=413)(scope, receive, send)


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def create_app(encoder: Encoder, settings: ServerSettings) -> BodyLimit:
    """The FastAPI app serving ``encoder``; run it with uvicorn (see :func:`serve`)."""
    batcher = DynamicBatcher(
        lambda ids, prefix: encoder.embed_tokens(ids, prefix, batch_size=settings.batch_size), settings.batch_texts
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="lm2vec embeddings", lifespan=lifespan)
    app.state.batcher = batcher
    _add_errors_and_auth(app, settings)
    _add_routes(app, encoder, settings, batcher)
    return BodyLimit(app, settings.max_body_bytes)


def _add_errors_and_auth(app: FastAPI, settings: ServerSettings) -> None:
    """Every error in OpenAI's JSON shape; the API key checked before any route runs."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.message, param=err.param, code=err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON: {first.get('msg')}", code="json_invalid"), 400)
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return JSONResponse(error_body(f"{where}: {first.get('msg')}", param=where or None), status_code=422)

    @app.middleware("http")
    async def authorize(request: Request, call_next: Callable[[Request], Awaitable]):
        if settings.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return JSONResponse(error_body("missing or wrong API key", code="invalid_api_key"), status_code=401)
        return await call_next(request)


def _add_routes(app: FastAPI, encoder: Encoder, settings: ServerSettings, batcher: DynamicBatcher) -> None:
    """``/health``, ``/v1/models`` and ``/v1/embeddings``."""
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "model_calls": batcher.model_calls}

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "lm2vec"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest) -> dict:
        if request.model != settings.model_name:
            message = f"unknown model {request.model!r}; this server serves {settings.model_name!r}"
            raise APIError(404, message, "model", "model_not_found")
        if request.dimensions is not None and request.dimensions > encoder.dim:
            raise APIError(422, f"dimensions must be at most {encoder.dim}, got {request.dimensions}", "dimensions")
        ids, prefix = tokenize(encoder, request, settings)
        rows = await batcher(
            ids, prefix, lambda v: np.asarray(postprocess(v, request.dimensions, settings.normalize, request.precision))
        )
        data = [
            {"object": "embedding", "index": i, "embedding": encode_row(row, request.encoding_format)}
            for i, row in enumerate(rows)
        ]
        tokens = sum(map(len, ids))
        return {
            "object": "list",
            "data": data,
            "model": settings.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def tokenize(encoder: Encoder, request: EmbeddingRequest, settings: ServerSettings) -> tuple[list[list[int]], list]:
    """Token rows and instruction lengths for the request's texts or token ids, after the limits."""
    items = [request.input] if isinstance(request.input, str) else request.input
    if not items:
        raise APIError(422, "input must not be empty", "input")
    if len(items) > settings.max_inputs:
        raise APIError(413, f"{len(items)} inputs; at most {settings.max_inputs} per request", "input", "too_many")
    if isinstance(items[0], int):  # one list of token ids
        items = [items]
    if isinstance(items[0], list):
        vocab = len(encoder.tokenizer)
        for i, row in enumerate(items):
            if not row or any(not 0 <= t < vocab for t in row):
                raise APIError(422, f"input[{i}]: token ids must be a non-empty list within 0..{vocab - 1}", "input")
        if request.prompt_name is not None:
            raise APIError(422, "prompt_name applies to text input, not token ids", "prompt_name")
        return [row[: encoder.max_length] for row in items], [0] * len(items)
    for i, text in enumerate(items):
        if not text:
            raise APIError(422, f"input[{i}] is an empty string", "input")
        if len(text) > settings.max_chars:
            message = f"input[{i}] has {len(text)} characters; at most {settings.max_chars}"
            raise APIError(413, message, "input", "input_too_long")
    try:
        instruction = encoder.resolve_instruction(request.prompt_name, None, None) or ""
    except ValueError as err:
        raise APIError(422, str(err), "prompt_name") from err
    return encoder.tokenization.tokenize([instruction] * len(items), list(items))


def encode_row(row: np.ndarray, encoding_format: str) -> list | str:
    """A float or integer list, or base64 of the row's bytes (float32 little-endian, or the int8/uint8 bytes)."""
    if encoding_format == "base64":
        return base64.b64encode(row.astype(row.dtype.newbyteorder("<"), copy=False).tobytes()).decode()
    return row.tolist()


def serve(encoder: Encoder, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted. Binds to loopback unless ``host`` says otherwise."""
    uvicorn.run(create_app(encoder, settings), host=host, port=port, log_level="warning")
