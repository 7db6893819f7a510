"""The app: settings, wiring, health and metrics, and uvicorn with a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import threading
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..encoder import Encoder
from . import openai_api, tei_api
from .errors import add_handlers
from .gate import Gate
from .metrics import Metrics
from .scheduler import MainThreadExecutor, Scheduler
from .service import Limits, Service

CPU_BATCH_TOKENS = 2048  # a model call of ~1-5 s on 2 CPU cores for a 135M model: the wait a small request may see
GPU_BATCH_TOKENS = 16384  # text-embeddings-inference's default


@dataclass
class ServerSettings:
    """Limits and identity of one server; the defaults suit a small model on a CPU."""

    model_name: str
    api_key: str | None = None
    max_inputs: int = 2048  # texts per request, as OpenAI
    max_chars: int = 100_000  # characters per text
    max_request_tokens: int = 300_000  # tokens per request, as OpenAI
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_tokens: int | None = None  # tokens per model call; None: CPU_BATCH_TOKENS, GPU_BATCH_TOKENS
    max_batch_texts: int = 256  # texts per model call
    batch_size: int = 32  # texts per forward pass within a call (padded models; packed ones: max_batch_tokens)
    max_queued_tokens: int | None = None  # beyond it 503 + Retry-After; None: 4 maximal requests
    drain_seconds: float = 30.0  # on SIGTERM, time to finish accepted requests
    threads: int | None = None  # the model thread's torch threads; None: torch.get_num_threads()
    normalize: bool = True  # unit vectors, as OpenAI's

    def batch_tokens(self, device: torch.device) -> int:
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        return CPU_BATCH_TOKENS if device.type == "cpu" else GPU_BATCH_TOKENS

    def queued_tokens(self) -> int:
        return self.max_queued_tokens if self.max_queued_tokens is not None else 4 * self.max_request_tokens


def create_app(encoder: Encoder, settings: ServerSettings) -> Gate:
    """The ASGI app serving ``encoder``; run it with uvicorn (see :func:`serve`)."""
    return _build(encoder, settings)[0]


def _build(encoder: Encoder, settings: ServerSettings, executor: Executor | None = None) -> tuple[Gate, Scheduler]:
    for name in ("max_inputs", "max_chars", "max_request_tokens", "max_body_bytes", "max_batch_texts", "batch_size"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(settings, name)}")
    metrics = Metrics()
    max_batch_tokens = settings.batch_tokens(encoder.device)
    scheduler = Scheduler(
        lambda ids, prefix: encoder.embed_tokens(ids, prefix, batch_size=settings.batch_size),
        metrics,
        max_batch_tokens=max_batch_tokens,
        max_batch_texts=settings.max_batch_texts,
        max_queued_tokens=settings.queued_tokens(),
        threads=settings.threads or torch.get_num_threads(),
        executor=executor,
    )
    service = Service(encoder, scheduler, Limits(settings.max_inputs, settings.max_chars, settings.max_request_tokens))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(scheduler.run())
        yield
        task.cancel()
        scheduler.close()
        service.close()

    app = FastAPI(title="lm2vec embeddings", lifespan=lifespan)
    add_handlers(app, tei_api.PATHS)

    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, object] = {"status": "ok" if scheduler.accepting else "draining"}
        body["model"] = settings.model_name
        body |= {"model_calls": scheduler.model_calls, "queued_tokens": scheduler.queued_tokens}
        return JSONResponse(body, status_code=200 if scheduler.accepting else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    openai_api.add_routes(app, service, settings.model_name, settings.normalize)
    tei_api.add_routes(app, service, settings.model_name, max_batch_tokens)
    return Gate(app, metrics, settings.max_body_bytes, settings.api_key, tei_api.PATHS), scheduler


class _DrainingServer(uvicorn.Server):
    """uvicorn, which on SIGTERM stops accepting and waits for open requests; and the scheduler, which takes no
    new work and fails what is still queued after ``drain_seconds`` (503), so no accepted request hangs."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_seconds: float):
        super().__init__(config)
        self.scheduler, self.drain_seconds = scheduler, drain_seconds
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit and self.loop is not None:
            self.loop.call_soon_threadsafe(self.scheduler.drain, self.drain_seconds)
        super().handle_exit(sig, frame)


def serve(encoder: Encoder, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGTERM or Ctrl-C (then drain). Binds to loopback unless ``host`` says otherwise.

    The model runs on this (the main) thread and the event loop on a second one: see :mod:`.scheduler`.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() runs the model on the main thread; call it from there (or use create_app)")
    executor = MainThreadExecutor()
    app, scheduler = _build(encoder, settings, executor)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(settings.drain_seconds) + 5
    )
    server = _DrainingServer(config, scheduler, settings.drain_seconds)
    stopped = threading.Event()

    def run_loop() -> None:
        try:
            server.run()
        finally:
            stopped.set()

    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    loop_thread = threading.Thread(target=run_loop, name="lm2vec-http")
    torch.set_num_threads(settings.threads or torch.get_num_threads())
    try:
        loop_thread.start()
        executor.work(stopped)
    finally:
        server.should_exit = True
        loop_thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise OSError(f"the server did not start on {host}:{port} (see uvicorn's message above)")
