"""One HTTP session per PVE_HOST endpoint, and what its failures mean.

The session comes from proxmoxer's https backend through its public interface
(``Backend.get_session()``, ``get_base_url()``, ``get_serializer()``): its auth object puts
the API token header, the TLS verify setting (PVE_VERIFY_SSL) and the timeout on every
request.  JSON calls go through :class:`proxmoxer.ProxmoxResource` (the class
``ProxmoxAPI`` is, handed the same three things), so proxmoxer's parsing and errors stay
as they are; the guest list, the one answer that grows with the cluster, is read as raw
bytes over the same session for :func:`receiver.answers.parse_guests`.  Not
``ProxmoxAPI`` itself, because it builds its session inside and keeps it private: owning
it gives one connection pool per endpoint for every call, a ``close()`` through requests'
public API, and a response hook that counts the bytes read.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar
from urllib.parse import urlsplit

import requests
from proxmoxer.backends.https import Backend
from proxmoxer.core import ProxmoxResource, ResourceException

from .model import InventoryError

if TYPE_CHECKING:
    from .config import Settings

T = TypeVar("T")


def path_kind(url: str) -> str:
    """The API path of ``url``, node names and VMIDs left out: ``/nodes/{node}/tasks``."""
    path = urlsplit(url).path
    _, found, rest = path.partition("/api2/json")
    parts = (rest if found else path).split("/")
    if len(parts) > 2 and parts[1] == "nodes":
        parts[2] = "{node}"
    return "/".join("{vmid}" if part.isdigit() else part for part in parts) or "/"


class Reply(NamedTuple):
    """An answer as it came: status code, reason phrase (where Proxmox puts its error message), body."""

    status: int
    reason: str
    body: bytes


class ByteCount:
    """Bytes of answers read from Proxmox (bodies as decoded), in total and by API path kind.

    Shared by an inventory's endpoints and updated from any thread that reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: Counter[str] = Counter()

    def add(self, path: str, size: int) -> None:
        with self._lock:
            self._by_path[path] += size

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._by_path.values())

    def by_path(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_path)

    def hook(self, response: requests.Response, *, stream: bool = False, **_: object) -> None:
        """A requests response hook counting every body read whole (a streamed one is counted
        by whoever reads it).  Not a method of the endpoint: the session would then hold its
        owner in a cycle, and its sockets would stay open until the garbage collector ran."""
        if not stream:
            self.add(path_kind(response.url), len(response.content))


class PveEndpoint:
    """One entry of PVE_HOST: its session, kept open between calls, and the calls made over it."""

    def __init__(self, settings: Settings, host: str, port: int, counter: ByteCount):
        backend = Backend(
            host,
            port=port,
            user=settings.pve_user,
            token_name=settings.pve_token_name,
            token_value=settings.pve_token_value,
            verify_ssl=settings.pve_verify_ssl,
            timeout=settings.pve_timeout,
            service="PVE",
        )
        self.name = f"{host}:{port}"
        self._timeout = settings.pve_timeout
        self._counter = counter
        self._base_url = backend.get_base_url()
        self.session = backend.get_session()
        self.session.hooks["response"].append(counter.hook)
        self.api = ProxmoxResource(base_url=self._base_url, session=self.session, serializer=backend.get_serializer())

    def close(self) -> None:
        """Close the connections kept open to this endpoint (a later call would open a new one)."""
        self.session.close()

    def get(self, path: str, /, **params: object) -> object:
        """``GET path`` (``/cluster/status``, ...): the answer's ``data``, or InventoryError."""
        return self.call(path, lambda: self.api(path.lstrip("/")).get(**params))

    def guest_list(self) -> bytes:
        """``GET /cluster/resources?type=vm`` as the raw bytes of the answer, or InventoryError."""
        return self.call("/cluster/resources", self._read_guest_list)

    def _read_guest_list(self) -> bytes:
        with self.session.request(
            "GET", f"{self._base_url}/cluster/resources", params={"type": "vm"}, stream=True
        ) as response:
            if response.status_code >= 400:
                self._counter.add("/cluster/resources", len(response.content))
                raise ResourceException(response.status_code, response.reason or "", response.text[:200])
            # In 1 MB reads, not requests' 10 kB ones; requests still turns a broken or
            # timed-out body into its own exceptions.
            body = b"".join(response.iter_content(1 << 20))
        self._counter.add("/cluster/resources", len(body))
        return body

    def fetch(self, path: str) -> Reply:
        """``GET path`` as it came, whatever its status: for the watcher's probes, whose every
        answer means something (:mod:`receiver.probe`).  Only a failure to get an answer at all
        (timeout, connection, TLS) raises InventoryError."""

        def request() -> Reply:
            response = self.session.get(f"{self._base_url}{path}")
            return Reply(response.status_code, response.reason or "", response.content)

        return self.call(path, request)

    def call(self, what: str, request: Callable[[], T]) -> T:
        """``request()``, any failure of it as :class:`InventoryError`: ``kind`` says what went
        wrong (auth, privilege, http, timeout, tls, unreachable, malformed), ``what`` where."""
        try:
            return request()
        except ResourceException as exc:
            if exc.status_code == 401:
                raise InventoryError("auth", f"{what}: HTTP 401, the API token was refused") from None
            if exc.status_code == 403:
                raise InventoryError("privilege", f"{what}: HTTP 403, the token lacks a privilege") from None
            raise InventoryError("http", f"{what}: HTTP {exc.status_code} {exc.status_message}") from None
        except requests.exceptions.Timeout:
            raise InventoryError("timeout", f"{what}: no answer within {self._timeout:g} s") from None
        except requests.exceptions.SSLError:
            raise InventoryError("tls", f"{what}: TLS verification failed (see PVE_VERIFY_SSL)") from None
        except requests.exceptions.ConnectionError:
            raise InventoryError("unreachable", f"{what}: cannot connect to {self.name}") from None
        except requests.exceptions.RequestException as exc:
            raise InventoryError("http", f"{what}: {type(exc).__name__}") from None
        except OSError as exc:  # e.g. the PVE_VERIFY_SSL bundle was removed after start
            raise InventoryError("tls", f"{what}: {type(exc).__name__}: {exc.strerror or exc}") from None
        except ValueError:
            raise InventoryError("malformed", f"{what}: the answer is not JSON") from None
        except KeyError:  # proxmoxer: a JSON answer without "data"
            raise InventoryError("malformed", f"{what}: the answer has no 'data'") from None
