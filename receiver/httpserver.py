"""The HTTP server under the app: waitress, with every answer JSON and slow clients harmless.

Waitress answers some requests itself, before the app sees them: a body over the limit (413),
headers over the limit (431), a malformed request line or header (400), a transfer coding it
does not implement (501), an app that failed before answering (500).  Here those answers have
the app's shape and words (:data:`receiver.web.ERROR_CODES`), as ``application/json``.

Slow clients: waitress reads requests on its one I/O thread and hands only whole requests to
the HTTP threads, so a client that trickles a request holds no thread, only a connection (and
its buffered bytes, at most the header limit).  Two rules bound what such connections can do:

- **a deadline for a whole request**: a request whose last byte has not arrived
  ``REQUEST_DEADLINE_S`` after its first is answered 408 and its connection closed.  Waitress's
  own timeout counts idleness, which a client sending a byte now and then never shows;
- **room for new connections**: at the connection limit waitress stops accepting, and a few
  hundred such clients would keep everyone else waiting in the listen queue.  Here, at the
  limit, each new connection closes the connection that has waited longest without a request
  being served (a partial request, or an idle keep-alive).  A node's event arrives whole within
  milliseconds, so the one closed is a slow one, whatever their number.

A connection whose request is being served is never closed by either rule.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, cast

from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask
from waitress.utilities import Error

from .events import MAX_BODY_BYTES
from .web import ERROR_CODES

logger = logging.getLogger(__name__)

HTTP_THREADS = 32  # allocations that arrive together are served as a group: up to this many at once
CONNECTION_LIMIT = 500  # a node's boot burst: one short connection per guest and phase
IDLE_TIMEOUT_S = 30  # a connection without a request in progress is closed after this
REQUEST_DEADLINE_S = 10  # a request must arrive whole within this, from its first byte
HEADER_LIMIT_BYTES = 16384  # request line and headers; the hookscript sends about 300 bytes
CHECK_INTERVAL_S = 1  # how often the deadline and the idle timeout are checked

_MESSAGES = {
    408: f"the request did not arrive whole within {REQUEST_DEADLINE_S} s",
    413: f"body larger than {MAX_BODY_BYTES} bytes",
    431: f"request line and headers larger than {HEADER_LIMIT_BYTES} bytes",
    500: "internal error; the receiver's log has the details",
}


class RequestTimeout(Error):
    code = 408
    reason = "Request Timeout"


def error_body(status: int, message: str) -> bytes:
    """The app's error shape, ``{"error": <word>, "message": <text>}``, as bytes."""
    return json.dumps({"error": ERROR_CODES.get(status, "error"), "message": message}).encode()


class JsonErrorTask(ErrorTask):
    """An answer waitress gives itself, as JSON: the status and the word of the app, our message.

    Waitress's own text for a 400 or 501 says what was wrong (``Malformed header line``); the
    other messages are ours, the same as the app's where it has one (413, 500).
    """

    def execute(self) -> None:
        error: Error = cast(Any, self.request).error  # the stubs type the request as its error
        message = _MESSAGES.get(error.code) or f"{error.reason}: {error.body}"
        body = error_body(error.code, message)
        self.status = f"{error.code} {error.reason}"
        self.response_headers = [*self.response_headers, ("Content-Type", "application/json")]
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Channel(HTTPChannel):
    """One client connection; knows since when its request in progress has been arriving."""

    error_task_class = JsonErrorTask
    request_started = 0.0  # time.time() of the first byte of the request in progress
    requests_lock: threading.Lock  # waitress's, missing in the stubs
    requests: list[Any]

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self.request_started = time.time()
        return super().received(data)

    def waiting_since(self) -> float:
        """Since when this connection has waited: for the rest of its request, or idle, for one."""
        return self.request_started if self.request is not None else self.last_activity

    def serving(self) -> bool:
        return bool(self.requests)

    def time_out(self) -> bool:
        """Answer the request in progress 408 (through the HTTP threads, as any answer) and close."""
        with self.requests_lock:
            request = self.request
            if request is None or self.requests or self.will_close or self.close_when_flushed:
                return False
            request.error = RequestTimeout(_MESSAGES[408])
            request.completed = True
            self.request = None
            self.requests.append(request)
            self.server.add_task(cast(Any, self))  # waitress's tasks are its channels
            return True

    def evict(self) -> bool:
        """Close now, to make room; False if a request started being served meanwhile."""
        with self.requests_lock:
            if self.requests:
                return False
            self.handle_close()
            return True


class Server(TcpWSGIServer):
    """Waitress's TCP server with the two rules of this module; ``run()`` and ``close()`` as waitress's."""

    channel_class = Channel
    effective_port: int  # waitress's, missing in the stubs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.evicted = 0  # connections closed to make room, since start
        self.timed_out = 0  # requests answered 408, since start

    def channels(self) -> list[Channel]:
        """The open client connections (the stubs type waitress's map of them as one channel)."""
        return list(cast("dict[int, Channel]", self.active_channels).values())

    def maintenance(self, now: float) -> None:
        """Waitress's idle timeout, then the deadline for a whole request."""
        super().maintenance(now)  # type: ignore[arg-type]  # the stubs say int; waitress passes time.time()
        cutoff = now - REQUEST_DEADLINE_S
        for channel in self.channels():
            if channel.request is not None and channel.request_started < cutoff and channel.time_out():
                self.timed_out += 1

    def readable(self) -> bool:
        """Whether to accept: below the limit, or at it when a waiting connection can make room."""
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = int(now) + self.adj.cleanup_interval
            self.maintenance(now)
        if not self.accepting:
            return False
        channels = self.channels()
        full = len(channels) >= self.adj.connection_limit
        if full != self.in_connection_overflow:
            self.in_connection_overflow = full
            if full:
                logger.warning(
                    "connection limit (%s) reached: each new connection closes the one waiting longest", len(channels)
                )
            else:
                logger.info("open connections below the limit again (%s closed to make room so far)", self.evicted)
        return not full or _longest_waiting(channels) is not None

    def handle_accept(self) -> None:
        channels = self.channels()
        if len(channels) >= self.adj.connection_limit:
            waiting = _longest_waiting(channels)
            if waiting is None or not waiting.evict():
                return  # its request started being served meanwhile: the new one waits in the listen queue
            self.evicted += 1
        super().handle_accept()


def _longest_waiting(channels: list[Channel]) -> Channel | None:
    waiting = [c for c in channels if not c.serving()]
    return min(waiting, key=Channel.waiting_since) if waiting else None


def make_server(app, host: str, port: int) -> Server:
    """The server for ``app`` on ``host:port``, bound and listening; ``run()`` serves until SIGTERM."""
    return Server(
        app,
        host=host,
        port=port,
        threads=HTTP_THREADS,
        ident="pve-janitor",
        # Refuse big bodies before buffering them (waitress's default is 1 GiB, spooled to /tmp):
        # no route takes more than an event.
        max_request_body_size=MAX_BODY_BYTES + 1,
        max_request_header_size=HEADER_LIMIT_BYTES,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=IDLE_TIMEOUT_S,
        cleanup_interval=CHECK_INTERVAL_S,
        # poll(), not select(): no limit of 1024 on file descriptor numbers.
        asyncore_use_poll=True,
    )
