"""Logging setup, with secrets scrubbed from every record as a last line of defence.

The code never logs a secret on purpose; this filter makes sure an exception
text that happens to quote one (a URL, a header) does not leak it either.
Records go to stderr (the journal) as text, or one JSON object per line
(``CLEANUP_LOG_FORMAT=json``) for a log shipper.  :class:`Throttle` keeps a
line that a stranger can provoke (a rejected event) from flooding the log.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

REDACTED = "[redacted]"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecretFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        scrubbed, exc_text = message, record.exc_text or ""
        for secret in self._secrets:
            scrubbed = scrubbed.replace(secret, REDACTED)
            exc_text = exc_text.replace(secret, REDACTED)
        record.msg, record.args = scrubbed, None
        if record.exc_text:
            record.exc_text = exc_text
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    and ``exception`` when the record carries one (already scrubbed by :class:`SecretFilter`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: int = logging.INFO, secrets: Iterable[str] = (), log_format: str = "text") -> None:
    """One handler on the root logger, to stderr, in ``log_format`` (``text`` or ``json``)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "proxmoxer", "waitress", "apscheduler", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class Throttle:
    """At most one line per key (a source address and a reason, say) per ``period`` seconds.

    :meth:`allow` answers ``None`` for a line to drop, or the number of lines dropped for that
    key since the last one logged, so the next line can say how many there were.  At most
    ``max_keys`` keys are remembered (the oldest is forgotten first): a stranger who sends from
    many addresses costs bounded memory, and at worst a few more lines.
    """

    def __init__(self, period: float = 60.0, max_keys: int = 1024, clock: Callable[[], float] = time.monotonic):
        self._period = period
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[Hashable, list[float]] = OrderedDict()  # key -> [logged at, dropped since]

    def allow(self, key: Hashable) -> int | None:
        now = self._clock()
        with self._lock:
            seen = self._keys.get(key)
            if seen is not None and now - seen[0] < self._period:
                seen[1] += 1
                return None
            dropped = int(seen[1]) if seen is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
            return dropped

    def __len__(self) -> int:
        return len(self._keys)
