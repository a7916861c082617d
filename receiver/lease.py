"""The sweep lease: with several receivers on one database, exactly one watches and sweeps.

A row in ``janitor_lease`` names its holder and an expiry.  The holder renews
it every watcher tick; when it dies, the row expires and the next receiver to
try takes it over, within the TTL.  Receivers' clocks are compared, so keep
them in NTP sync (the TTL is seconds; skew should be far below it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from . import store
from .db import write_transaction
from .timeutil import utcnow

logger = logging.getLogger(__name__)

NAME = "sweeper"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"  # unknown: never judge another holder dead


def _holder_is_dead(holder: str) -> bool:
    """True when the holder was a process in this host's PID namespace that no longer runs.

    Lets a receiver restarted after a crash (systemd ``Restart=on-failure``)
    go on at once instead of waiting out its predecessor's lease.  Holders
    are ``host:pid:pid-namespace:random``; two containers sharing a host name
    (``--network host``) have different PID namespaces and never judge each other.
    """
    parts = holder.split(":")
    if len(parts) != 4:
        return False
    host, pid_text, namespace, _ = parts
    if (
        host != socket.gethostname()
        or namespace != _pid_namespace()
        or namespace == "0"
        or not pid_text.isdigit()
        or int(pid_text) == os.getpid()
    ):
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    def __init__(self, engine: Engine, ttl_seconds: float, holder: str | None = None, name: str = NAME):
        """``name`` is the row: the sweep lease by default; ``receiver.schema`` takes another to migrate."""
        self.engine = engine
        self.name = name
        self.ttl = timedelta(seconds=ttl_seconds)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{_pid_namespace()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self._renewed = float("-inf")  # monotonic time of the last successful take or renewal
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Take or renew the lease; True while this process holds it.

        The watcher and the scheduler both call this; a lock keeps them from
        racing each other for the first insert.
        """
        with self._lock:
            if self.held and time.monotonic() - self._renewed < self.ttl.total_seconds() / 3:
                return True  # renewed recently: no write (and no SQLite write lock) every tick
            started = time.monotonic()
            held = self._acquire()
            if held:
                self._renewed = started
            return held

    def still_held(self) -> bool:
        """Whether the lease is surely still ours (renewed less than a TTL ago), without a query.

        Checked before acting: a tick slowed down by a slow Proxmox may outlast the lease.
        """
        return self.held and time.monotonic() - self._renewed < self.ttl.total_seconds()

    def _acquire(self) -> bool:
        t = store.lease
        now = utcnow()
        try:
            with write_transaction(self.engine) as conn:
                stmt = sa.select(t).where(t.c.name == self.name)
                if conn.dialect.name != "sqlite":
                    stmt = stmt.with_for_update()
                row = conn.execute(stmt).mappings().first()
                if row is None:
                    try:
                        with conn.begin_nested():
                            values = {"name": self.name, "holder": self.holder, "expires_at": now + self.ttl}
                            conn.execute(t.insert().values(**values))
                        held = True
                    except IntegrityError:
                        held = False
                elif row["holder"] == self.holder or row["expires_at"] <= now or _holder_is_dead(row["holder"]):
                    conn.execute(
                        t.update().where(t.c.name == self.name).values(holder=self.holder, expires_at=now + self.ttl)
                    )
                    held = True
                else:
                    held = False
        except SQLAlchemyError as exc:
            logger.warning("lease: database error %s; acting as follower", type(exc).__name__)
            held = False
        if held != self.held:
            logger.info("lease %s by %s", "taken" if held else "lost", self.holder)
        self.held = held
        return held

    def release(self) -> None:
        if not self.held:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    store.lease.delete().where(store.lease.c.name == self.name, store.lease.c.holder == self.holder)
                )
        except SQLAlchemyError:
            logger.warning("lease: could not release; it expires by itself")
        self.held = False

    def current_holder(self) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(store.lease).where(store.lease.c.name == self.name)).mappings().first()
        return row["holder"] if row and row["expires_at"] > utcnow() else None
