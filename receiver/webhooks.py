"""Delivering the outbox: each URL's events, signed, in order, at least once, whatever happens.

The events are rows of ``janitor_outbox``, written in the transaction of the change they
report (:mod:`receiver.outbox`).  This module sends them to ``CLEANUP_WEBHOOK_URLS``:

- **From the database, not from memory.**  What is not marked delivered in the outbox is
  sent (again): a crash, a restart, a fail-over or a target down for an hour loses nothing,
  and an event written by another process (``pve-janitor restore``, another receiver) is
  delivered like one written here.
- **One thread per URL.**  A target that is down, or slow to answer (each POST may wait
  ``CLEANUP_WEBHOOK_TIMEOUT_SECONDS``), holds back its own events only; the other targets
  go on.  A handful of URLs is the expected case.
- **Only on the lease holder** (``leader()``, the receiver that sweeps and watches): one
  receiver delivers at a time; another one takes over with the lease, from where the
  database says delivery stopped.  Leadership is asked before every event, so a lost lease
  stops delivery within one POST.
- **In order per target**: by outbox id (the order the changes were written in), then the
  index in the row, from its ``delivered`` count.  An event is sent only after the one
  before it was accepted (2xx): a ``row.restored`` never arrives before its ``row.removed``.
  Changes made at the same moment by different transactions are ordered by the ids the
  database gave their rows.
- **At least once.**  Progress (``delivered``, then ``done_at`` when a row is complete) is
  written every :data:`PERSIST_EVERY` events and at the end of each row, so a crash sends
  at most that many again (a 10,000-event removal costs 200 progress writes, not 10,000).
  Every event has its own ``id``, sent as ``Idempotency-Key`` too: receivers dedupe by it.
- **Retried forever, with backoff.**  Any failure (no connection, timeout, TLS, an answer
  other than 2xx, a redirect: a signed event goes to the URL configured or nowhere) ends
  the target's round; the head row gets ``attempts + 1`` and a short ``last_error``; the
  next try waits 1, 2, 4 … s, at most 300 s, each up to a quarter shorter at random (targets
  that failed together do not retry in step).  Nothing is dropped: after an outage the
  backlog goes out within one backoff step of the target's return.  Rows of a URL removed
  from the configuration are pruned after 7 days (:func:`receiver.outbox.prune`).
- **Polling.**  Idle, each thread asks for its head row every :data:`POLL_SECONDS` (one
  indexed query), so an event leaves within about half a second of its commit, whichever
  process wrote it, with no signal between the writer and this thread.
- **Signed like the hookscript's events**: ``X-Janitor-Timestamp`` and
  ``X-Janitor-Signature: sha256=<HMAC-SHA256 of "<timestamp>.<body>">`` with
  ``CLEANUP_WEBHOOK_SECRET`` (:func:`receiver.events.signature`); CloudEvents structured
  mode, one event per POST.
- **Nothing secret in what it says.**  A URL may carry a token in its query or user info:
  logs, ``last_error`` and metrics show it as :func:`receiver.config.redact_webhook_url`
  does, and error texts are composed here (``HTTP 500``, ``timeout after 10 s``,
  ``TLS: certificate verify failed``), never requests' own messages, which quote the URL.
- **A database error** (the database restarting) is logged and retried after a backoff of at
  most :data:`DB_BACKOFF_MAX_SECONDS`; the thread stays alive.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
import requests
from sqlalchemy.exc import SQLAlchemyError

from . import __version__, outbox, store
from .config import Settings
from .db import describe_db_error, write_transaction
from .events import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from .timeutil import utcnow

if TYPE_CHECKING:  # types only: no import at run time
    from sqlalchemy.engine import Engine

    from .metrics import Metrics

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # idle: how often each target's thread looks for new events
BACKOFF_MIN_SECONDS, BACKOFF_MAX_SECONDS = 1.0, 300.0
DB_BACKOFF_MAX_SECONDS = 30.0  # a database back up is noticed within this
PERSIST_EVERY = 50  # events sent between two progress writes (at most this many sent twice after a crash)
MAX_ANSWER_BYTES = 64 * 1024  # of a target's answer, read and dropped (the status is what counts)
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = f"pve-janitor/{__version__}"
ERROR_TEXT_MAX = 500


def backoff_seconds(failures: int, low: float, high: float, rand: Callable[[], float] = random.random) -> float:
    """How long to wait after ``failures`` failures in a row: ``low``, doubled each time, at
    most ``high``, and up to a quarter less at random."""
    base = min(high, low * 2 ** min(max(failures, 1) - 1, 30))
    return base * (1 - 0.25 * rand())


# --- what went wrong, in a few words that never quote the URL ---------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps (requests wraps urllib3, which wraps the socket's error)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        found = stack.pop()
        if id(found) in seen:
            continue
        seen.add(id(found))
        yield found
        inner = [found.__cause__, found.__context__, getattr(found, "reason", None), *found.args]
        stack.extend(e for e in inner if isinstance(e, BaseException))


def failure_text(exc: BaseException, timeout: float) -> str:
    """A POST that raised, in words for ``last_error`` and the log."""
    causes = list(_causes(exc))
    if isinstance(exc, requests.exceptions.SSLError) or any(isinstance(e, ssl.SSLError) for e in causes):
        return "TLS: " + _tls_reason(causes)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"timeout after {timeout:g} s (connecting)"
    if isinstance(exc, requests.exceptions.Timeout) or any(
        isinstance(e, (TimeoutError, socket.timeout)) or type(e).__name__ == "ReadTimeoutError" for e in causes
    ):
        return f"timeout after {timeout:g} s"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection failed: " + _connection_reason(causes)
    return f"request failed ({type(exc).__name__})"


def _tls_reason(causes: list[BaseException]) -> str:
    for e in causes:
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = getattr(e, "verify_message", "") or ""
            return "certificate verify failed" + (f" ({detail})" if detail else "")
    for e in causes:
        if isinstance(e, ssl.SSLError) and getattr(e, "reason", None):
            return str(e.reason).lower().replace("_", " ")
    return "handshake failed"


def _connection_reason(causes: list[BaseException]) -> str:
    for e in causes:
        if isinstance(e, ConnectionRefusedError):
            return "refused"
        if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
            return "name not resolved"
        if isinstance(e, ConnectionResetError):
            return "reset by the target"
        if type(e).__name__ in ("RemoteDisconnected", "ProtocolError"):
            return "closed by the target without an answer"
    for e in causes:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    return "no connection"


# --- one target ---------------------------------------------------------------------------


@dataclass
class Target:
    """One configured URL and what this process knows of its delivery."""

    url: str  # never shown: it may carry a token
    id: str  # outbox.target_id(url)
    label: str  # the URL as shown
    failures: int = 0  # in a row, for the backoff
    last_error: str | None = None
    last_delivery: datetime | None = None
    delivered: int = 0  # by this process
    wait: float = 0.0  # before the next try, after a failure
    thread: threading.Thread | None = None

    def status(self) -> dict[str, Any]:
        return {
            "url": self.label,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_delivery": self.last_delivery.isoformat() if self.last_delivery else None,
            "delivered": self.delivered,
            "alive": bool(self.thread and self.thread.is_alive()),
        }


class Deliverer:
    """The outbox's delivery threads, one per URL in ``settings.webhook_urls``.

    ``leader()`` says whether this receiver holds the lease (serve: ``lambda: watcher.leader``).
    ``poll_seconds`` and the backoff bounds are parameters so tests run fast; ``session`` makes
    each target's HTTP session.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        leader: Callable[[], bool] = lambda: True,
        poll_seconds: float = POLL_SECONDS,
        backoff_min: float = BACKOFF_MIN_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
        db_backoff_max: float = DB_BACKOFF_MAX_SECONDS,
        clock: Callable[[], datetime] = utcnow,
        session: Callable[[], requests.Session] = requests.Session,
    ):
        self._engine = engine
        self._secret = settings.webhook_secret
        self._timeout = settings.webhook_timeout
        self._verify = settings.webhook_verify_ssl
        self._metrics = metrics
        self._leader = leader
        self._poll = poll_seconds
        self._backoff = (backoff_min, backoff_max)
        self._db_backoff_max = db_backoff_max
        self._clock = clock
        self._session = session
        self._stop = threading.Event()
        labels = outbox.target_labels(settings.webhook_urls)
        ids = [outbox.target_id(url) for url in settings.webhook_urls]
        self.targets = [Target(url, t, labels[t]) for url, t in zip(settings.webhook_urls, ids, strict=True)]
        if metrics is not None:
            metrics.webhook_targets(list(labels.values()))

    # --- threads ---------------------------------------------------------------------

    def start(self) -> Deliverer:
        for n, target in enumerate(self.targets):
            name = f"pve-janitor-webhook-{n}"
            target.thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
            target.thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every thread: a POST in flight finishes (or times out) and its progress is written."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for target in self.targets:
            if target.thread is not None:
                target.thread.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        return bool(self.targets) and all(t.thread is not None and t.thread.is_alive() for t in self.targets)

    def status(self) -> list[dict[str, Any]]:
        return [t.status() for t in self.targets]

    def _run(self, target: Target) -> None:
        session = self._session()
        session.headers["User-Agent"] = USER_AGENT
        db_failures = 0
        try:
            while not self._stop.is_set():
                if not self._leader():
                    self._stop.wait(self._poll)
                    continue
                try:
                    caught_up = self.deliver(target, session)
                    db_failures = 0
                except SQLAlchemyError as exc:
                    db_failures += 1
                    wait = backoff_seconds(db_failures, self._backoff[0], min(self._backoff[1], self._db_backoff_max))
                    logger.warning(
                        "webhook %s: database error %s; trying again in %.1f s",
                        target.label,
                        describe_db_error(exc),
                        wait,
                    )
                    self._stop.wait(wait)
                    continue
                except Exception:  # the thread must survive anything; the log says what
                    logger.exception("webhook %s: delivery failed unexpectedly", target.label)
                    target.failures += 1
                    target.wait = backoff_seconds(target.failures, *self._backoff)
                    caught_up = False
                self._stop.wait(self._poll if caught_up else target.wait)
        finally:
            session.close()

    # --- one round -------------------------------------------------------------------

    def deliver(self, target: Target, session: requests.Session) -> bool:
        """Send the target's events, in order, until none is left (True) or one fails (False);
        stops early, with its progress written, when told to stop or the lease is lost."""
        while not self._stop.is_set() and self._leader():
            with self._engine.connect() as conn:
                head = outbox.head(conn, target.id)
            if head is None:
                return True
            if not self._deliver_row(target, session, head):
                return False
        return True

    def _deliver_row(self, target: Target, session: requests.Session, head: outbox.Head) -> bool:
        sent = saved = head.delivered
        retried = head.attempts > 0
        while sent < head.count:
            if self._stop.is_set() or not self._leader():
                if sent > saved:
                    self._progress(head.id, sent)
                return True
            error = self._send(target, session, head.events[sent])
            if error is not None:
                self._failed(target, head, sent, saved, error)
                return False
            sent += 1
            if sent < head.count and (sent - saved >= PERSIST_EVERY or retried):
                self._progress(head.id, sent)  # after a retry at once: attempts back to 0
                saved, retried = sent, False
        self._progress(head.id, head.count, done=True)
        return True

    def _send(self, target: Target, session: requests.Session, event: dict[str, Any]) -> str | None:
        """One POST; None when the target accepted it, else what went wrong."""
        body = msgspec.json.encode(event)
        stamp = int(time.time())
        headers = {
            "Content-Type": CONTENT_TYPE,
            TIMESTAMP_HEADER: str(stamp),
            SIGNATURE_HEADER: signature(self._secret, stamp, body),
            IDEMPOTENCY_HEADER: str(event.get("id", "")),
        }
        try:
            with session.post(
                target.url,
                data=body,
                headers=headers,
                timeout=(self._timeout, self._timeout),
                verify=self._verify,
                allow_redirects=False,
                stream=True,
            ) as answer:
                status = answer.status_code
                _read_some(answer)
        except Exception as exc:  # noqa: BLE001 - the HTTP boundary: any failure is a failed try, told without the URL
            error = failure_text(exc, self._timeout)
        else:
            if 200 <= status < 300:
                target.failures = 0
                target.last_error = None
                target.last_delivery = self._clock()
                target.delivered += 1
                if self._metrics is not None:
                    self._metrics.webhook_delivered(target.label, target.last_delivery.timestamp())
                return None
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        if self._metrics is not None:
            self._metrics.webhook_failed(target.label)
        return error

    # --- progress in the outbox ------------------------------------------------------

    def _progress(self, row_id: int, delivered: int, *, done: bool = False) -> None:
        o = store.outbox
        values: dict[str, Any] = {"delivered": delivered, "attempts": 0}
        if done:
            values["done_at"] = self._clock()
        with write_transaction(self._engine) as conn:
            conn.execute(o.update().where(o.c.id == row_id, o.c.delivered <= delivered).values(**values))

    def _failed(self, target: Target, head: outbox.Head, index: int, saved: int, error: str) -> None:
        """The head row's ``attempts`` (failed tries of the event at ``delivered``) and ``last_error``."""
        target.failures += 1
        target.last_error = error
        target.wait = backoff_seconds(target.failures, *self._backoff)
        logger.warning(
            "webhook %s: event %s not delivered (%s); %s failure(s) in a row, next try in %.1f s",
            target.label,
            head.events[index].get("id"),
            error,
            target.failures,
            target.wait,
        )
        o = store.outbox
        values: dict[str, Any] = {"last_error": error[:ERROR_TEXT_MAX], "last_error_at": self._clock()}
        if index > saved:  # events delivered since the last write: the failing one is a new head event
            values.update(delivered=index, attempts=1)
        else:
            values["attempts"] = o.c.attempts + 1
        with write_transaction(self._engine) as conn:
            conn.execute(o.update().where(o.c.id == head.id).values(**values))


def _read_some(answer: requests.Response) -> None:
    """Read (and drop) the start of the answer, so the connection can serve the next POST; a
    target that sends more, or stalls, only costs its connection (the status is what counts)."""
    got = 0
    try:
        for chunk in answer.iter_content(8192):
            got += len(chunk)
            if got >= MAX_ANSWER_BYTES:
                break
    except Exception:  # the status arrived; the rest of the answer does not matter
        logger.debug("webhook answer not read to its end", exc_info=True)
