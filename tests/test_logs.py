"""Logging setup and the secret scrubber (receiver/logs.py)."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from receiver.logs import REDACTED, SecretFilter, setup_logging


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
