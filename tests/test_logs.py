"""Logging setup and the secret scrubber (receiver/logs.py)."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import sys

import pytest

from receiver.logs import REDACTED, SecretFilter, Throttle, setup_logging


def record(msg: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("receiver.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_a_secret_in_the_message_or_its_arguments_is_scrubbed():
    r = record("connecting to %s with %s", "postgresql://u:pa55word@db/x", "token=tok-abcdef")
    assert SecretFilter(["pa55word", "tok-abcdef"]).filter(r) is True  # scrubbed, never dropped
    assert r.getMessage() == f"connecting to postgresql://u:{REDACTED}@db/x with token={REDACTED}"


def test_a_secret_in_an_exception_text_is_scrubbed():
    try:
        raise RuntimeError("bad header Authorization: PVEAPIToken=root@pam!j=sekrit-value")
    except RuntimeError:
        r = record("request failed", exc_info=sys.exc_info())
    SecretFilter(["sekrit-value"]).filter(r)
    text = logging.Formatter().format(r)
    assert "sekrit-value" not in text
    assert f"PVEAPIToken=root@pam!j={REDACTED}" in text


def test_the_longest_secret_is_scrubbed_first():
    r = record("value abcd1234")
    SecretFilter(["abcd", "abcd1234"]).filter(r)
    assert r.getMessage() == f"value {REDACTED}"


@pytest.mark.parametrize("secrets", [[], [""], ["abc"], [None]])
def test_empty_or_short_secrets_are_not_scrubbed(secrets):
    r = record("abc and abcdef %s", 1)
    SecretFilter(secrets).filter(r)
    assert r.getMessage() == "abc and abcdef 1"


def test_setup_logging_scrubs_every_record_and_quiets_noisy_libraries(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("urllib3", "apscheduler")})
    try:
        setup_logging(logging.DEBUG, secrets=["hunter22"])
        logging.getLogger("receiver.x").info("password is %s", "hunter22")
        assert logging.getLogger("urllib3").level == logging.WARNING
        assert logging.getLogger("apscheduler").level == logging.WARNING
        assert len(root.handlers) == 1
        setup_logging(logging.INFO, secrets=["hunter22"])
        assert len(root.handlers) == 1  # set up twice: still one handler
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    out = stream.getvalue()
    assert f"receiver.x: password is {REDACTED}" in out
    assert "hunter22" not in out


def _with_root_handler_restored(fn):
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        return fn()
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_json_format_is_one_object_per_line_with_the_secret_scrubbed(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)

    def log_two_lines():
        setup_logging(logging.INFO, secrets=["hunter22"], log_format="json")
        logging.getLogger("receiver.x").warning("password is %s\nsecond line", "hunter22")
        try:
            raise RuntimeError("connect failed: hunter22")
        except RuntimeError:
            logging.getLogger("receiver.y").exception("sweep failed")

    _with_root_handler_restored(log_two_lines)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the newline in the message stays inside its JSON string
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"]) == ("WARNING", "receiver.x")
    assert first["message"] == f"password is {REDACTED}\nsecond line"
    moment = dt.datetime.fromisoformat(first["time"])
    assert moment.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - moment).total_seconds()) < 60
    assert (second["level"], second["message"]) == ("ERROR", "sweep failed")
    assert "RuntimeError: connect failed: " + REDACTED in second["exception"]
    assert "hunter22" not in stream.getvalue()


def test_json_format_carries_the_exception_without_secrets_configured(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)

    def log_one():
        setup_logging(logging.INFO, log_format="json")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("receiver.z").exception("failed")

    _with_root_handler_restored(log_one)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "failed" and "ValueError: boom" in entry["exception"]


def test_text_stays_the_default_and_an_unknown_format_is_refused(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)

    def log_text():
        setup_logging(logging.INFO)
        logging.getLogger("receiver.t").info("plain")

    _with_root_handler_restored(log_text)
    assert stream.getvalue().rstrip().endswith("INFO receiver.t: plain")
    with pytest.raises(ValueError, match="text, json"):
        setup_logging(logging.INFO, log_format="xml")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_lets_one_line_per_key_and_period_and_counts_the_rest():
    clock = FakeClock()
    throttle = Throttle(period=60, clock=clock)
    assert throttle.allow(("10.0.0.5", "signature")) == 0
    assert throttle.allow(("10.0.0.5", "signature")) is None
    assert throttle.allow(("10.0.0.5", "timestamp")) == 0  # another reason: its own line
    assert throttle.allow(("10.0.0.6", "signature")) == 0  # another address: its own line
    clock.now += 59.9
    assert throttle.allow(("10.0.0.5", "signature")) is None
    clock.now += 0.1
    assert throttle.allow(("10.0.0.5", "signature")) == 2  # the two left out since the last line
    assert throttle.allow(("10.0.0.5", "signature")) is None
    clock.now += 60
    assert throttle.allow(("10.0.0.5", "signature")) == 1


def test_throttle_remembers_a_bounded_number_of_keys():
    clock = FakeClock()
    throttle = Throttle(period=60, max_keys=3, clock=clock)
    for n in range(10):
        assert throttle.allow(f"10.0.0.{n}") == 0
    assert len(throttle) == 3
    assert throttle.allow("10.0.0.9") is None  # the newest are kept
    assert throttle.allow("10.0.0.0") == 0  # the oldest was forgotten: a line again
