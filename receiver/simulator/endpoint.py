"""The simulator's HTTPS endpoint: start/stop, faults, request counts, and one request's answer.

Token auth, and a wrong token's 401 after a delay (PROXMOX.md facts, API).  Faults
(refused connections, HTTP 500/401, slow answers, reset connections, answers without
``data``) let the tests drive the product's fail-closed paths.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import threading
import weakref
from collections import Counter
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from .api import API_PREFIX, ApiError, Reply, error_reply
from .params import MESSAGE as PARAMETER_MESSAGE
from .params import ParameterError
from .server import TLSServer, make_tls, url_host

if TYPE_CHECKING:
    from .access import AccessControl

logger = logging.getLogger(__name__)

FAULT_KINDS = (None, "refuse", "http500", "http401", "slow", "reset", "nodata")
STOP_JOIN_TIMEOUT_S = 3.0


class HttpsEndpoint:
    """The serving half of ``ProxmoxSimulator``: start/stop, faults, counts, ``_handle``.

    Needs ``access`` (the privilege model), ``auth_fail_delay``, ``_request`` (a
    ``threading.local`` for the caller) and ``_route`` (``ApiRoutes``).
    """

    if TYPE_CHECKING:  # what it uses of ``Cluster``, ``ApiRoutes`` and ``ProxmoxSimulator``
        nodes: tuple[str, ...]
        access: AccessControl
        auth_fail_delay: float
        _lock: threading.RLock
        _request: threading.local

        def _route(self, path: str, query: dict) -> object: ...

    def _init_serving(self) -> None:
        self.keep_alive = False  # True: HTTP/1.1 with kept-alive connections, as pveproxy (server._Handler)
        self._fault: tuple = (None, 0.0)
        self._fault_path: str | None = None
        self._counts: Counter = Counter()
        self._count_lock = threading.Lock()
        self._closing = threading.Event()
        self._life_lock = threading.Lock()  # start/stop/listen transitions
        self._host: str | None = None
        self._port: int | None = None
        self._context: ssl.SSLContext | None = None
        self._ca_path: str | None = None
        self._ca_cleanup: weakref.finalize | None = None
        self._server: TLSServer | None = None
        self._thread: threading.Thread | None = None
        self._servers: list = []

    # ------------------------------------------------------------------ life cycle

    def start(self, host: str = "127.0.0.1", port: int = 0):
        """Serve HTTPS on host:port (0 = any free port) in a daemon thread; returns self."""
        with self._life_lock:
            if self._host is not None:
                raise RuntimeError("simulator already started")
            self._closing.clear()
            self._context, self._ca_path, self._ca_cleanup = make_tls(host, self)
            self._host = host
            self._listen(port)
            if self._fault[0] == "refuse":
                self._unlisten()
        logger.info("Proxmox simulator listening on %s (nodes: %s)", self.url, ", ".join(self.nodes))
        return self

    def stop(self) -> None:
        """Stop serving, end open connections, remove the CA file. Safe to call twice."""
        with self._life_lock:
            if self._host is None:
                return
            self._closing.set()
            if self._server is not None:
                self._unlisten()
            for server in self._servers:
                server.abort_connections()
                server.wait_idle(STOP_JOIN_TIMEOUT_S)
            self._servers.clear()
            if self._ca_cleanup is not None:
                self._ca_cleanup()
            self._host = None
        logger.info("Proxmox simulator stopped")

    def __enter__(self):
        if self._host is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _listen(self, port: int) -> None:
        if self._context is None:
            raise RuntimeError("simulator not started")
        server = TLSServer((self._host, port), self, self._context)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="pve-simulator-%d" % self._port,
            daemon=True,
        )
        self._server, self._thread = server, thread
        self._servers.append(server)
        thread.start()

    def _unlisten(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return  # not listening
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        thread.join()

    # ------------------------------------------------------------------ connection facts

    @property
    def url(self) -> str:
        return "https://%s%s" % (self.pve_host, API_PREFIX)

    @property
    def pve_host(self) -> str:
        if self._host is None or self._port is None:
            raise RuntimeError("simulator not started")
        return "%s:%d" % (url_host(self._host), self._port)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("simulator not started")
        return self._port

    @property
    def ca_path(self) -> str:
        if self._ca_path is None:
            raise RuntimeError("simulator not started")
        return self._ca_path

    # ------------------------------------------------------------------ faults and counts

    def set_fault(self, kind: str | None, delay: float = 0.0, path: str | None = None) -> None:
        """Make the API misbehave; ``None`` heals (and listens again on the same port).
        ``nodata``: answer 200 with a JSON body without ``data`` (on ``path`` alone, if given)."""
        if kind not in FAULT_KINDS:
            raise ValueError("fault must be one of %s" % (FAULT_KINDS,))
        with self._life_lock:
            self._fault = (kind, max(0.0, float(delay)))
            self._fault_path = path
            if self._host is not None and kind == "refuse" and self._server is not None:
                self._unlisten()
            elif self._host is not None and self._port is not None and kind != "refuse" and self._server is None:
                self._listen(self._port)
        logger.info("simulator fault set to %s", kind)

    def request_count(self, path_prefix: str = "") -> int:
        """API requests received (answered or faulted) whose path after /api2/json starts
        with ``path_prefix``."""
        with self._count_lock:
            return sum(n for path, n in self._counts.items() if path.startswith(path_prefix))

    def reset_counts(self) -> None:
        with self._count_lock:
            self._counts.clear()

    # ------------------------------------------------------------------ one request

    def _handle(self, method: str, target: str, authorization: str | None) -> Reply | None:
        """Answer one request; None means "close without answering" (fault reset)."""
        parts = urlsplit(target)
        path = parts.path
        api_path = None
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            api_path = path[len(API_PREFIX) :].rstrip("/") or "/"
            with self._count_lock:
                self._counts[api_path] += 1
        kind, delay = self._fault
        if kind == "reset":
            return None
        if kind == "slow":
            self._closing.wait(delay)
        if api_path is None:
            return error_reply(404, "Not found: %s" % path)
        if kind == "http500":
            return error_reply(500, "simulated internal server error")
        if kind == "nodata" and (self._fault_path is None or api_path == self._fault_path):
            return Reply(200, {"errors": None})  # 200, JSON, but no "data"
        caller = None if kind == "http401" else self._caller_of(authorization)
        if caller is None:
            # A wrong token gets 401 after a deliberate delay (3 s in PVE).
            self._closing.wait(self.auth_fail_delay)
            return error_reply(401, "authentication failure")
        if method != "GET":
            return error_reply(501, "Method '%s %s%s' not implemented" % (method, API_PREFIX, api_path))
        self._request.caller = caller
        try:
            return Reply(200, {"data": self._route(api_path, parse_qs(parts.query))})
        except ApiError as exc:
            return error_reply(exc.status, exc.message, exc.errors)
        except ParameterError as exc:
            return error_reply(400, PARAMETER_MESSAGE, exc.errors)
        finally:
            self._request.caller = None

    def _caller_of(self, authorization: str | None) -> str | None:
        """The API token a request authenticates as, or None.

        ``Authorization: PVEAPIToken=<user>@<realm>!<tokenid>=<secret>``; the token must exist
        in the privilege model, with that secret.
        """
        prefix = "PVEAPIToken="
        if not authorization or not authorization.startswith(prefix):
            return None
        token_id, sep, secret = authorization[len(prefix) :].partition("=")
        with self._lock:
            expected = self.access.token_secret(token_id) if sep else None
        if expected is None:
            return None
        return token_id if hmac.compare_digest(secret.encode(), expected.encode()) else None
