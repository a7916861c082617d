"""The Proxmox hookscript, run as Proxmox runs it: a real subprocess against a real
HTTP receiver that checks the signature exactly as the public contract states.

Fixtures live in this file on purpose: the hookscript is a standalone file with
no package, and nothing here is shared with the receiver's tests.
"""

import hashlib
import hmac
import importlib.machinery
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn

import pytest

HOOK = Path(__file__).resolve().parent.parent / "hookscript" / "pve-janitor-hook"
SECRET = "hook-test-secret-5f3a9c"
NODE = "pve-test"
PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")
# The interpreter the subprocess tests run the hook with: set it to check another
# Python (PVE 7 ships 3.9, PVE 8 3.11, PVE 9 3.13).
PYTHON = os.environ.get("HOOK_TEST_PYTHON", sys.executable)


# --- a receiver that checks what the contract says ---------------------------------


class Receiver(HTTPServer):
    """The test receiver's state, set by serve() and shared by its handlers."""

    secret: str
    force_status: int | None
    seen: set[str]
    events: list[dict]  # accepted events, in arrival order
    log: list[tuple[int, bytes]]  # (status, raw body) of every request
    url: str
    delay: float  # SlowHandler's


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self):
        server = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        timestamp = self.headers.get("X-Janitor-Timestamp", "")
        key = server.secret.encode("utf-8", "surrogateescape")
        expected = "sha256=" + hmac.new(key, f"{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()
        signed = (
            self.path == "/api/v1/events"
            and self.headers.get("Content-Type") == "application/json"
            and timestamp.isdigit()
            and abs(time.time() - int(timestamp)) <= 300
            and hmac.compare_digest(expected, self.headers.get("X-Janitor-Signature", ""))
        )
        if not signed:
            status = 401
        elif server.force_status is not None:
            status = server.force_status
        else:
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            if not isinstance(event, dict) or "event_id" not in event:
                status = 400
            elif event["event_id"] in server.seen:
                status = 200
            else:
                server.seen.add(event["event_id"])
                server.events.append(event)
                status = 202
        server.log.append((status, raw))
        body = json.dumps({"status": status}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(server_class: type[Receiver] = Receiver, handler=Handler):
    server = server_class(("127.0.0.1", 0), handler)
    server.secret = SECRET
    server.force_status = None
    server.seen = set()
    server.events = []
    server.log = []
    server.url = "http://127.0.0.1:%d" % server.server_port
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def receiver():
    yield from serve()


class SlowHandler(Handler):
    """Answers only after server.delay seconds, as an overloaded receiver does."""

    def do_POST(self):
        time.sleep(self.server.delay)
        super().do_POST()

    def handle(self):
        try:
            super().handle()
        except OSError:  # the hook gave up on this answer: fine
            pass


class SlowServer(ThreadingMixIn, Receiver):
    daemon_threads = True  # the receiver serves requests in parallel (waitress' threads)

    def handle_error(self, request, client_address):
        pass


@pytest.fixture
def slow_receiver():
    for server in serve(SlowServer, SlowHandler):
        server.delay = 1.2
        yield server


@pytest.fixture
def refused_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return "http://127.0.0.1:%d" % port


@pytest.fixture
def black_hole_url():
    """A port whose kernel completes the TCP handshake while nobody ever answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield "http://127.0.0.1:%d" % sock.getsockname()[1]
    sock.close()


@pytest.fixture
def drip_url():
    """A server that answers one byte every 50 ms and never finishes its status line."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.05)
    stop = threading.Event()

    def drip():
        conns = []
        while not stop.is_set():
            try:
                conns.append(listener.accept()[0])
            except OSError:
                pass
            for conn in list(conns):
                try:
                    conn.send(b"H")
                except OSError:
                    conns.remove(conn)
                    conn.close()
            time.sleep(0.05)
        for conn in conns:
            conn.close()

    thread = threading.Thread(target=drip)
    thread.start()
    yield "http://127.0.0.1:%d" % listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


@pytest.fixture
def spool_dir(tmp_path):
    return tmp_path / "spool"


@pytest.fixture
def conf_env(tmp_path, spool_dir):
    """Write hook.conf; returns the environment Proxmox would give the hook, plus the conf."""

    def make(url, secret=SECRET, extra=""):
        conf = tmp_path / "hook.conf"
        conf.write_text(f"URL={url}\nSECRET={secret}\nSPOOL_DIR={spool_dir}\n{extra}")
        return {
            "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
            "LC_ALL": "C",
            "PVE_JANITOR_HOOK_CONF": str(conf),
            "PVE_JANITOR_NODE": NODE,
        }

    return make


@pytest.fixture(scope="module")
def hook():
    loader = importlib.machinery.SourceFileLoader("pve_janitor_hook", str(HOOK))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture
def in_process(hook, monkeypatch, spool_dir, capsys):
    """Call main() in this process with the given environment; returns (code, stderr)."""

    def call(argv, env):
        for key in ("PVE_JANITOR_URL", "PVE_JANITOR_SECRET", "PVE_JANITOR_NODE", "PVE_JANITOR_HOOK_CONF"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(hook, "DEFAULT_SPOOL_DIR", str(spool_dir))  # never /var/lib in tests
        code = hook.main(argv)
        err = capsys.readouterr().err
        assert SECRET not in err
        assert "Traceback" not in err
        return code, err

    return call


class TimedRun(subprocess.CompletedProcess):
    """A finished run of the hookscript, and how long it took (``elapsed``, seconds)."""

    def __init__(self, proc: subprocess.CompletedProcess, elapsed: float):
        super().__init__(proc.args, proc.returncode, proc.stdout, proc.stderr)
        self.elapsed = elapsed


def run_hook(env, *args, hook_path=HOOK, timeout=30) -> TimedRun:
    """Run the hookscript as Proxmox does (no shell); check it never leaks the secret."""
    start = time.monotonic()
    proc = subprocess.run(
        [PYTHON, str(hook_path), *args], env=env, cwd="/", capture_output=True, text=True, timeout=timeout
    )
    proc = TimedRun(proc, time.monotonic() - start)
    assert SECRET not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    return proc


def spooled(spool_dir):
    return sorted(p.name for p in spool_dir.glob("*.json")) if spool_dir.exists() else []


def spool_event(spool_dir, name, body):
    spool_dir.mkdir(mode=0o700, exist_ok=True)
    (spool_dir / name).write_bytes(body)


# --- delivery ------------------------------------------------------------------------


def test_event_is_signed_and_carries_the_contract_fields(receiver, conf_env, spool_dir):
    before = time.time()
    proc = run_hook(conf_env(receiver.url), "101", "post-stop")
    after = time.time()

    assert proc.returncode == 0
    assert [status for status, _ in receiver.log] == [202]  # 401 if the signature were wrong
    (event,) = receiver.events
    assert set(event) == {"event_id", "vmid", "phase", "node", "ts"}
    assert uuid.UUID(hex=event["event_id"]).hex == event["event_id"]
    assert event["vmid"] == 101 and isinstance(event["vmid"], int)
    assert event["phase"] == "post-stop"
    assert event["node"] == NODE
    assert before - 1 <= event["ts"] <= after + 1
    assert "101 post-stop sent (202)" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert spooled(spool_dir) == []


@pytest.mark.parametrize("phase", PHASES)
def test_every_phase_is_sent_and_exits_zero(receiver, conf_env, phase):
    proc = run_hook(conf_env(receiver.url), "250", phase)
    assert proc.returncode == 0
    assert [(e["vmid"], e["phase"]) for e in receiver.events] == [(250, phase)]


def test_event_ids_differ_between_runs(receiver, conf_env):
    env = conf_env(receiver.url)
    for _ in range(2):
        assert run_hook(env, "101", "pre-stop").returncode == 0
    ids = [e["event_id"] for e in receiver.events]
    assert len(ids) == 2 and ids[0] != ids[1]


def test_node_defaults_to_the_short_hostname(receiver, conf_env, in_process):
    env = conf_env(receiver.url)
    del env["PVE_JANITOR_NODE"]
    code, _ = in_process(["101", "post-start"], env)
    assert code == 0
    assert receiver.events[0]["node"] == socket.gethostname().split(".")[0]


def test_odd_node_names_survive_json_encoding(receiver, conf_env):
    odd = 'nö"de\\x\t\U0001f600'
    env = dict(conf_env(receiver.url), PVE_JANITOR_NODE=odd)
    assert run_hook(env, "101", "post-stop").returncode == 0
    assert receiver.events[0]["node"] == odd


def test_a_200_duplicate_answer_counts_as_delivered(receiver, conf_env, spool_dir):
    receiver.force_status = 200
    proc = run_hook(conf_env(receiver.url), "101", "post-stop")
    assert proc.returncode == 0
    assert "sent (200)" in proc.stderr
    assert spooled(spool_dir) == []


def test_url_with_trailing_slash_and_prefix(receiver, conf_env):
    # a prefix the receiver does not serve must fail, proving the prefix is kept
    proc = run_hook(conf_env(receiver.url + "/janitor/"), "101", "post-stop")
    assert proc.returncode == 0 and "spooled" in proc.stderr
    proc = run_hook(conf_env(receiver.url + "/"), "101", "post-stop")
    assert "sent (202)" in proc.stderr


def test_hostname_url_is_resolved(receiver, conf_env):
    proc = run_hook(conf_env("http://localhost:%d" % receiver.server_port), "101", "post-stop")
    assert proc.returncode == 0
    assert "sent (202)" in proc.stderr


# --- failure: spool ------------------------------------------------------------------


def test_receiver_down_spools_the_event(refused_url, conf_env, spool_dir):
    proc = run_hook(conf_env(refused_url), "101", "post-stop")

    assert proc.returncode == 0
    assert "spooled (receiver unreachable" in proc.stderr
    (name,) = spooled(spool_dir)
    assert name[:20].isdigit() and name.endswith(".json")
    event = json.loads((spool_dir / name).read_bytes())
    assert (event["vmid"], event["phase"], event["node"]) == (101, "post-stop", NODE)
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((spool_dir / name).stat().st_mode) == 0o600
    assert not [p for p in spool_dir.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("status", [500, 503, 400, 404])
def test_error_answers_spool_the_event(receiver, conf_env, spool_dir, status):
    receiver.force_status = status
    proc = run_hook(conf_env(receiver.url), "101", "post-stop")
    assert proc.returncode == 0
    assert f"receiver answered {status}" in proc.stderr
    assert len(spooled(spool_dir)) == 1


def test_wrong_secret_is_rejected_and_spooled(receiver, conf_env, spool_dir):
    proc = run_hook(conf_env(receiver.url, secret="not-the-secret"), "101", "post-stop")
    assert proc.returncode == 0
    assert [status for status, _ in receiver.log] == [401]
    assert len(spooled(spool_dir)) == 1


def test_black_holed_receiver_is_bounded_by_timeout(black_hole_url, conf_env, spool_dir):
    proc = run_hook(conf_env(black_hole_url, extra="TIMEOUT=1\n"), "101", "pre-start")
    assert proc.returncode == 0
    assert proc.elapsed <= 1.5
    assert "spooled (receiver unreachable" in proc.stderr
    assert len(spooled(spool_dir)) == 1


def test_black_holed_receiver_with_a_backlog_is_bounded_too(black_hole_url, conf_env, spool_dir):
    for i in range(3):
        spool_event(spool_dir, f"{i + 1:020d}-old{i}.json", b'{"event_id":"x%d"}' % i)
    proc = run_hook(conf_env(black_hole_url, extra="TIMEOUT=1\n"), "101", "post-stop")
    assert proc.returncode == 0
    assert proc.elapsed <= 1.5
    assert len(spooled(spool_dir)) == 4


def test_a_down_receiver_is_not_tried_again_for_30_seconds(black_hole_url, conf_env, spool_dir):
    """A node stopall of hundreds of guests must not wait a timeout per guest."""
    env = conf_env(black_hole_url, extra="TIMEOUT=1\n")
    first = run_hook(env, "101", "pre-stop")
    assert first.returncode == 0 and "spooled (receiver unreachable" in first.stderr
    assert first.elapsed >= 0.9
    marker = (spool_dir / ".down").read_text().split("\n")
    since, until = (float(t) for t in marker[0].split())
    assert marker[1] == black_hole_url and until - since == pytest.approx(30, abs=1)

    later = [run_hook(env, str(vmid), "pre-stop") for vmid in (102, 103)]
    for proc in later:
        assert proc.returncode == 0
        assert "spooled (receiver down since " in proc.stderr and "next try after" in proc.stderr
        assert proc.elapsed < 0.5  # no network at all
    assert len(spooled(spool_dir)) == 3
    assert (spool_dir / ".down").read_text().split("\n")[0] == marker[0]  # the window is not extended


def write_down_marker(spool_dir, url, since, until):
    spool_dir.mkdir(mode=0o700, exist_ok=True)
    (spool_dir / ".down").write_text(f"{since:.3f} {until:.3f}\n{url}\n")


def test_runs_within_the_down_window_spool_without_touching_the_network(receiver, conf_env, spool_dir):
    now = time.time()
    write_down_marker(spool_dir, receiver.url, now - 5, now + 25)
    proc = run_hook(conf_env(receiver.url), "101", "post-stop")
    assert proc.returncode == 0 and "spooled (receiver down since" in proc.stderr
    assert receiver.log == [] and len(spooled(spool_dir)) == 1


def test_the_first_run_after_the_down_window_tries_again(receiver, conf_env, spool_dir):
    now = time.time()
    write_down_marker(spool_dir, receiver.url, now - 60, now - 1)
    spool_event(spool_dir, f"{1:020d}-old.json", event_bytes(102))
    proc = run_hook(conf_env(receiver.url), "101", "post-stop")
    assert proc.returncode == 0 and "sent (202)" in proc.stderr and "replayed 1 of 1" in proc.stderr
    assert [e["vmid"] for e in receiver.events] == [102, 101]
    assert not (spool_dir / ".down").exists()  # up again


@pytest.mark.parametrize("url, until", [("http://elsewhere:1", 25), (None, 3600)])
def test_a_down_marker_for_another_url_or_from_a_clock_jump_is_ignored(receiver, conf_env, spool_dir, url, until):
    now = time.time()
    write_down_marker(spool_dir, url or receiver.url, now, now + until)
    proc = run_hook(conf_env(receiver.url), "101", "post-stop")
    assert proc.returncode == 0 and "sent (202)" in proc.stderr


def test_a_down_marker_that_is_a_symlink_is_not_followed(receiver, conf_env, spool_dir, tmp_path):
    target = tmp_path / "root-only-file"
    now = time.time()
    target.write_text(f"{now:.3f} {now + 25:.3f}\n{receiver.url}\n")
    spool_dir.mkdir(mode=0o700)
    (spool_dir / ".down").symlink_to(target)
    proc = run_hook(conf_env(receiver.url), "101", "post-stop")
    assert proc.returncode == 0 and "sent (202)" in proc.stderr
    assert target.exists() and not os.path.lexists(spool_dir / ".down")


def test_a_server_dripping_bytes_cannot_stretch_the_run(drip_url, conf_env, spool_dir):
    proc = run_hook(conf_env(drip_url, extra="TIMEOUT=1\n"), "101", "post-stop")
    assert proc.returncode == 0
    assert proc.elapsed <= 1.5
    assert len(spooled(spool_dir)) == 1


def test_https_url_against_a_plain_http_receiver_spools(receiver, conf_env, spool_dir):
    proc = run_hook(conf_env("https://127.0.0.1:%d" % receiver.server_port, extra="TIMEOUT=1\n"), "101", "post-stop")
    assert proc.returncode == 0
    assert proc.elapsed <= 1.5
    assert "spooled" in proc.stderr and len(spooled(spool_dir)) == 1


def test_tls_handshake_gets_only_what_is_left_of_the_deadline(hook, black_hole_url, monkeypatch):
    """A connect that takes a while must not leave the TLS handshake a whole new TIMEOUT."""

    class SlowConnect(socket.socket):
        def connect(self, address):
            time.sleep(0.6)  # as a slow SYN-ACK would
            return super().connect(address)

    monkeypatch.setattr(socket, "socket", SlowConnect)
    receiver = hook.Receiver(black_hole_url.replace("http://", "https://"), SECRET)
    start = time.monotonic()
    with pytest.raises(hook.DeliveryError):
        receiver.post(b"{}", start + 1.0)  # the black hole accepts TCP and never says a TLS word
    assert time.monotonic() - start <= 1.2


@pytest.mark.parametrize("kind", ["fifo", "too large"])
def test_a_ca_file_that_is_not_a_small_regular_file_cannot_hang_an_https_post(
    black_hole_url, conf_env, spool_dir, tmp_path, hook, kind
):
    """OpenSSL opens the CA bundle blocking: a FIFO there would stop the hook for good."""
    ca_file = tmp_path / "ca.pem"
    if kind == "fifo":
        os.mkfifo(ca_file)
    else:
        ca_file.write_bytes(b"-" * (hook.MAX_CA_BYTES + 1))
    env = dict(conf_env(black_hole_url.replace("http://", "https://"), extra="TIMEOUT=1\n"), SSL_CERT_FILE=str(ca_file))

    proc = run_hook(env, "101", "pre-start", timeout=10)

    assert proc.returncode == 0 and proc.elapsed <= 1.5
    why = "not a regular file" if kind == "fifo" else f"larger than {hook.MAX_CA_BYTES} bytes"
    assert f"spooled (receiver unreachable: CA file {ca_file} refused: {why})" in proc.stderr
    assert len(spooled(spool_dir)) == 1


@pytest.fixture
def private_ca(tmp_path):
    """A CA of our own (as a site's private CA is): (its PEM file, the context of a server it signed)."""
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return ca_file, context


class TlsServer(ThreadingMixIn, Receiver):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that refused our certificate: the test looks at the hook's side


@pytest.fixture
def tls_receiver(private_ca):
    """The test receiver behind TLS with a certificate of the private CA."""
    _, context = private_ca
    for server in serve(TlsServer):
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.url = "https://127.0.0.1:%d" % server.server_port
        yield server


def test_ca_file_lets_the_hook_post_to_an_https_receiver_with_a_private_ca(
    tls_receiver, private_ca, conf_env, spool_dir
):
    ca_file, _ = private_ca
    proc = run_hook(conf_env(tls_receiver.url, extra=f"CA_FILE={ca_file}\nTIMEOUT=5\n"), "101", "post-stop")
    assert proc.returncode == 0 and "sent (202)" in proc.stderr, proc.stderr
    assert [(e["vmid"], e["phase"]) for e in tls_receiver.events] == [(101, "post-stop")]
    assert spooled(spool_dir) == []


def test_without_ca_file_a_private_ca_is_not_trusted(tls_receiver, conf_env, spool_dir):
    proc = run_hook(conf_env(tls_receiver.url, extra="TIMEOUT=5\n"), "101", "post-stop")
    assert proc.returncode == 0 and proc.elapsed <= 5.5
    assert "spooled (receiver unreachable:" in proc.stderr and "CERTIFICATE_VERIFY_FAILED" in proc.stderr
    assert tls_receiver.events == [] and len(spooled(spool_dir)) == 1


def test_a_ca_file_of_another_ca_is_not_trusted(tls_receiver, conf_env, spool_dir, tmp_path):
    trustme = pytest.importorskip("trustme")
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    proc = run_hook(conf_env(tls_receiver.url, extra=f"CA_FILE={other}\nTIMEOUT=5\n"), "101", "post-stop")
    assert proc.returncode == 0 and "CERTIFICATE_VERIFY_FAILED" in proc.stderr
    assert tls_receiver.events == [] and len(spooled(spool_dir)) == 1


@pytest.mark.parametrize("kind", ["missing", "fifo", "directory"])
def test_an_unusable_ca_file_is_named_and_the_event_spooled_at_once(tls_receiver, conf_env, spool_dir, tmp_path, kind):
    ca_file = tmp_path / "ca.pem"
    if kind == "fifo":
        os.mkfifo(ca_file)  # OpenSSL would open it blocking, and wait for a writer for ever
    elif kind == "directory":
        ca_file.mkdir()
    proc = run_hook(conf_env(tls_receiver.url, extra=f"CA_FILE={ca_file}\nTIMEOUT=5\n"), "101", "pre-start")
    assert proc.returncode == 0 and proc.elapsed <= 2
    expected = {
        "missing": f"CA_FILE {ca_file}: No such file or directory",
        "fifo": f"CA file {ca_file} refused: not a regular file",
        "directory": f"CA file {ca_file} refused: not a regular file",
    }[kind]
    assert f"spooled (receiver unreachable: {expected})" in proc.stderr, proc.stderr
    assert tls_receiver.events == [] and len(spooled(spool_dir)) == 1


def test_ca_file_is_read_from_hook_conf(hook, tmp_path):
    conf = tmp_path / "hook.conf"
    conf.write_text("URL=https://janitor.example:8765\nSECRET=s\nCA_FILE=/etc/pve-janitor/ca.pem\n")
    notes: list[str] = []
    assert hook.read_config({"PVE_JANITOR_HOOK_CONF": str(conf)}, notes)["ca_file"] == "/etc/pve-janitor/ca.pem"
    assert hook.read_config({"PVE_JANITOR_HOOK_CONF": str(tmp_path / "none")}, notes)["ca_file"] == ""


def test_a_black_holed_first_address_leaves_time_for_the_next(hook, receiver, monkeypatch):
    """A host name with a dead IPv6 and a working IPv4 address must still get through."""
    import _socket

    hole = ("127.0.0.1", 9)  # never really connected to: connect() below plays a dropped SYN

    class HoleFirst(_socket.socket):
        def connect(self, address):
            if address == hole:
                time.sleep(self.gettimeout() or 0.0)
                raise TimeoutError("timed out")
            return super().connect(address)

    monkeypatch.setattr(_socket, "socket", HoleFirst)
    target = hook.Receiver(receiver.url, SECRET)
    target.addresses = [(socket.AF_INET, hole), (socket.AF_INET, ("127.0.0.1", receiver.server_port))]
    start = time.monotonic()
    assert target.post(event_bytes(101), start + 2.0) == 202
    assert 0.9 <= time.monotonic() - start <= 1.5  # the first address had its half, no more


# --- replay ----------------------------------------------------------------------


def test_spooled_events_are_replayed_oldest_first(receiver, refused_url, conf_env, spool_dir):
    down = conf_env(refused_url)
    for vmid in ("101", "102", "103"):
        assert run_hook(down, vmid, "post-stop").returncode == 0
    assert len(spooled(spool_dir)) == 3

    proc = run_hook(conf_env(receiver.url), "104", "post-stop")

    assert proc.returncode == 0
    assert [e["vmid"] for e in receiver.events] == [101, 102, 103, 104]
    assert [status for status, _ in receiver.log] == [202] * 4  # each re-signed, fresh timestamp
    assert spooled(spool_dir) == []
    assert "replayed 3 of 3 spooled" in proc.stderr


def test_old_spooled_events_are_resigned_with_a_fresh_timestamp(receiver, conf_env, spool_dir):
    old = time.time() - 3600
    body = b'{"event_id":"%s","vmid":107,"phase":"post-stop","node":"pve9","ts":%.3f}' % (
        uuid.uuid4().hex.encode(),
        old,
    )
    spool_event(spool_dir, "%020d-old.json" % int(old * 1e9), body)

    assert run_hook(conf_env(receiver.url), "108", "post-stop").returncode == 0

    assert receiver.log[0] == (202, body)  # stored body sent byte for byte
    assert receiver.events[0]["ts"] == pytest.approx(old, abs=0.01)
    assert spooled(spool_dir) == []


def test_a_slow_receiver_still_gets_new_events_and_the_spool_drains(slow_receiver, conf_env, spool_dir):
    """A receiver that answers after 1.2 s (TIMEOUT=2) is up: a replayed post that
    outlasts the replay budget must neither make the current event skip its turn
    nor keep the same oldest event going round forever."""
    old = [uuid.uuid4().hex for _ in range(2)]
    for i, event_id in enumerate(old):
        spool_event(spool_dir, f"{i + 1:020d}-{event_id}.json", event_bytes(900 + i, event_id))
    env = conf_env(slow_receiver.url, extra="TIMEOUT=2\n")

    runs = [run_hook(env, str(vmid), "post-stop") for vmid in (101, 102, 103)]

    for proc in runs:
        assert proc.returncode == 0 and "sent (202)" in proc.stderr, proc.stderr
        assert proc.elapsed <= 2.5
    accepted = {e["vmid"] for e in slow_receiver.events}
    assert {101, 102, 103} <= accepted  # every new event went through, in its own run
    assert {900, 901} <= accepted
    assert spooled(spool_dir) == []  # and the spool drained (one per run at this speed)


def test_a_replay_thread_that_outlives_the_run_keeps_its_spool_fd(
    hook, receiver, conf_env, spool_dir, in_process, monkeypatch
):
    """Closing the spool's directory fd under a replay thread still using it would
    send its unlink to whatever file reuses the number."""
    spool_event(spool_dir, f"{1:020d}-old.json", event_bytes(102))
    delete = hook.Spool.delete

    def slow_delete(self, name):
        time.sleep(1.5)  # past the deadline (TIMEOUT=1) and the join's grace
        return delete(self, name)

    monkeypatch.setattr(hook.Spool, "delete", slow_delete)
    code, err = in_process(["101", "post-stop"], conf_env(receiver.url, extra="TIMEOUT=1\n"))
    assert code == 0 and "sent (202)" in err
    time.sleep(1.0)
    assert spooled(spool_dir) == []  # the late delete still found its directory


def test_an_already_delivered_spooled_event_is_removed_on_200(receiver, conf_env, spool_dir):
    event_id = uuid.uuid4().hex
    receiver.seen.add(event_id)
    spool_event(
        spool_dir,
        f"{1:020d}-{event_id}.json",
        b'{"event_id":"%s","vmid":105,"phase":"pre-stop","node":"n","ts":1}' % event_id.encode(),
    )
    assert run_hook(conf_env(receiver.url), "106", "pre-stop").returncode == 0
    assert [status for status, _ in receiver.log] == [200, 202]
    assert spooled(spool_dir) == []


def test_a_malformed_spooled_event_is_moved_aside(receiver, conf_env, spool_dir):
    spool_event(spool_dir, f"{1:020d}-garbage.json", b"this is not json")
    spool_event(
        spool_dir,
        f"{2:020d}-good.json",
        b'{"event_id":"%s","vmid":109,"phase":"post-stop","node":"n","ts":1}' % uuid.uuid4().hex.encode(),
    )

    proc = run_hook(conf_env(receiver.url), "110", "post-stop")

    assert proc.returncode == 0
    assert [e["vmid"] for e in receiver.events] == [109, 110]
    assert spooled(spool_dir) == []
    assert (spool_dir / "rejected" / f"{1:020d}-garbage.json").read_bytes() == b"this is not json"
    assert "garbage.json was refused by the receiver (400)" in proc.stderr


def test_replay_stops_at_the_first_server_error(receiver, conf_env, spool_dir):
    for i in range(3):
        spool_event(spool_dir, f"{i + 1:020d}-e{i}.json", b'{"event_id":"e%d"}' % i)
    receiver.force_status = 500

    proc = run_hook(conf_env(receiver.url), "101", "post-stop")

    assert proc.returncode == 0
    assert [status for status, _ in receiver.log] == [500, 500]  # oldest spooled, then this event
    assert receiver.log[0][1] == b'{"event_id":"e0"}'
    assert len(spooled(spool_dir)) == 4


def test_spool_is_bounded_to_10000_files(refused_url, conf_env, spool_dir):
    spool_dir.mkdir(mode=0o700)
    for i in range(1, 10001):
        with open(spool_dir / f"{i:020d}-pre{i}.json", "wb") as f:
            f.write(b"{}")

    proc = run_hook(conf_env(refused_url), "101", "post-stop")

    assert proc.returncode == 0
    names = spooled(spool_dir)
    assert len(names) == 10000
    assert names[0] == f"{2:020d}-pre2.json"  # the oldest one went
    assert json.loads((spool_dir / names[-1]).read_bytes())["vmid"] == 101
    assert "dropped the 1 oldest" in proc.stderr


# --- spool safety: the hook runs as root ----------------------------------------------


def event_bytes(vmid, event_id=None):
    return b'{"event_id":"%s","vmid":%d,"phase":"post-stop","node":"n","ts":1}' % (
        (event_id or uuid.uuid4().hex).encode(),
        vmid,
    )


def write_conf(tmp_path, url, spool):
    conf = tmp_path / "hook.conf"
    conf.write_text(f"URL={url}\nSECRET={SECRET}\nSPOOL_DIR={spool}\nTIMEOUT=1\n")
    return {
        "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
        "LC_ALL": "C",
        "PVE_JANITOR_HOOK_CONF": str(conf),
        "PVE_JANITOR_NODE": NODE,
    }


def test_a_spooled_symlink_is_never_followed(receiver, conf_env, spool_dir, tmp_path):
    """Root must not read (and POST) whatever file a planted symlink points at."""
    target = tmp_path / "root-only-file"
    target.write_bytes(event_bytes(666, "leaked-through-a-symlink"))
    spool_dir.mkdir(mode=0o700)
    (spool_dir / f"{1:020d}-evil.json").symlink_to(target)

    proc = run_hook(conf_env(receiver.url), "101", "post-stop")

    assert proc.returncode == 0
    assert [e["vmid"] for e in receiver.events] == [101]
    assert not any(b"leaked" in raw for _, raw in receiver.log)
    assert not os.path.lexists(spool_dir / f"{1:020d}-evil.json")  # the link is removed ...
    assert target.read_bytes() == event_bytes(666, "leaked-through-a-symlink")  # ... not its target
    assert "evil.json" in proc.stderr and "removed" in proc.stderr


def test_a_spooled_fifo_cannot_hang_the_hook(receiver, conf_env, spool_dir):
    spool_dir.mkdir(mode=0o700)
    os.mkfifo(spool_dir / f"{1:020d}-fifo.json")
    spool_event(spool_dir, f"{2:020d}-good.json", event_bytes(102))

    proc = run_hook(conf_env(receiver.url, extra="TIMEOUT=1\n"), "101", "pre-start", timeout=10)

    assert proc.returncode == 0 and proc.elapsed <= 1.5
    assert [e["vmid"] for e in receiver.events] == [102, 101]
    assert spooled(spool_dir) == []
    assert "fifo.json (not a regular file): removed" in proc.stderr


@pytest.mark.parametrize("trailing_slash", ["", "/"])
def test_a_symlinked_spool_dir_is_refused(receiver, refused_url, tmp_path, trailing_slash):
    """Whoever can swap SPOOL_DIR for a symlink must not choose what root reads or writes."""
    elsewhere = tmp_path / "elsewhere"
    spool_event(elsewhere, f"{1:020d}-planted.json", event_bytes(666))
    link = tmp_path / "spool-link"
    link.symlink_to(elsewhere)

    up = run_hook(write_conf(tmp_path, receiver.url, f"{link}{trailing_slash}"), "101", "post-stop")
    assert up.returncode == 0
    assert [e["vmid"] for e in receiver.events] == [101]  # sent, but nothing replayed from there
    assert "sent (202)" in up.stderr and "refused (it is a symbolic link)" in up.stderr
    assert up.stderr.count("\n") == 1

    down = run_hook(write_conf(tmp_path, refused_url, f"{link}{trailing_slash}"), "102", "post-stop")
    assert down.returncode == 0
    assert "LOST, spool" in down.stderr and "refused (it is a symbolic link)" in down.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == [f"{1:020d}-planted.json"]  # nothing written there


def test_a_spool_dir_others_may_write_is_refused(receiver, refused_url, tmp_path, spool_dir):
    spool_event(spool_dir, f"{1:020d}-planted.json", event_bytes(666))
    spool_dir.chmod(0o777)

    up = run_hook(write_conf(tmp_path, receiver.url, spool_dir), "101", "post-stop")
    assert up.returncode == 0 and [e["vmid"] for e in receiver.events] == [101]
    assert "refused (it is writable by group or others (mode 0777))" in up.stderr

    spool_dir.chmod(0o720)  # group-writable is as bad
    down = run_hook(write_conf(tmp_path, refused_url, spool_dir), "102", "post-stop")
    assert down.returncode == 0 and "LOST, spool" in down.stderr and "mode 0720" in down.stderr
    assert spooled(spool_dir) == [f"{1:020d}-planted.json"]


def test_a_spool_dir_owned_by_someone_else_is_refused(receiver, conf_env, spool_dir, in_process, monkeypatch):
    spool_event(spool_dir, f"{1:020d}-planted.json", event_bytes(666))
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(spool_dir).st_uid + 4242)
    code, err = in_process(["101", "post-stop"], conf_env(receiver.url))
    assert code == 0 and [e["vmid"] for e in receiver.events] == [101]
    assert "refused (it is owned by uid" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the spool to another user")
def test_a_spool_dir_owned_by_another_user_is_refused_as_root(refused_url, conf_env, spool_dir):
    spool_dir.mkdir(mode=0o700)
    os.chown(spool_dir, 65534, 65534)
    proc = run_hook(conf_env(refused_url), "101", "post-stop")
    assert proc.returncode == 0
    assert "LOST, spool" in proc.stderr and "owned by uid 65534, not 0" in proc.stderr
    assert spooled(spool_dir) == []


def test_a_missing_spool_dir_is_created_0700_and_its_parents_kept(refused_url, tmp_path):
    spool = tmp_path / "new" / "deeper" / "spool"
    proc = run_hook(write_conf(tmp_path, refused_url, spool), "101", "post-stop")
    assert proc.returncode == 0 and "spooled (" in proc.stderr
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700 and len(spooled(spool)) == 1


def test_a_lock_symlink_is_not_followed(receiver, conf_env, spool_dir, tmp_path):
    spool_event(spool_dir, f"{1:020d}-old.json", event_bytes(102))
    victim = tmp_path / "victim"
    (spool_dir / ".lock").symlink_to(victim)

    proc = run_hook(conf_env(receiver.url), "101", "post-stop")

    assert proc.returncode == 0 and "sent (202)" in proc.stderr
    assert not os.path.lexists(victim)  # O_CREAT through the link would have made it


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_no_replay_without_the_lock(receiver, conf_env, spool_dir, kind):
    """A .lock that cannot be used means no replay at all (two runs could otherwise send
    and delete the same files at once): only the current event is sent."""
    spool_event(spool_dir, f"{1:020d}-old.json", event_bytes(102))
    if kind == "directory":
        (spool_dir / ".lock").mkdir()
    else:
        os.mkfifo(spool_dir / ".lock")

    proc = run_hook(conf_env(receiver.url), "101", "post-stop", timeout=10)

    assert proc.returncode == 0 and "sent (202)" in proc.stderr
    assert [e["vmid"] for e in receiver.events] == [101]
    assert spooled(spool_dir) == [f"{1:020d}-old.json"]
    assert f"replay skipped: {spool_dir}/.lock" in proc.stderr


def test_a_symlinked_rejected_dir_is_not_used(receiver, conf_env, spool_dir, tmp_path):
    spool_event(spool_dir, f"{1:020d}-garbage.json", b"this is not json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (spool_dir / "rejected").symlink_to(elsewhere)

    proc = run_hook(conf_env(receiver.url), "101", "post-stop")

    assert proc.returncode == 0
    assert list(elsewhere.iterdir()) == []
    assert spooled(spool_dir) == []
    assert "garbage.json was refused by the receiver (400): deleted" in proc.stderr


# --- always exit 0 -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["101"],
        ["abc", "post-stop"],
        ["-1", "post-stop"],
        ["101", "destroy"],
        ["101", "post-stop", "extra"],
        ["१०१", "post-stop"],
        ["99", "post-stop"],
        ["1000000000", "pre-start"],
    ],
)
def test_bad_arguments_print_usage_and_exit_zero(receiver, conf_env, in_process, argv):
    code, err = in_process(argv, conf_env(receiver.url))
    assert code == 0
    assert err.startswith("pve-janitor-hook: usage:") and err.count("\n") == 1
    assert receiver.log == []


def test_bad_arguments_as_a_subprocess(receiver, conf_env):
    proc = run_hook(conf_env(receiver.url))
    assert proc.returncode == 0
    assert "usage:" in proc.stderr and receiver.log == []


def test_config_syntax_quotes_comments_unknown_keys(receiver, tmp_path, spool_dir, in_process):
    conf = tmp_path / "hook.conf"
    conf.write_bytes(
        b"# pve-janitor hook\r\n\r\n"
        b"SECRET=wrong\r\n"
        b"  # SECRET=also-wrong\r\n"
        + f'URL = "{receiver.url}/"\r\n'.encode()
        + f"SECRET='{SECRET}'\r\n".encode()
        + f"export SPOOL_DIR={spool_dir}\r\n".encode()
        + b"COLOUR=blue\r\njust some words\r\n\xff\xfe garbage =\r\nTIMEOUT=1.5\r\n"
    )
    code, err = in_process(["101", "post-stop"], {"PVE_JANITOR_HOOK_CONF": str(conf)})
    assert code == 0
    assert "sent (202)" in err
    assert len(receiver.events) == 1


def test_environment_overrides_url_and_secret(receiver, refused_url, conf_env, spool_dir):
    env = conf_env(refused_url, secret="stale-secret")
    env.update(PVE_JANITOR_URL=receiver.url, PVE_JANITOR_SECRET=SECRET)
    proc = run_hook(env, "101", "post-stop")
    assert proc.returncode == 0
    assert [status for status, _ in receiver.log] == [202]
    assert spooled(spool_dir) == []


def test_a_secret_that_is_not_utf8_signs_its_exact_bytes(receiver, conf_env):
    receiver.secret = b"\xff\xfe-latin1-\xe9".decode("utf-8", "surrogateescape")
    env = {k.encode(): v.encode() for k, v in conf_env(receiver.url, secret="unused").items()}
    env[b"PVE_JANITOR_SECRET"] = b"\xff\xfe-latin1-\xe9"
    proc = run_hook(env, "101", "post-stop")
    assert proc.returncode == 0
    assert [status for status, _ in receiver.log] == [202]


def test_missing_config_exits_zero_and_spools(tmp_path, spool_dir, in_process):
    code, err = in_process(["101", "post-stop"], {"PVE_JANITOR_HOOK_CONF": str(tmp_path / "nope.conf")})
    assert code == 0
    assert "spooled (URL not set)" in err and "nope.conf" in err
    assert len(spooled(spool_dir)) == 1


def test_unreadable_config_exits_zero(tmp_path, spool_dir, in_process):
    code, err = in_process(["101", "post-stop"], {"PVE_JANITOR_HOOK_CONF": str(tmp_path)})  # a directory
    assert code == 0
    assert "config" in err and "spooled" in err
    assert len(spooled(spool_dir)) == 1


def test_garbled_config_exits_zero(tmp_path, in_process, spool_dir):
    conf = tmp_path / "hook.conf"
    conf.write_bytes(os.urandom(4096).replace(b"=", b"") + b"\n===\nURL\n=value\n")
    code, err = in_process(["101", "post-stop"], {"PVE_JANITOR_HOOK_CONF": str(conf)})
    assert code == 0
    assert "spooled (URL not set)" in err


@pytest.fixture
def env_without_conf(receiver, hook):
    """URL and SECRET from the environment, for a run whose hook.conf is ignored.

    Such a run has no SPOOL_DIR of its own: it must neither replay a real spool on
    this machine nor make one (tests may run as root), so it gets a receiver that
    takes the event.
    """
    if os.path.lexists(hook.DEFAULT_SPOOL_DIR):
        pytest.skip(f"{hook.DEFAULT_SPOOL_DIR} exists: a run without SPOOL_DIR would replay it")

    def make(conf):
        return {
            "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
            "LC_ALL": "C",
            "PVE_JANITOR_HOOK_CONF": str(conf),
            "PVE_JANITOR_NODE": NODE,
            "PVE_JANITOR_URL": receiver.url,
            "PVE_JANITOR_SECRET": SECRET,
        }

    yield make
    assert not os.path.lexists(hook.DEFAULT_SPOOL_DIR)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/urandom", "/dev/tty", "directory", "socket"])
def test_a_config_that_is_not_a_regular_file_is_ignored_without_blocking(
    receiver, env_without_conf, hook, tmp_path, kind
):
    """A FIFO without a writer would block a plain open() for ever, and with it the
    guest's start; a device would be read as a config."""
    listener = None
    if kind.startswith("/dev/"):
        conf = Path(kind)
        if not conf.exists():
            pytest.skip(f"no {kind} here")
    elif kind == "fifo":
        conf = tmp_path / "hook.conf"
        os.mkfifo(conf)
    elif kind == "directory":
        conf = tmp_path
    else:
        conf = tmp_path / "hook.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(conf))
        listener.listen(1)
    try:
        proc = run_hook(env_without_conf(conf), "101", "pre-start", timeout=10)
    finally:
        if listener is not None:
            listener.close()

    assert proc.returncode == 0
    assert proc.elapsed <= hook.DEFAULT_TIMEOUT + 0.5  # the config's TIMEOUT is not known
    assert f"101 pre-start sent (202); config {conf} ignored: not a regular file" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert [e["vmid"] for e in receiver.events] == [101]


@pytest.mark.parametrize("size", ["bound + 1", "1 GiB"])
def test_a_config_larger_than_the_bound_is_ignored_unread(receiver, env_without_conf, hook, chained, tmp_path, size):
    script, log = chained(1)
    line = f"CHAIN={script}\n".encode()
    conf = tmp_path / "hook.conf"
    conf.write_bytes(line + b"#" * (hook.MAX_CONF_BYTES - len(line) - 1) + b"\n")
    assert conf.stat().st_size == hook.MAX_CONF_BYTES
    at_bound = run_hook(env_without_conf(conf), "101", "pre-start", timeout=10)
    assert at_bound.returncode == 1 and log.read_text() == "101 pre-start\n"  # read and used
    assert "ignored" not in at_bound.stderr

    with open(conf, "r+b") as f:
        f.truncate(hook.MAX_CONF_BYTES + 1 if size == "bound + 1" else 1 << 30)  # sparse: cheap to make
    proc = run_hook(env_without_conf(conf), "102", "pre-start", timeout=10)

    assert proc.returncode == 0  # the CHAIN line was never seen ...
    assert log.read_text() == "101 pre-start\n"  # ... nor run
    assert proc.elapsed <= hook.DEFAULT_TIMEOUT + 0.5
    assert f"102 pre-start sent (202); config {conf} ignored: larger than {hook.MAX_CONF_BYTES} bytes" in proc.stderr
    assert [e["vmid"] for e in receiver.events] == [101, 102]


@pytest.mark.parametrize(
    "extra, why", [("TIMEOUT=soon\n", "TIMEOUT"), ("TIMEOUT=-3\n", "TIMEOUT"), ("TIMEOUT=nan\n", "TIMEOUT")]
)
def test_bad_timeout_falls_back_to_the_default(receiver, conf_env, in_process, extra, why):
    code, err = in_process(["101", "post-stop"], conf_env(receiver.url, extra=extra))
    assert code == 0
    assert "sent (202)" in err and why in err


@pytest.mark.parametrize(
    "url", ["ftp://example.org", "no-scheme", "http://", "http://h:99999", "http://user:pw@127.0.0.1:1"]
)
def test_bad_url_spools(conf_env, in_process, spool_dir, url):
    code, err = in_process(["101", "post-stop"], conf_env(url))
    assert code == 0
    assert "spooled (bad URL" in err
    assert len(spooled(spool_dir)) == 1


def test_unwritable_spool_dir_exits_zero(refused_url, tmp_path, in_process):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    conf = tmp_path / "hook.conf"
    conf.write_text(f"URL={refused_url}\nSECRET={SECRET}\nSPOOL_DIR={blocker}/spool\n")
    code, err = in_process(["101", "post-stop"], {"PVE_JANITOR_HOOK_CONF": str(conf)})
    assert code == 0
    assert "LOST, could not spool" in err


def test_unwritable_spool_dir_does_not_stop_delivery(receiver, tmp_path, in_process):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    conf = tmp_path / "hook.conf"
    conf.write_text(f"URL={receiver.url}\nSECRET={SECRET}\nSPOOL_DIR={blocker}/spool\n")
    code, err = in_process(["101", "post-stop"], {"PVE_JANITOR_HOOK_CONF": str(conf)})
    assert code == 0 and "sent (202)" in err


def test_secret_is_scrubbed_from_every_message(hook, capsys, monkeypatch):
    monkeypatch.setattr(hook, "_secret", SECRET)
    hook.say(f"boom: key was {SECRET}")
    err = capsys.readouterr().err
    assert SECRET not in err and "***" in err


@pytest.mark.parametrize(
    "secret, up, line",
    [
        ("e", True, "pve-janitor-hook: 101 post-stop sent (202)\n"),
        ("a", False, "pve-janitor-hook: 101 post-stop spooled (receiver unreachable: Connection refused)\n"),
    ],
    ids=["e-receiver-up", "a-receiver-down"],
)
def test_a_one_character_secret_does_not_garble_the_output(
    receiver, refused_url, conf_env, spool_dir, secret, up, line
):
    receiver.secret = secret
    proc = run_hook(conf_env(receiver.url if up else refused_url, secret=secret), "101", "post-stop")
    assert proc.returncode == 0
    assert proc.stderr == line
    assert len(receiver.events) == (1 if up else 0)


def test_a_long_secret_that_reaches_a_message_is_still_scrubbed(receiver, env_without_conf, tmp_path):
    """No message is built from SECRET; should one ever carry it (here: in the config's
    path), the scrub still hides it."""
    conf = tmp_path / SECRET / "hook.conf"
    proc = run_hook(env_without_conf(conf), "101", "post-stop")  # run_hook: SECRET not in the output
    assert proc.returncode == 0
    assert f"sent (202); config {tmp_path}/***/hook.conf: No such file or directory" in proc.stderr


@pytest.mark.parametrize("secret, scrubbed", [("abcdefg", False), ("abcdefgh", True), (SECRET, True)])
def test_secrets_of_eight_characters_or_more_are_scrubbed(hook, capsys, monkeypatch, secret, scrubbed):
    monkeypatch.setattr(hook, "_secret", secret)
    hook.say(f"boom: key was {secret} in a message")
    err = capsys.readouterr().err
    assert (secret not in err) == scrubbed
    assert err.endswith(": boom: key was %s in a message\n" % ("***" if scrubbed else secret))


# --- CHAIN ---------------------------------------------------------------------------


@pytest.fixture
def chained(tmp_path):
    """A platform's own hookscript that records its argv and exits with a chosen code."""

    def make(exit_code):
        script = tmp_path / "platform-hook"
        script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/chain.log\nexit {exit_code}\n')
        script.chmod(0o755)
        return script, tmp_path / "chain.log"

    return make


def test_chain_exit_code_is_passed_through_in_pre_start(receiver, conf_env, chained):
    script, log = chained(1)
    proc = run_hook(conf_env(receiver.url, extra=f"CHAIN={script}\n"), "101", "pre-start")
    assert proc.returncode == 1
    assert log.read_text() == "101 pre-start\n"
    assert [(e["vmid"], e["phase"]) for e in receiver.events] == [(101, "pre-start")]
    assert "CHAIN exited 1" in proc.stderr


@pytest.mark.parametrize("phase", ["post-start", "pre-stop", "post-stop"])
def test_chain_failure_is_ignored_in_other_phases(receiver, conf_env, chained, phase):
    script, log = chained(3)
    proc = run_hook(conf_env(receiver.url, extra=f"CHAIN={script}\n"), "101", phase)
    assert proc.returncode == 0
    assert log.read_text() == f"101 {phase}\n"
    assert len(receiver.events) == 1


def test_chain_success_in_pre_start(receiver, conf_env, chained):
    script, _ = chained(0)
    proc = run_hook(conf_env(receiver.url, extra=f"CHAIN={script}\n"), "101", "pre-start")
    assert proc.returncode == 0 and len(receiver.events) == 1


def test_missing_chain_script_does_not_block_the_start(receiver, conf_env, tmp_path):
    proc = run_hook(conf_env(receiver.url, extra=f"CHAIN={tmp_path}/missing\n"), "101", "pre-start")
    assert proc.returncode == 0
    assert "CHAIN" in proc.stderr and "could not run" in proc.stderr
    assert len(receiver.events) == 1


@pytest.mark.parametrize("what", ["missing", "not executable"])
def test_a_chain_that_cannot_run_in_pre_start_says_the_start_was_not_vetoed(receiver, conf_env, tmp_path, what):
    script = tmp_path / "platform-hook"
    if what == "not executable":
        script.write_text("#!/bin/sh\nexit 1\n")
        script.chmod(0o644)
    proc = run_hook(conf_env(receiver.url, extra=f"CHAIN={script}\n"), "101", "pre-start")
    assert proc.returncode == 0  # this hook never makes Proxmox fail ...
    assert f"CHAIN {script} could not run: start NOT vetoed by it" in proc.stderr  # ... but says so
    assert len(receiver.events) == 1

    other = run_hook(conf_env(receiver.url, extra=f"CHAIN={script}\n"), "101", "post-stop")
    assert other.returncode == 0 and f"CHAIN {script} could not run" in other.stderr
    assert "vetoed" not in other.stderr  # only pre-start can veto anything


def test_chain_pointing_at_itself_does_not_loop(receiver, conf_env):
    proc = run_hook(conf_env(receiver.url, extra=f"CHAIN={HOOK}\n"), "101", "pre-start")
    assert proc.returncode == 0
    assert "CHAIN ignored" in proc.stderr


# --- the file itself ----------------------------------------------------------------


def test_file_is_an_executable_python3_script():
    assert HOOK.read_text().startswith("#!/usr/bin/python3")
    assert stat.S_IMODE(HOOK.stat().st_mode) == 0o755


def test_runs_without_importing_expensive_modules(receiver, conf_env):
    """Speed guard: the run should cost about a bare interpreter start (docs/hookscript.md)."""
    proc = subprocess.run(
        [PYTHON, "-I", "-S", "-X", "importtime", str(HOOK), "101", "post-stop"],
        env=conf_env(receiver.url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "sent (202)" in proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
    assert "_socket" in imported  # the parse works
    assert not imported & {
        "http.client",
        "json",
        "urllib.request",
        "hmac",
        "socket",
        "ssl",
        "subprocess",
        "uuid",
        "email.parser",
        "threading",
    }
