"""Server-sent events fed from generation that runs in a thread of its own.

Generation holds the engine lock, and the lock belongs to a thread, so the facade's
delta generator must be driven from start to end by one thread: a
:class:`ThreadedStream` runs it in a new thread and hands each item to the event
loop. Between two items (two tokens) the thread checks whether the stream was
cancelled; if so it closes the generator, which ends generation and lets the lock
go at once.

An :class:`EventStreamResponse` sends the events and cancels the stream when the
client goes away: it watches ``receive()`` for ``http.disconnect`` while it sends
(and a send that fails means the same). Either way the response ends without
waiting for the next token, and the thread stops at it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import closing
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = structlog.get_logger()

T = TypeVar("T")

DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class _End:
    """The producer finished (or was cancelled)."""


_END = _End()


class ThreadedStream(Generic[T]):
    """Items of ``produce()`` (a generator) made in a thread, read on the event loop.

    ``on_exit`` runs in the thread once the generator is closed (the completion slot
    goes back there). :meth:`start` must be called on the event loop that reads.
    """

    def __init__(
        self,
        produce: Callable[[], Generator[T, None, None]],
        *,
        on_exit: Callable[[], None],
        name: str = "editd-stream",
    ) -> None:
        self._produce = produce
        self._on_exit = on_exit
        self._name = name
        self._cancelled = threading.Event()
        self._queue: asyncio.Queue[T | _Failed | _End] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop at the next item; readers see the end at once (call on the event loop)."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._queue.put_nowait(_END)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def items(self) -> AsyncIterator[T]:
        """The items in order; raises what the generator raised."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def _run(self) -> None:
        try:
            with closing(self._produce()) as items:
                for item in items:
                    if self._cancelled.is_set():
                        break
                    self._hand_over(item)
        except Exception as exc:
            self._hand_over(_Failed(exc))
        finally:
            try:
                self._on_exit()
            finally:
                self._hand_over(_END)

    def _hand_over(self, item: T | _Failed | _End) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (the server stopped)
            self._cancelled.set()


class EventStreamResponse(Response):
    """``text/event-stream`` from ``events`` (encoded events), tied to ``stream``: the
    stream is cancelled when the client disconnects or the response ends early."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], stream: ThreadedStream[T]) -> None:
        # no Response.__init__: it would set a body and a Content-Length of 0
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._cancel = stream.cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the server could not send: the client has gone
            log.info("completion_stream_client_gone")
        finally:
            watcher.cancel()
            self._cancel()
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.info("completion_stream_client_disconnected")
                self._cancel()
                return


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying ``data`` (a JSON document without newlines)."""
    return b"data: " + data + b"\n\n"
