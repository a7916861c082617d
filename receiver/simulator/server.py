"""The simulator's HTTPS server: TLS in each connection's own thread, one request per connection.

Real HTTPS with a certificate made at run time (PROXMOX.md facts, proxmoxer 2.x: the
scheme is always https); clients verify it with the CA bundle written to a file.
``endpoint.HttpsEndpoint`` starts and stops it.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import ssl
import tempfile
import threading
import time
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import trustme

from .api import Reply

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
CONNECTION_TIMEOUT_S = 30.0
MAX_DISCARDED_BODY = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    """Turns one HTTP/1.0 request into a call of ``ProxmoxSimulator._handle``.

    HTTP/1.0 (one request per connection) keeps faults honest: a "refused" simulator
    cannot keep answering over a kept-alive connection, and no socket outlives a test.
    A simulator made with ``keep_alive=True`` speaks HTTP/1.1 and keeps connections, as
    pveproxy does: benchmarks use it, so a TLS handshake per request is not what they measure.
    """

    server: TLSServer
    protocol_version = "HTTP/1.0"
    server_version = "pve-api-daemon/3.0"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        if self.server.sim.keep_alive:
            self.protocol_version = "HTTP/1.1"
            # The answer's header and body are two writes: without this, the client's delayed
            # ACK holds the body back 40 ms on a kept-alive connection.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self):
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _serve(self) -> None:
        self._discard_body()
        reply = self.server.sim._handle(self.command, self.path, self.headers.get("Authorization"))
        if reply is None:  # fault "reset": close without answering
            self.close_connection = True
            return
        self._write(reply)

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= MAX_DISCARDED_BODY:
            self.rfile.read(length)

    def _write(self, reply: Reply) -> None:
        payload = reply.payload()
        self.send_response(reply.status, reply.reason)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "max-age=0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        # The request line never holds the token; headers are not logged.
        logger.debug("%s - " + format, self.client_address[0], *args)  # noqa: G003 - http.server's format, still lazy


class TLSServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose TLS handshake happens in the connection's own thread.

    The listening socket stays plain TCP, so "refuse" can close it and listen again, and
    a slow or broken client cannot stall ``accept()`` for everyone else.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, sim, context: ssl.SSLContext):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sim = sim
        self.ssl_context = context
        self._active: dict = {}
        self._active_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self):
        # Skip HTTPServer.server_bind's getfqdn(): a reverse DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        host, self.server_port = self.server_address[:2]
        self.server_name = str(host)

    def finish_request(self, request, client_address):
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            logger.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        me = threading.current_thread()
        with self._active_lock:
            self._active[me] = tls
        try:
            super().finish_request(tls, client_address)  # the handler, on the TLS socket
        finally:
            with self._active_lock:
                self._active.pop(me, None)
            tls.close()

    def handle_error(self, request, client_address):
        # socketserver calls this from inside its `except` block, so the exception is there to log.
        logger.debug("connection from %s ended with an error", client_address[0], exc_info=True)  # noqa: LOG014 - called inside socketserver's except

    def abort_connections(self) -> None:
        """Cut every open connection (at TCP level, under TLS) so its thread ends now."""
        with self._active_lock:
            sockets = list(self._active.values())
        for sock in sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._active_lock:
            threads = list(self._active)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def make_tls(host: str, owner) -> tuple:
    """A throwaway CA and server certificate: (server context, CA file path, finalizer that
    removes the file; it also runs at interpreter exit if nobody calls it)."""
    ca = trustme.CA(organization_name="pve-janitor simulator")
    identities = ["127.0.0.1", "localhost", "::1"]
    if host not in identities and host not in ("", "0.0.0.0", "::"):
        identities.append(host)
    cert = ca.issue_cert(*identities)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    fd, path = tempfile.mkstemp(prefix="pve-janitor-sim-ca-", suffix=".pem")
    os.close(fd)
    ca.cert_pem.write_to_path(path)
    return context, path, weakref.finalize(owner, _unlink_quietly, path)


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (a wildcard address becomes the loopback one)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return "[%s]" % host if ":" in host else host
