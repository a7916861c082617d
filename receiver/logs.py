"""Logging setup, with secrets scrubbed from every record as a last line of defence.

The code never logs a secret on purpose; this filter makes sure an exception
text that happens to quote one (a URL, a header) does not leak it either.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

REDACTED = "[redacted]"


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


def setup_logging(level: int = logging.INFO, secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "proxmoxer", "waitress", "apscheduler", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
