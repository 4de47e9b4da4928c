"""EngineRuntime: the engine loop on its own thread, and the asyncio side's handle on it.

The engine is single-threaded: everything that touches it (adding, aborting, model changes) is a
command run by the loop thread between steps, so an abort frees its KV before the next step. Outputs
go back to each request's asyncio queue. The runtime bounds the number of requests in flight (overload
is refused, not queued without limit), records metrics, and shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from crosspool.engine.output import RequestOutput
from crosspool.engine.sampling import SamplingParams
from crosspool.server.metrics import Metrics

log = logging.getLogger("crosspool.server")
T = TypeVar("T")


class Overloaded(RuntimeError):
    """Too many requests in flight; the client should retry later."""


class ShuttingDown(RuntimeError):
    """The server is stopping and admits no new requests."""


class EngineDead(RuntimeError):
    """The engine loop stopped with an error."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    model: str
    prompt_tokens: int
    arrival_s: float


class EngineRuntime:
    def __init__(self, engine: Any, max_in_flight: int = 256, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.metrics = metrics or Metrics(engine)
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self.admitting = True
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- state --------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def model_names(self) -> list[str]:
        return list(self.engine.models)

    # ---- commands -----------------------------------------------------------------------------
    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future:
        """Run fn on the engine thread between steps."""
        if not self.alive:
            raise EngineDead(f"engine loop is not running: {self.error!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return fut

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    async def submit(self, model: str, prompt: str | list[int], params: SamplingParams,
                     request_id: str) -> tuple[int, AsyncIterator[RequestOutput]]:
        """Queue a request; returns (prompt token count, its outputs). Raises RequestError (bad
        request), Overloaded, ShuttingDown or EngineDead before anything is queued."""
        if not self.admitting:
            raise ShuttingDown("server is shutting down")
        if len(self._streams) >= self.max_in_flight:
            raise Overloaded(f"{len(self._streams)} requests in flight (limit {self.max_in_flight}); retry later")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def add() -> int:
            _, ids = self.engine.tokenize(model, prompt)
            rid = self.engine.add_request(model, ids, params, request_id)
            self._streams[rid] = _Stream(loop, q, model, len(ids), time.perf_counter())
            return len(ids)

        n_prompt = await self.run(add)
        log.info("request admitted", extra={"request_id": request_id, "model": model, "prompt_tokens": n_prompt})
        return n_prompt, self._outputs(request_id, q)

    async def _outputs(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:          # client went away (or the handler failed): free its KV now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        def do() -> None:
            if self._streams.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                self.metrics.aborted(request_id)
                log.info("request aborted", extra={"request_id": request_id})

        if self.alive:
            self.call(do)

    # ---- the loop -----------------------------------------------------------------------------
    def _run_commands(self, block: bool) -> None:
        try:
            fn, fut = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:   # handed to the awaiting request
                    fut.set_exception(exc)
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished()
                self._run_commands(block=not busy)
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._deliver(out)
        except BaseException as exc:
            self.error = exc
            log.exception("engine loop died")
            for rid, stream in list(self._streams.items()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDead(f"engine loop died: {exc!r}"))
                self._streams.pop(rid, None)
            while True:   # fail commands that will never run
                try:
                    _, fut = self._commands.get_nowait()
                except queue.Empty:
                    break
                fut.set_exception(EngineDead(f"engine loop died: {exc!r}"))

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        self.metrics.observe(out, stream.model, stream.prompt_tokens, stream.arrival_s)
        if out.finished:
            self._streams.pop(out.request_id, None)
            log.info("request finished", extra={"request_id": out.request_id, "model": stream.model,
                                                "finish_reason": out.finish_reason,
                                                "completion_tokens": len(out.token_ids)})
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    # ---- shutdown -----------------------------------------------------------------------------
    async def shutdown(self, timeout_s: float) -> None:
        """Stop admitting, let in-flight requests finish for up to timeout_s, abort the rest, stop the
        loop and release every page."""
        self.admitting = False
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)
        if self.alive:
            await self.run(lambda: None)      # the aborts above have run
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        self.engine.close()
        log.info("engine stopped; KV pages released")
