"""Hookscript events: the signature check and the body's validation, without Flask.

An event is only a hint (DESIGN.md, principle 1): a forged one could at worst
make the receiver look at a guest.  The signature still keeps strangers from
filling the inbox, and the timestamp window bounds how long a captured
request can be replayed (the ``event_id`` makes a replay inside the window a
no-op).  Every failure is an :class:`EventRejected` carrying the HTTP status;
no message ever quotes the secret or the signature we expected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Sequence
from typing import Any

from .model import PHASES, Event

MAX_BODY_BYTES = 64 * 1024
MAX_SKEW_SECONDS = 300
TIMESTAMP_HEADER = "X-Janitor-Timestamp"
SIGNATURE_HEADER = "X-Janitor-Signature"
SIGNATURE_PREFIX = "sha256="
MIN_VMID, MAX_VMID = 100, 999_999_999
MAX_EVENT_ID, MAX_NODE = 128, 64
# Far beyond any real clock, small enough for every float and datetime conversion.
MAX_TS = 1e11

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_VISIBLE = re.compile(r"[\x21-\x7e]+")


class EventRejected(Exception):
    """The request is not an acceptable event; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """The header value a sender puts in ``X-Janitor-Signature`` (also used by tests and docs)."""
    mac = hmac.new(_key(secret), f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def _key(secret: str) -> bytes:
    # surrogateescape gives back the exact bytes of a secret that came from the environment.
    return secret.encode("utf-8", "surrogateescape")


def verify_signature(
    secret: str | Sequence[str], timestamp_header: str | None, signature_header: str | None, body: bytes, now: float
) -> None:
    """Raise EventRejected(401) unless the body is signed with ``secret`` within the time window.

    ``secret`` may be several: the current one first, then the previous one during a rotation
    (``CLEANUP_HOOK_SECRET_PREVIOUS``), so that nodes still on the old secret lose no event.
    Each is compared in constant time, all of them every time: which one matched, or whether
    any did, shows in no timing.
    """
    current, *others = [secret] if isinstance(secret, str) else list(secret) or [""]
    if not current:  # a previous secret alone is no configuration
        raise EventRejected(503, "hook secret not configured")
    secrets = [current, *(s for s in others if s)]
    if not timestamp_header:
        raise EventRejected(401, f"missing {TIMESTAMP_HEADER} header")
    if not signature_header:
        raise EventRejected(401, f"missing {SIGNATURE_HEADER} header")
    if not _TIMESTAMP.fullmatch(timestamp_header):
        raise EventRejected(401, f"{TIMESTAMP_HEADER} must be unix seconds (digits only)")
    match = _SIGNATURE.fullmatch(signature_header)
    if match is None:
        raise EventRejected(401, f"{SIGNATURE_HEADER} must be sha256=<64 hex digits>")
    given = SIGNATURE_PREFIX + match.group(1).lower()
    matches = [hmac.compare_digest(signature(s, timestamp_header, body), given) for s in secrets]
    if not any(matches):
        raise EventRejected(401, "bad signature")
    # Written so that a NaN clock rejects rather than accepts.
    if not abs(now - int(timestamp_header)) <= MAX_SKEW_SECONDS:
        raise EventRejected(401, "stale or future timestamp")


def parse_event(body: bytes, now: float | None = None) -> Event:
    """The event in a request body, or EventRejected(400) naming the field that is wrong.

    Keys other than the five known ones are ignored, so a newer hookscript can
    add some without breaking an older receiver.
    """
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise EventRejected(400, "body must be UTF-8 JSON") from None
    except (ValueError, RecursionError):
        raise EventRejected(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise EventRejected(400, "body must be a JSON object")
    return Event(
        event_id=_text(data, "event_id", MAX_EVENT_ID, _PRINTABLE, "printable ASCII"),
        vmid=_vmid(data),
        phase=_phase(data),
        node=_text(data, "node", MAX_NODE, _VISIBLE, "printable ASCII without spaces"),
        ts=_ts(data, time.time() if now is None else now),
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _text(data: dict, name: str, max_len: int, allowed: re.Pattern, what: str) -> str:
    if name not in data:
        raise EventRejected(400, f"{name} is missing")
    value = data[name]
    if not isinstance(value, str) or not value:
        raise EventRejected(400, f"{name} must be a non-empty string")
    if len(value) > max_len:
        raise EventRejected(400, f"{name} must be at most {max_len} characters")
    if not allowed.fullmatch(value):
        raise EventRejected(400, f"{name} must be {what}")
    return value


def _vmid(data: dict) -> int:
    if "vmid" not in data:
        raise EventRejected(400, "vmid is missing")
    value = data["vmid"]
    if not isinstance(value, int) or isinstance(value, bool):
        raise EventRejected(400, "vmid must be an integer")
    if not MIN_VMID <= value <= MAX_VMID:
        raise EventRejected(400, f"vmid must be between {MIN_VMID} and {MAX_VMID}")
    return value


def _phase(data: dict) -> str:
    if "phase" not in data:
        raise EventRejected(400, "phase is missing")
    value = data["phase"]
    if not isinstance(value, str) or value not in PHASES:
        raise EventRejected(400, f"phase must be one of {', '.join(sorted(PHASES))}")
    return value


def _ts(data: dict, now: float) -> float:
    if data.get("ts") is None:
        return float(now)
    value = data["ts"]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise EventRejected(400, "ts must be a number (unix seconds)")
    if not (0 <= value <= MAX_TS) or (isinstance(value, float) and not math.isfinite(value)):
        raise EventRejected(400, "ts must be unix seconds between 0 and 1e11")
    return float(value)
