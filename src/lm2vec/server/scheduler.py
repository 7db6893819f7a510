"""Fair, bounded model calls on a thread of their own: why one big request cannot stall the others.

Each request's token rows wait in a queue; the model takes them in calls of at most ``max_batch_tokens`` tokens
and ``max_batch_texts`` texts. A call is filled in turns: every waiting request first gets an equal share of
the token budget, then what is left goes round in order, and the next call starts with the next request. So a
2,048-text request becomes many calls, and a one-sentence request that arrives meanwhile rides in the very
next one. Concurrent small requests share calls (dynamic batching).

The model never runs on the event loop's thread: ``/health`` and ``/metrics`` answer while it computes. Where
it runs is an executor of one thread. ``lm2vec serve`` gives it the process's main thread and runs the event
loop on a second one (:class:`MainThreadExecutor`): torch's intra-op threads keep both cores busy only when
driven from the main thread (torch 2.13, 2 cores, SmolLM2, 400 STS-B sentences: 1.99 cores and 22.8-25.2
texts/s there, 1.73 cores and 21.5-21.7 texts/s from a worker thread with its own thread count, and the earlier
server, which ran the model on the loop's thread, froze every client for minutes behind a 2,048-text request).
An app built by :func:`~lm2vec.server.create_app` (in-process, e.g. tests) uses a worker thread instead.

Backpressure: beyond ``max_queued_tokens`` waiting, a request is refused with :class:`Overloaded` (503 and
``Retry-After`` from the measured throughput) rather than queued for minutes. A request whose waiter is
cancelled (its client went away) leaves the queue at once; only the call already running finishes.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .metrics import Metrics

Embed = Callable[[list[list[int]], list[int]], torch.Tensor]


class Overloaded(Exception):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining for shutdown and takes no new work, or ran out of time to finish this."""


@dataclass(eq=False)
class Job:
    """One request's rows; ``taken`` rows went to the model, ``chunks`` hold the vectors that came back."""

    ids: list[list[int]]
    prefix: list[int]
    future: asyncio.Future
    taken: int = 0
    received: int = 0
    chunks: list[torch.Tensor] = field(default_factory=list)

    def waiting_tokens(self) -> int:
        return sum(map(len, self.ids[self.taken :]))


@dataclass
class Call:
    """One model call: ``(job, start, end)`` row ranges."""

    parts: list[tuple[Job, int, int]]

    def rows(self) -> tuple[list[list[int]], list[int]]:
        ids = [row for job, start, end in self.parts for row in job.ids[start:end]]
        return ids, [p for job, start, end in self.parts for p in job.prefix[start:end]]


class Scheduler:
    """Queues requests' rows and feeds the model thread fair, bounded calls (see the module docstring)."""

    def __init__(
        self,
        embed: Embed,
        metrics: Metrics,
        max_batch_tokens: int,
        max_batch_texts: int,
        max_queued_tokens: int,
        threads: int,
        executor: Executor | None = None,
    ):
        """``executor``: where the model runs (one thread); default: a worker thread with ``threads`` torch threads."""
        self.embed_rows, self.metrics = embed, metrics
        self.max_batch_tokens, self.max_batch_texts = max_batch_tokens, max_batch_texts
        self.max_queued_tokens = max_queued_tokens
        self.executor = executor or ThreadPoolExecutor(
            1, "lm2vec-model", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self.waiting: deque[Job] = deque()  # jobs with rows not yet taken, in turn order
        self.queued_tokens = 0
        self.model_calls = 0
        self.accepting = True
        self.tokens_per_second = 0.0  # measured, for Retry-After
        self._wakeup: asyncio.Event | None = None
        self._in_flight: set[Job] = set()
        metrics.queue_tokens.set_function(lambda: self.queued_tokens)
        metrics.queue_requests.set_function(lambda: len(self.waiting))

    async def embed(self, ids: list[list[int]], prefix: list[int]) -> torch.Tensor:
        """The rows' vectors (float32, input order). Cancelling the caller drops the rows not yet computed."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        tokens = sum(map(len, ids))
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queued_tokens:
            raise Overloaded(self.retry_after(tokens))
        job = Job(ids, prefix, asyncio.get_running_loop().create_future())
        self.waiting.append(job)
        self._in_flight.add(job)
        self.queued_tokens += tokens
        self._wake()
        try:
            return await job.future
        finally:
            self._forget(job)

    def retry_after(self, tokens: int) -> int:
        """Seconds until the queue has room for ``tokens`` at the measured speed (1 s when not yet measured)."""
        excess = self.queued_tokens + tokens - self.max_queued_tokens
        return max(1, math.ceil(excess / self.tokens_per_second)) if self.tokens_per_second else 1

    async def run(self) -> None:
        """The scheduling loop (an event-loop task): one call at a time on the model thread."""
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        while True:
            if not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                await asyncio.sleep(0.002)  # from idle: let requests arriving together share the first call
                continue
            call = self._next_call()
            ids, prefix = call.rows()
            start = time.perf_counter()
            try:
                vectors = await loop.run_in_executor(self.executor, self.embed_rows, ids, prefix)
            except Exception as err:  # these requests fail; the server goes on
                for job, _, _ in call.parts:
                    self._fail(job, err)
                continue
            self._record(ids, time.perf_counter() - start)
            self._deliver(call, vectors)

    def drain(self, seconds: float) -> None:
        """Take no new work; what is accepted has ``seconds`` to finish, then fails with :class:`ShuttingDown`."""
        self.accepting = False
        asyncio.get_running_loop().call_later(seconds, self.fail_all, ShuttingDown("the server shut down first"))

    def fail_all(self, err: Exception) -> None:
        for job in list(self._in_flight):
            self._fail(job, err)

    def close(self) -> None:
        self.fail_all(ShuttingDown("the server shut down first"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _next_call(self) -> Call:
        """Fill one call in turns: an equal share of the tokens per waiting job first, then the rest in order."""
        end = {job: job.taken for job in self.waiting}
        tokens = texts = 0
        for share in (max(1, self.max_batch_tokens // len(self.waiting)), self.max_batch_tokens):
            for job in self.waiting:
                used = 0
                while end[job] < len(job.ids) and texts < self.max_batch_texts:
                    length = len(job.ids[end[job]])
                    if tokens and (tokens + length > self.max_batch_tokens or used + length > share):
                        break  # (an empty call always takes one row, however long)
                    end[job], tokens, used, texts = end[job] + 1, tokens + length, used + length, texts + 1
        parts = [(job, job.taken, end[job]) for job in self.waiting if end[job] > job.taken]
        for job, _, stop in parts:
            job.taken = stop
        self.queued_tokens -= tokens
        self.waiting.rotate(-1)  # the next call starts with the next job
        self.waiting = deque(job for job in self.waiting if job.taken < len(job.ids))
        return Call(parts)

    def _deliver(self, call: Call, vectors: torch.Tensor) -> None:
        offset = 0
        for job, start, end in call.parts:
            job.chunks.append(vectors[offset : offset + end - start])
            offset += end - start
            job.received += end - start
            if job.received == len(job.ids) and not job.future.done():
                job.future.set_result(torch.cat(job.chunks))

    def _record(self, ids: list[list[int]], seconds: float) -> None:
        tokens = sum(map(len, ids))
        self.model_calls += 1
        self.metrics.model_call(len(ids), tokens, seconds)
        speed = tokens / max(seconds, 1e-6)
        self.tokens_per_second = speed if not self.tokens_per_second else 0.8 * self.tokens_per_second + 0.2 * speed

    def _fail(self, job: Job, err: Exception) -> None:
        self._forget(job)
        if not job.future.done():
            job.future.set_exception(err)

    def _forget(self, job: Job) -> None:
        """The job leaves the queue; its rows not yet taken are no longer owed."""
        if job in self.waiting:
            self.waiting.remove(job)
            self.queued_tokens -= job.waiting_tokens()
            job.taken = len(job.ids)
        self._in_flight.discard(job)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()


class MainThreadExecutor(Executor):
    """Runs submitted calls on the thread that calls :meth:`work`: the main thread, where torch runs fastest."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        if self._closed:
            future.cancel()
            future.set_running_or_notify_cancel()
        else:
            self._calls.put((future, fn, args, kwargs))
        return future

    def work(self, stop: threading.Event, poll: float = 0.1) -> None:
        """Run calls as they come until ``stop`` is set (polled, so signal handlers run meanwhile)."""
        while not stop.is_set():
            try:
                future, fn, args, kwargs = self._calls.get(timeout=poll)
            except queue.Empty:
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as err:  # handed to the waiting request, as a worker thread would
                    future.set_exception(err)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        while cancel_futures and not self._calls.empty():
            self._calls.get()[0].cancel()
