"""Every answer is JSON, whatever produces it: the app, or the HTTP server before the app.

Raw bytes on a socket to the real ``pve-janitor serve`` process (one for the module), so the
server's own answers (size limits, malformed requests, transfer codings) are seen as a client
sees them: status line, ``Content-Type`` and body.  Each status here is documented in
docs/openapi.yaml for every operation.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import _sqlite_database, janitor_env, running_apps

from receiver.events import MAX_BODY_BYTES
from receiver.httpserver import HEADER_LIMIT_BYTES, REQUEST_DEADLINE_S
from receiver.simulator import ProxmoxSimulator, launch
from receiver.web import ERROR_CODES

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
EVENTS = "/api/v1/events"


@pytest.fixture(scope="module")
def port(tmp_path_factory) -> Any:
    tmp = tmp_path_factory.mktemp("answers")
    with ProxmoxSimulator(nodes=("pve1", "pve2")).start() as sim, contextmanager(_sqlite_database)(tmp) as db:
        running_apps(sim, db)
        port = launch.free_port()
        env = janitor_env(sim, db, CLEANUP_HOOK_SECRET=secrets.token_hex(16), CLEANUP_BIND=f"127.0.0.1:{port}")
        with launch.serving(env, tmp / "receiver.log") as launched:
            yield port
            log = launched.log_text()
    assert "Traceback" not in log


def exchange(port: int, raw: bytes, method: str = "GET") -> http.client.HTTPResponse:
    """Send ``raw`` as it is and read one answer (its body in ``.data``)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before all was sent (a body over the limit): read the answer
        answer = http.client.HTTPResponse(sock, method=method)
        answer.begin()
        answer.data = answer.read()  # type: ignore[attr-defined]
        return answer
    finally:
        sock.close()


def request(head: str, *headers: str, body: bytes = b"") -> bytes:
    return "\r\n".join([head, "Host: receiver", *headers, "", ""]).encode("latin-1") + body


CHUNKED = "Transfer-Encoding: chunked"
# (what, raw request, status, error word)
SERVER_ANSWERS = [
    ("body over the limit, by Content-Length", request(f"POST {EVENTS} HTTP/1.1", "Content-Length: 200000000"), 413),
    (
        "body one byte over the limit",
        request(f"POST {EVENTS} HTTP/1.1", f"Content-Length: {MAX_BODY_BYTES + 1}", body=b"{" * (MAX_BODY_BYTES + 1)),
        413,
    ),
    (
        "chunked body over the limit",
        request(f"POST {EVENTS} HTTP/1.1", CHUNKED, body=b"%x\r\n" % 70000 + b"{" * 70000 + b"\r\n0\r\n\r\n"),
        413,
    ),
    ("body over the limit on a GET route", request("GET /healthz HTTP/1.1", "Content-Length: 100000"), 413),
    ("malformed request line", b"GARBAGE\r\n\r\n", 400),
    ("method with a character not allowed", request("GE(T /healthz HTTP/1.1"), 400),
    ("NUL in a header value", request("GET /healthz HTTP/1.1", "X-Test: a\x00b"), 400),
    ("header line without a colon", request("GET /healthz HTTP/1.1", "no colon here"), 400),
    ("space before a header's colon", request("GET /healthz HTTP/1.1", "X-Test : a"), 400),
    ("bare CR inside a header value", request("GET /healthz HTTP/1.1", "X-Test: a\rb"), 400),
    ("Content-Length not a number", request(f"POST {EVENTS} HTTP/1.1", "Content-Length: abc"), 400),
    ("a byte that is not UTF-8 in the path", request("GET /\xff HTTP/1.1"), 400),
    ("chunk size not hex", request(f"POST {EVENTS} HTTP/1.1", CHUNKED, body=b"zz\r\n{}\r\n0\r\n\r\n"), 400),
    ("one header over the header limit", request("GET /healthz HTTP/1.1", "X-Big: " + "a" * HEADER_LIMIT_BYTES), 431),
    (
        "many headers over the header limit",
        request("GET /healthz HTTP/1.1", *(f"X-Many-{i}: {'b' * 20}" for i in range(HEADER_LIMIT_BYTES // 20))),
        431,
    ),
    ("transfer coding not implemented", request(f"POST {EVENTS} HTTP/1.1", "Transfer-Encoding: gzip"), 501),
]
APP_ANSWERS = [
    ("unknown path", request("GET /nope HTTP/1.1"), 404),
    ("unknown path, HTTP/1.0 without Host", b"GET /nope HTTP/1.0\r\n\r\n", 404),
    ("unknown method on a known path", request("BREW /healthz HTTP/1.1"), 405),
    ("unknown method on an unknown path", request("BREW /nope HTTP/1.1"), 404),
    ("wrong method", request("DELETE /healthz HTTP/1.1"), 405),
    ("wrong method on the events route", request(f"GET {EVENTS} HTTP/1.1"), 405),
    ("percent-escape that is not one", request("GET /%zz HTTP/1.1"), 404),
    ("unsigned event", request(f"POST {EVENTS} HTTP/1.1", "Content-Length: 2", body=b"{}"), 401),
    (
        "unsigned event, chunked and with a Content-Length (the chunks count)",
        request(f"POST {EVENTS} HTTP/1.1", "Content-Length: 3", CHUNKED, body=b"3\r\n{}{\r\n0\r\n\r\n"),
        401,
    ),
]


def assert_json_error(answer: http.client.HTTPResponse, status: int) -> dict:
    assert answer.status == status, (answer.status, answer.data)  # type: ignore[attr-defined]
    assert answer.getheader("Content-Type") == "application/json"
    body = json.loads(answer.data)  # type: ignore[attr-defined]
    assert set(body) == {"error", "message"}, body
    assert body["error"] == ERROR_CODES[status]
    assert isinstance(body["message"], str) and body["message"], body
    return body


@pytest.mark.parametrize(
    ("raw", "status"), [c[1:] for c in SERVER_ANSWERS + APP_ANSWERS], ids=[c[0] for c in SERVER_ANSWERS + APP_ANSWERS]
)
def test_every_error_is_json_with_its_word(port, raw, status):
    answer = exchange(port, raw)
    assert_json_error(answer, status)
    if status == 405:
        assert answer.getheader("Allow")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz\r\nHost: receiver\r\n\r\n",  # no version: waitress takes it as HTTP/1.0
        request("GET http://receiver/healthz HTTP/1.1"),  # absolute form
    ],
    ids=["request line without a version", "absolute URI"],
)
def test_odd_but_valid_requests_are_answered_as_json(port, raw):
    answer = exchange(port, raw)
    assert answer.status == 200 and answer.getheader("Content-Type") == "application/json"
    assert json.loads(answer.data)["status"] == "ok"  # type: ignore[attr-defined]


def test_a_body_over_the_limit_has_the_apps_message(port):
    body = assert_json_error(exchange(port, SERVER_ANSWERS[0][1]), 413)
    assert body["message"] == f"body larger than {MAX_BODY_BYTES} bytes"


def test_options_is_200_with_the_methods_as_json(port):
    answer = exchange(port, request("OPTIONS /healthz HTTP/1.1"))
    assert answer.status == 200 and answer.getheader("Content-Type") == "application/json"
    assert json.loads(answer.data) == {"methods": ["GET", "HEAD", "OPTIONS"]}  # type: ignore[attr-defined]
    assert set(answer.getheader("Allow", "").replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}


def test_options_on_an_unknown_path_is_a_json_404(port):
    assert_json_error(exchange(port, request("OPTIONS /nope HTTP/1.1")), 404)


def test_head_answers_carry_the_json_content_type_and_no_body(port):
    answer = exchange(port, request("HEAD /nope HTTP/1.1"), method="HEAD")
    assert answer.status == 404 and answer.getheader("Content-Type") == "application/json"
    assert answer.data == b""  # type: ignore[attr-defined]
    answer = exchange(port, request("HEAD /healthz HTTP/1.1"), method="HEAD")
    assert answer.status == 200 and answer.getheader("Content-Type") == "application/json"


@pytest.mark.slow
def test_a_request_that_does_not_arrive_whole_in_time_is_a_json_408(port):
    """A trickled request gets 408 at the deadline although it never stops sending (not idle)."""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_DEADLINE_S + 5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: receiver\r\n")
        sock.settimeout(1)
        answer = b""
        while time.monotonic() - started < REQUEST_DEADLINE_S + 5:
            try:
                sock.sendall(b"X-Trickle: 1\r\n")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        took = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 408 "), answer  # the request line is not parsed: HTTP/1.0
    assert b"\r\nContent-Type: application/json\r\n" in head + b"\r\n"
    assert json.loads(body) == {
        "error": "request_timeout",
        "message": f"the request did not arrive whole within {REQUEST_DEADLINE_S} s",
    }
    assert REQUEST_DEADLINE_S <= took < REQUEST_DEADLINE_S + 2.5


def test_openapi_documents_the_servers_answers_on_every_operation():
    spec = yaml.safe_load(SPEC.read_text())
    server_statuses = {str(status) for _, _, status in SERVER_ANSWERS} | {"405", "408", "500"}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            missing = server_statuses - set(operation["responses"])
            assert not missing, f"{method.upper()} {path} does not document {sorted(missing)}"
    for status in server_statuses:
        assert ERROR_CODES[int(status)] in spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
