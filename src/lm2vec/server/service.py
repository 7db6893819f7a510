"""What the OpenAI and TEI routes share: the limits, tokenization off the event loop, the scheduler, and
noticing a client that leaves (its rows not yet computed are dropped)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import Request, Response

from ..datafiles import check_unicode
from ..encoder import Encoder
from .errors import APIError
from .scheduler import Overloaded, Scheduler, ShuttingDown

T = TypeVar("T")
CLIENT_LEFT = 499  # nginx's "client closed request": counted in the metrics, never seen by the client


@dataclass
class Limits:
    max_inputs: int
    max_chars: int
    max_request_tokens: int


class ClientLeft(Exception):
    pass


class Service:
    def __init__(self, encoder: Encoder, scheduler: Scheduler, limits: Limits):
        self.encoder, self.scheduler, self.limits = encoder, scheduler, limits
        # One thread: a fast tokenizer must not be called from two threads at once ("Already borrowed").
        self.tokenizer_thread = ThreadPoolExecutor(1, "lm2vec-tokenize")

    def check_count(self, count: int) -> None:
        if not count:
            raise APIError(422, "input must not be empty", "input")
        if count > self.limits.max_inputs:
            message = f"{count} inputs; at most {self.limits.max_inputs} per request"
            raise APIError(413, message, "input", "too_many_inputs")

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and dimensions > self.encoder.dim:
            raise APIError(422, f"dimensions must be at most {self.encoder.dim}, got {dimensions}", "dimensions")

    async def embed_input(
        self, request: Request, items: list, prompt_name: str | None, truncate: bool = True
    ) -> tuple[torch.Tensor, int]:
        """Texts or token-id rows (the input of either API): their vectors and token count."""
        if items and isinstance(items[0], list):
            rows = self.token_rows(items, prompt_name)
            return await self.embed_ids(request, rows, [0] * len(rows)), sum(map(len, rows))
        return await self.embed_texts(request, items, prompt_name, truncate)

    def token_rows(self, items: list, prompt_name: str | None) -> list[list[int]]:
        """Token-id input, checked and cut at ``max_length``."""
        self.check_count(len(items))
        vocab = len(self.encoder.tokenizer)
        for i, row in enumerate(items):
            if not row or any(not 0 <= t < vocab for t in row):
                raise APIError(422, f"input[{i}]: token ids must be a non-empty list within 0..{vocab - 1}", "input")
        if prompt_name is not None:
            raise APIError(422, "prompt_name applies to text input, not token ids", "prompt_name")
        return [row[: self.encoder.max_length] for row in items]

    async def embed_texts(
        self, request: Request, texts: list[str], prompt_name: str | None, truncate: bool = True
    ) -> tuple[torch.Tensor, int]:
        """The texts' vectors (unnormalized float32) and their token count. ``truncate=False``: a text over
        ``max_length`` tokens is an error instead of being cut."""
        self.check_count(len(texts))
        for i, text in enumerate(texts):
            if not text:
                raise APIError(422, f"input[{i}] is an empty string", "input")
            if len(text) > self.limits.max_chars:
                message = f"input[{i}] has {len(text)} characters; at most {self.limits.max_chars}"
                raise APIError(413, message, "input", "input_too_long")
            try:
                check_unicode(text, f"input[{i}]")
            except ValueError as err:
                raise APIError(422, str(err), "input") from None
        try:
            instruction = self.encoder.resolve_instruction(prompt_name, None, None) or ""
        except ValueError as err:
            raise APIError(422, str(err), "prompt_name") from err
        loop = asyncio.get_running_loop()
        ids, prefix = await loop.run_in_executor(self.tokenizer_thread, self._tokenize, instruction, texts, truncate)
        return await self.embed_ids(request, ids, prefix), sum(map(len, ids))

    async def embed_ids(self, request: Request, ids: list[list[int]], prefix: list[int]) -> torch.Tensor:
        tokens = sum(map(len, ids))
        if tokens > self.limits.max_request_tokens:
            message = f"the request has {tokens} tokens; at most {self.limits.max_request_tokens}"
            raise APIError(413, message, "input", "too_many_tokens")
        try:
            return await unless_client_leaves(request, self.scheduler.embed(ids, prefix))
        except Overloaded as err:
            raise APIError(503, str(err), code="overloaded", headers={"Retry-After": str(err.retry_after)}) from None
        except ShuttingDown as err:
            raise APIError(503, str(err), code="shutting_down", headers={"Retry-After": "1"}) from None
        except ClientLeft:
            raise APIError(CLIENT_LEFT, "the client closed the connection") from None

    def _tokenize(self, instruction: str, texts: list[str], truncate: bool) -> tuple[list[list[int]], list[int]]:
        instructions = [instruction] * len(texts)
        ids, prefix = self.encoder.tokenization.tokenize(instructions, texts)
        if not truncate and (cut := self.encoder.tokenization.cut(instructions, texts, ids)):
            message = f"input[{cut[0]}] is longer than {self.encoder.max_length} tokens; send truncate: true to cut it"
            raise APIError(413, message, "inputs", "input_too_long")
        return ids, prefix

    def close(self) -> None:
        self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled and :class:`ClientLeft` raised."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    done: set[asyncio.Future] = set()
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if task not in done:
            task.cancel()  # the scheduler drops the rows not yet computed
    if task not in done:
        raise ClientLeft
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def json_response(build: Callable[[], Any]) -> Response:
    """``build()`` serialized to JSON on a worker thread: a big response must not hold up the event loop."""
    content = await asyncio.to_thread(lambda: json.dumps(build(), separators=(",", ":")).encode())
    return Response(content, media_type="application/json")
