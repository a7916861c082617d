"""pve-janitor's own tables, kept in the platform database under ``janitor_``.

Keeping them beside the platform table is what makes "audit in the same
transaction as the deletion" possible, and lets counters, the event inbox and
the sweep lease survive restarts and be shared by several receivers.

These definitions describe the newest schema, the one the code reads and writes.  They
never create anything: the tables are made and changed by the migrations in
``receiver/migrations`` (``receiver/schema.py`` runs them), and a change here goes with a
new migration there.

Timestamps are stored as naive UTC (portable across SQLite, PostgreSQL and
MariaDB) and come back timezone-aware.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from .timeutil import isoformat, parse_timestamp, utcnow


class UTCDateTime(sa.types.TypeDecorator):
    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        return parse_timestamp(value)


metadata = sa.MetaData()

audit = sa.Table(
    "janitor_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String(128), nullable=False),
    sa.Column("row_key", sa.String(255), nullable=False),
    sa.Column("vmid", sa.BigInteger),
    sa.Column("hostname", sa.String(255)),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("row_json", sa.Text, nullable=False),
    sa.Column("removed_at", UTCDateTime, nullable=False),
    sa.Column("restored_at", UTCDateTime),
    sa.Index("ix_janitor_audit_removed_at", "removed_at"),
)

counters = sa.Table(
    "janitor_counters",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False, server_default="0"),
)

runs = sa.Table(
    "janitor_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("planned", sa.Integer, nullable=False),
    sa.Column("applied", sa.Integer, nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
)

errors = sa.Table(
    "janitor_errors",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
)

inbox = sa.Table(
    "janitor_inbox",
    metadata,
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("vmid", sa.BigInteger, nullable=False),
    sa.Column("phase", sa.String(16), nullable=False),
    sa.Column("node", sa.String(64), nullable=False),
    sa.Column("ts", sa.Double, nullable=False),  # not FLOAT: MariaDB's 4-byte float rounds to ~128 s
    sa.Column("received_at", UTCDateTime, nullable=False),
    sa.Column("processed_at", UTCDateTime),
    sa.Index("ix_janitor_inbox_processed_at", "processed_at"),
)

watch = sa.Table(
    "janitor_watch",
    metadata,
    sa.Column("vmid", sa.BigInteger, primary_key=True),
    sa.Column("since", UTCDateTime, nullable=False),
    sa.Column("until", UTCDateTime, nullable=False),
    sa.Column("hint", sa.String(16), nullable=False),  # stop event or destroy task
)

stop_marks = sa.Table(
    "janitor_stop_marks",
    metadata,
    sa.Column("table_name", sa.String(128), primary_key=True),
    sa.Column("row_key", sa.String(255), primary_key=True),
    sa.Column("vmid", sa.BigInteger, nullable=False),
    sa.Column("marked_at", UTCDateTime, nullable=False),
)

lease = sa.Table(
    "janitor_lease",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)

holds = sa.Table(
    "janitor_holds",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String(128), nullable=False),
    sa.Column("vmid", sa.BigInteger),  # a hold names a VMID or a row key, never both
    sa.Column("row_key", sa.String(255)),
    sa.Column("until", UTCDateTime),  # NULL: until released
    sa.Column("reason", sa.Text),
    sa.Column("source", sa.String(16), nullable=False),  # cli, http, restore
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_janitor_holds_table_name", "table_name"),
    sqlite_autoincrement=True,  # ids are handed to users: never reused after a delete
)

pending = sa.Table(
    "janitor_pending",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending, approved, rejected, expired, superseded
    sa.Column("refusal", sa.String(16), nullable=False),  # the rule that kept it: guard, would_empty
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # what planned it: sweep, manual, watcher
    sa.Column("row_count", sa.Integer, nullable=False),
    sa.Column("table_rows", sa.Integer, nullable=False),  # the table's size when planned
    sa.Column("fingerprint", sa.String(64), nullable=False),  # the reviewed rows and values, hashed
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("decided_at", UTCDateTime),
    sa.Column("decided_by", sa.String(16)),  # cli, http
    sa.Column("note", sa.Text),  # a rejection's reason, an approval's result
    sa.Column("superseded_by", sa.Integer),
    sa.Index("ix_janitor_pending_state", "state"),
    sqlite_autoincrement=True,  # ids are handed to users: never reused after a delete
)

pending_rows = sa.Table(
    "janitor_pending_rows",
    metadata,
    sa.Column("plan_id", sa.Integer, primary_key=True),
    sa.Column("row_key", sa.String(255), primary_key=True),
    sa.Column("vmid", sa.BigInteger),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("observed", sa.Text, nullable=False),  # the row's mapped values as planned (JSON)
)

# Up to OUTBOX_CHUNK CloudEvents per row: a 100,000-row sweep is 200 inserts, not 100,000, and a
# row stays far below MariaDB's default max_allowed_packet (16 MiB).
outbox = sa.Table(
    "janitor_outbox",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("target", sa.String(16), nullable=False),  # which CLEANUP_WEBHOOK_URLS entry (a hash of it)
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("events", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"), nullable=False),
    sa.Column("event_count", sa.Integer, nullable=False),
    sa.Column("delivered", sa.Integer, nullable=False, server_default="0"),  # events delivered, in order
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),  # failed tries of the next event
    sa.Column("last_error", sa.Text),
    sa.Column("last_error_at", UTCDateTime),
    sa.Column("done_at", UTCDateTime),
    sa.Index("ix_janitor_outbox_target_done", "target", "done_at", "id"),
)

# The allocator's reservations: one row per reservation, one per value it holds.  The values'
# primary key is the UNIQUE constraint that keeps two allocations (one receiver or several)
# from handing out the same VMID, hostname or port.
reservations = sa.Table(
    "janitor_reservations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String(128), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # cli, http
    sa.Column("label", sa.Text),  # what the caller said it is for
    sa.Index("ix_janitor_reservations_expires_at", "expires_at"),
    sqlite_autoincrement=True,  # ids are handed to users: never reused after a delete
)

reserved_values = sa.Table(
    "janitor_reserved_values",
    metadata,
    sa.Column("table_name", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(64), primary_key=True),  # vmid, hostname, or a port column
    sa.Column("value", sa.String(255), primary_key=True),
    sa.Column("reservation_id", sa.Integer, nullable=False),
    sa.Index("ix_janitor_reserved_values_reservation_id", "reservation_id"),
)

# Hook coverage: what each guest's config says of its hookscript, cached by the config's digest.
coverage = sa.Table(
    "janitor_coverage",
    metadata,
    sa.Column("vmid", sa.BigInteger, primary_key=True),
    sa.Column("node", sa.String(64), nullable=False),
    sa.Column("type", sa.String(8), nullable=False),  # lxc, qemu
    sa.Column("digest", sa.String(64)),
    sa.Column("hookscript", sa.String(255)),  # as the config names it (None: no hookscript)
    sa.Column("has_hook", sa.Boolean, nullable=False),  # the hookscript is pve-janitor's
    sa.Column("checked_at", UTCDateTime, nullable=False),
)

COUNTERS = ("ghost_apps_removed", "old_errors_removed", "ports_freed", "total_removed", "rows_marked", "rows_restored")
KEEP_ERRORS = 50
KEEP_RUNS = 500


def insert_audit(conn: Connection, entries: list[dict[str, Any]]) -> None:
    """Write audit copies in the caller's transaction (the one that removes the rows).

    On PostgreSQL through psycopg 3 they go by ``COPY``, a fraction of an executemany's
    cost, whose pipeline spends Python time on each entry (docs/performance.md).  The
    values pass the columns' own bind processors first (``removed_at`` becomes naive UTC),
    as an INSERT through SQLAlchemy would.  Elsewhere: an executemany.
    """
    if not entries:
        return
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        conn.execute(audit.insert(), entries)
        return
    import psycopg  # only here: the PostgreSQL driver is an optional dependency
    from psycopg import sql

    names = list(entries[0])
    processors = [audit.c[name].type.bind_processor(conn.dialect) or _as_is for name in names]
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(audit.name), sql.SQL(", ").join(sql.Identifier(name) for name in names)
    )
    raw = cast("psycopg.Connection[Any]", conn.connection.dbapi_connection)  # the dialect checked above
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for entry in entries:
                copy.write_row([process(entry[name]) for name, process in zip(names, processors, strict=True)])
    except psycopg.Error as exc:  # as SQLAlchemy would raise it: callers handle SQLAlchemyError
        raise sa.exc.DBAPIError(f"COPY {audit.name}", None, exc) from None


def _as_is(value: Any) -> Any:
    return value


def add_counters(conn: Connection, deltas: dict[str, int]) -> None:
    params = [{"n": name, "d": delta} for name, delta in deltas.items() if delta]
    if params:
        conn.execute(
            counters.update()
            .where(counters.c.name == sa.bindparam("n"))
            .values(value=counters.c.value + sa.bindparam("d")),
            params,
        )


def read_counters(conn: Connection) -> dict[str, int]:
    values = {n: 0 for n in COUNTERS}
    values.update({r.name: int(r.value) for r in conn.execute(sa.select(counters))})
    return values


def record_error(engine: Engine, source: str, message: str, also: Callable[[Connection], object] | None = None) -> None:
    """Keep the error (the newest :data:`KEEP_ERRORS`); ``also`` writes more in the same
    transaction (the refusal's webhook event)."""
    with engine.begin() as conn:
        conn.execute(errors.insert().values(at=utcnow(), source=source, message=message[:2000]))
        if also is not None:
            also(conn)
        oldest_kept = conn.execute(
            sa.select(errors.c.id).order_by(errors.c.id.desc()).offset(KEEP_ERRORS).limit(1)
        ).scalar()
        if oldest_kept is not None:
            conn.execute(errors.delete().where(errors.c.id <= oldest_kept))


def recent_errors(conn: Connection, limit: int = 10) -> list[dict[str, Any]]:
    rows = conn.execute(sa.select(errors).order_by(errors.c.id.desc()).limit(limit)).mappings()
    return [{"at": isoformat(r["at"]), "source": r["source"], "message": r["message"]} for r in rows]


def record_run(engine: Engine, also: Callable[[Connection], object] | None = None, **values: Any) -> None:
    """Keep the run (the newest :data:`KEEP_RUNS`); ``also`` writes more in the same transaction."""
    with engine.begin() as conn:
        conn.execute(runs.insert().values(**values))
        if also is not None:
            also(conn)
        oldest_kept = conn.execute(sa.select(runs.c.id).order_by(runs.c.id.desc()).offset(KEEP_RUNS).limit(1)).scalar()
        if oldest_kept is not None:
            conn.execute(runs.delete().where(runs.c.id <= oldest_kept))


def last_run(conn: Connection, source: str | None = None) -> dict[str, Any] | None:
    stmt = sa.select(runs).order_by(runs.c.id.desc()).limit(1)
    if source:
        stmt = stmt.where(runs.c.source == source)
    row = conn.execute(stmt).mappings().first()
    if row is None:
        return None
    out = dict(row)
    out["started_at"] = isoformat(out["started_at"])
    out["finished_at"] = isoformat(out["finished_at"])
    return out


def last_success_time(conn: Connection) -> dt.datetime | None:
    return conn.execute(
        sa.select(sa.func.max(runs.c.finished_at)).where(runs.c.outcome.in_(("done", "nothing")))
    ).scalar()


# Row values <-> JSON, losslessly, for the audit copy.


def encode_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dt.datetime):
        return {"$t": "datetime", "v": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$t": "date", "v": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$t": "time", "v": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"$t": "decimal", "v": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$t": "bytes", "v": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, uuid.UUID):
        return {"$t": "uuid", "v": str(value)}
    if isinstance(value, (dict, list)):
        return {"$t": "json", "v": value}
    if isinstance(value, (set, frozenset)):  # MariaDB SET columns: written back as 'a,b'
        return {"$t": "str", "v": ",".join(sorted(str(v) for v in value))}
    return {"$t": "str", "v": str(value)}


def decode_value(value: Any) -> Any:
    if not isinstance(value, dict) or "$t" not in value:
        return value
    kind, raw = value["$t"], value["v"]
    return {
        "datetime": dt.datetime.fromisoformat,
        "date": dt.date.fromisoformat,
        "time": dt.time.fromisoformat,
        "decimal": decimal.Decimal,
        "bytes": base64.b64decode,
        "uuid": uuid.UUID,
    }.get(kind, lambda v: v)(raw)


_PLAIN_TYPES = frozenset({type(None), bool, int, float, str})
_ROW_ENCODER = json.JSONEncoder(sort_keys=True)  # made once: json.dumps(..., sort_keys=True) makes one a call


def encode_row(row: dict[str, Any]) -> str:
    return _ROW_ENCODER.encode({k: v if type(v) in _PLAIN_TYPES else encode_value(v) for k, v in row.items()})


def decode_row(text: str) -> dict[str, Any]:
    return {k: decode_value(v) for k, v in json.loads(text).items()}
