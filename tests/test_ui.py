"""The dashboard (receiver.ui) through Flask's test client, on a real SQLite file and the simulator.

The seed scene: 47 rows, 41 of them error rows whose guests are gone, so a sweep trips the
deletion-percentage guard and keeps a pending plan of those 41 rows.  The row of VMID 120 has a
hostname that is markup, which every page must show as text.  tests/test_ui_browser.py drives
the same pages in a real browser.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import re
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_runtime

from receiver import coverage_db, reservations, store, ui
from receiver.app import create_app
from receiver.guestconfig import GuestConfig
from receiver.probe import Result
from receiver.simulator.scene import ERROR_VMIDS, seed_database
from receiver.timeutil import utcnow
from receiver.ui import LOGIN_HOURS, SESSION_COOKIE, SESSION_LABEL, session_key

ADMIN_TOKEN = "admin-token-5d7f9b1c3e"
EVIL = '<script>alert("ghost")</script>.apps.local'
PAGES = ["/ui", "/ui/removals", "/ui/pending", "/ui/pending/1", "/ui/holds", "/ui/coverage", "/ui/allocations"]
RUN = "/api/v1/system/cleanup/run"


class WatcherStub:
    def status(self) -> dict[str, Any]:
        return {
            "watched": [],
            "leader": True,
            "alive": True,
            "last_tick": utcnow().isoformat(),
            "last_error": None,
            "hidden_guests": [],
        }


@pytest.fixture
def platform_db(sqlite_db):
    seed_database(sqlite_db.engine)
    with sqlite_db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE apps SET hostname = :h WHERE lxc_id = 120"), {"h": EVIL})
    return sqlite_db


def build_app(sim, db, **overrides: Any):
    settings = {"CLEANUP_ADMIN_TOKEN": ADMIN_TOKEN, **overrides}
    runtime = make_runtime(sim, db, **{k: v for k, v in settings.items() if v is not None})
    return create_app(runtime.settings, runtime=runtime, watcher=WatcherStub())


@pytest.fixture
def app(seed_sim, platform_db):
    return build_app(seed_sim, platform_db)


@pytest.fixture
def plan_id(app) -> int:
    """A sweep the guard refuses keeps its plan (41 ghosts of 47 rows)."""
    result = app.extensions["janitor"].runtime.sweeper.run()
    assert result.refusal == "guard" and result.pending_id == 1
    return 1


# --- helpers ---------------------------------------------------------------------------------


def csrf_of(client, path: str = "/ui/login") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.status_code
    found = re.search(r'name="csrf" value="([^"]+)"', page.get_data(as_text=True))
    assert found, "no form with a CSRF token on " + path
    return found.group(1)


def login(client, token: str = ADMIN_TOKEN):
    return client.post("/ui/login", data={"csrf": csrf_of(client), "token": token, "next": "/ui"})


def logged_in(client):
    assert login(client).status_code == 303
    return client


def flashes(response) -> list[str]:
    return [
        html.unescape(m) for m in re.findall(r'<p class="flash [a-z]+">([^<]*)</p>', response.get_data(as_text=True))
    ]


def post(client, path: str, **data: str):
    """An action as the page's form sends it (the CSRF token from a page), redirect followed."""
    return client.post(path, data={"csrf": csrf_of(client, "/ui/holds"), **data}, follow_redirects=True)


def cookie_header(response) -> str:
    (header,) = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(SESSION_COOKIE + "=")]
    return header


def plan_state(app, plan: int) -> tuple[str, str | None]:
    with app.extensions["janitor"].runtime.engine.connect() as conn:
        p = store.pending
        state, by = conn.execute(sa.select(p.c.state, p.c.decided_by).where(p.c.id == plan)).one()
        return state, by


def assert_page(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)[:2000]
    assert response.mimetype == "text/html"
    text = response.get_data(as_text=True)
    for fragment in fragments:
        assert fragment in text, fragment
    return text


# --- who may read ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_reading_without_a_login_goes_to_the_login_page(app, plan_id, path):
    response = app.test_client().get(path)
    assert response.status_code == 303
    assert response.headers["Location"] == f"/ui/login?next={path}"


@pytest.mark.parametrize("path", PAGES)
def test_reading_with_ui_public_needs_no_login(seed_sim, platform_db, path):
    app = build_app(seed_sim, platform_db, CLEANUP_UI_PUBLIC="true")
    app.extensions["janitor"].runtime.sweeper.run()
    text = assert_page(app.test_client().get(path), 200, "reading only")
    assert ">log in</a>" in text


@pytest.mark.parametrize("path", [*PAGES, "/ui/login"])
def test_without_an_admin_token_nothing_is_readable_unless_public(seed_sim, platform_db, path):
    app = build_app(seed_sim, platform_db, CLEANUP_ADMIN_TOKEN=None)
    app.extensions["janitor"].runtime.sweeper.run()
    assert_page(app.test_client().get(path), 403, "CLEANUP_ADMIN_TOKEN")


def test_without_an_admin_token_public_pages_offer_no_action_and_refuse_every_post(seed_sim, platform_db):
    app = build_app(seed_sim, platform_db, CLEANUP_ADMIN_TOKEN=None, CLEANUP_UI_PUBLIC="true")
    app.extensions["janitor"].runtime.sweeper.run()
    client = app.test_client()
    for path in PAGES:
        text = assert_page(client.get(path), 200)
        assert 'method="post"' not in text, path
        assert SESSION_COOKIE not in client.get(path).headers.get("Set-Cookie", "")  # no key, no session
    assert_page(client.get("/ui/pending"), 200, "Actions are off")
    assert_page(client.get("/ui/login"), 403, "no login is possible")
    for path in ("/ui/login", "/ui/pending/1/approve", "/ui/removals/1/restore", "/ui/holds"):
        assert_page(client.post(path, data={"token": "", "vmid": "130"}), 403, "CLEANUP_ADMIN_TOKEN is not set")
    assert plan_state(app, 1) == ("pending", None)


# --- logging in ------------------------------------------------------------------------------


def test_login_with_the_token_goes_on_to_the_page_asked_for(app, caplog):
    client = app.test_client()
    caplog.set_level(logging.INFO, logger="receiver.ui")
    first = client.get("/ui/holds")
    assert first.headers["Location"] == "/ui/login?next=/ui/holds"
    csrf = csrf_of(client, first.headers["Location"])
    form = client.get(first.headers["Location"]).get_data(as_text=True)
    assert 'value="/ui/holds"' in form and 'type="password"' in form
    response = client.post("/ui/login", data={"csrf": csrf, "token": ADMIN_TOKEN, "next": "/ui/holds"})
    assert response.status_code == 303 and response.headers["Location"] == "/ui/holds"
    assert_page(client.get("/ui/holds"), 200, "Log out", "Place a hold")
    assert "ui from 127.0.0.1: logged in" in caplog.text


@pytest.mark.parametrize(
    "target", ["//evil.example/ui", "https://evil.example/ui", "/api/v1/system/cleanup/stats", "/ui\\@evil", "ui"]
)
def test_login_never_sends_the_browser_elsewhere(app, target):
    client = app.test_client()
    response = client.post("/ui/login", data={"csrf": csrf_of(client), "token": ADMIN_TOKEN, "next": target})
    assert response.status_code == 303 and response.headers["Location"] == "/ui"


def test_a_wrong_token_is_401_and_logs_in_nobody(app, caplog):
    client = app.test_client()
    caplog.set_level(logging.INFO)
    for wrong in ("wrong", ADMIN_TOKEN + "x", "", ADMIN_TOKEN[:-1]):
        assert_page(login(client, wrong), 401, "That is not the admin token")
    assert client.get("/ui").status_code == 303
    assert caplog.text.count("login refused: wrong token") == 4


def test_login_without_the_forms_csrf_token_is_400(app):
    client = app.test_client()
    client.get("/ui/login")  # a session with a CSRF token, not sent back
    for data in ({"token": ADMIN_TOKEN}, {"token": ADMIN_TOKEN, "csrf": "forged"}):
        assert_page(client.post("/ui/login", data=data), 400, "stale")
    assert client.get("/ui").status_code == 303


def test_the_token_is_never_in_a_page_a_url_or_the_log(app, plan_id, caplog):
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    login(client, "not-" + ADMIN_TOKEN)
    answer = login(client)
    assert ADMIN_TOKEN not in answer.headers["Location"]
    seen = [client.get(path).get_data(as_text=True) for path in PAGES]
    seen.append(post(client, f"/ui/pending/{plan_id}/approve").get_data(as_text=True))
    assert not [text for text in seen if ADMIN_TOKEN in text]
    assert ADMIN_TOKEN not in caplog.text and "approved" in caplog.text


def test_logout_ends_the_session(app):
    client = logged_in(app.test_client())
    page = client.post("/ui/logout", data={"csrf": csrf_of(client, "/ui")})
    assert page.status_code == 303 and page.headers["Location"] == "/ui/login"
    assert client.get("/ui").status_code == 303


# --- the session cookie -----------------------------------------------------------------------


def test_the_session_cookie_is_httponly_strict_and_confined_to_ui(app):
    header = cookie_header(login(app.test_client()))
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/ui;" in header + ";"
    assert "Secure" not in header  # plain http: a Secure cookie would never come back
    assert ADMIN_TOKEN not in header


@pytest.mark.parametrize(
    "how",
    [{"base_url": "https://janitor.example"}, {"headers": {"X-Forwarded-Proto": "https"}}],
    ids=["https", "proxy"],
)
def test_the_session_cookie_is_secure_over_https(app, how):
    client = app.test_client()
    page = client.get("/ui/login", **how)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.get_data(as_text=True)).group(1)  # type: ignore[union-attr]
    assert "Secure" in cookie_header(page)
    answer = client.post("/ui/login", data={"csrf": csrf, "token": ADMIN_TOKEN}, **how)
    assert "Secure" in cookie_header(answer)


def test_a_login_lasts_twelve_hours(app):
    header = cookie_header(login(app.test_client()))
    assert LOGIN_HOURS == 12 and app.permanent_session_lifetime == timedelta(hours=12)
    assert "Expires=" in header


def test_the_session_key_is_derived_from_the_admin_token(app):
    expected = hmac.new(ADMIN_TOKEN.encode(), SESSION_LABEL, hashlib.sha256).digest()
    assert app.secret_key == session_key(ADMIN_TOKEN) == expected
    assert session_key("") is None


def test_receivers_with_one_token_share_logins_and_a_new_token_logs_everyone_out(seed_sim, platform_db):
    first = build_app(seed_sim, platform_db)
    cookie = cookie_header(login(first.test_client())).split(";", 1)[0].split("=", 1)[1]
    second = build_app(seed_sim, platform_db).test_client()  # another receiver behind the balancer
    second.set_cookie(SESSION_COOKIE, cookie, path="/ui")
    assert_page(second.get("/ui"), 200, "Log out")
    rotated = build_app(seed_sim, platform_db, CLEANUP_ADMIN_TOKEN="rotated-" + ADMIN_TOKEN).test_client()
    rotated.set_cookie(SESSION_COOKIE, cookie, path="/ui")
    assert rotated.get("/ui").status_code == 303


def test_the_api_ignores_the_session(app):
    client = logged_in(app.test_client())
    answer = client.post(RUN)
    assert answer.status_code == 401 and answer.mimetype == "application/json"


# --- CSRF and actions without a login ----------------------------------------------------------


def test_an_action_without_the_csrf_token_is_refused(app, plan_id, caplog):
    client = logged_in(app.test_client())
    other = logged_in(app.test_client())
    for data in ({}, {"csrf": "x" * 43}, {"csrf": csrf_of(other, "/ui")}):
        assert_page(client.post(f"/ui/pending/{plan_id}/approve", data=data), 400, "reload the page")
    assert plan_state(app, plan_id) == ("pending", None)
    assert len(table_vmids_of(app)) == 47
    assert "CSRF token missing or stale" in caplog.text


def test_an_action_without_a_login_is_refused_even_with_a_good_csrf_token(seed_sim, platform_db, caplog):
    app = build_app(seed_sim, platform_db, CLEANUP_UI_PUBLIC="true")
    app.extensions["janitor"].runtime.sweeper.run()
    client = app.test_client()
    text = assert_page(client.get("/ui/pending"), 200, "Approve", "needs a")
    csrf = re.search(r'name="csrf" value="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    for path, data in [
        ("/ui/pending/1/approve", {}),
        ("/ui/pending/1/reject", {"reason": "no"}),
        ("/ui/holds", {"vmid": "130"}),
        ("/ui/holds/1/release", {}),
        ("/ui/removals/1/restore", {}),
        ("/ui/allocations/1/release", {}),
    ]:
        assert_page(client.post(path, data={"csrf": csrf, **data}), 401, "log in with the admin token")
    assert plan_state(app, 1) == ("pending", None)
    assert len(table_vmids_of(app)) == 47
    with app.extensions["janitor"].runtime.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.holds)).scalar_one() == 0
    assert "not logged in" in caplog.text


def table_vmids_of(app) -> list[int | None]:
    with app.extensions["janitor"].runtime.engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT lxc_id FROM apps")).scalars())


# --- the pages ---------------------------------------------------------------------------------


def test_status_shows_leader_last_sweep_refusals_and_watcher(app, plan_id):
    text = assert_page(logged_in(app.test_client()).get("/ui"), 200, "this receiver", "refused", "alive")
    assert "CLEANUP_MAX_DELETE_PERCENT" in text  # the refusal, in the last sweep and the errors
    assert re.search(r"Pending plans</a></div>\s*<div class=\"value warn\">1</div>", text)


def test_the_pages_show_markup_in_a_hostname_as_text(app, plan_id):
    client = logged_in(app.test_client())
    plan = assert_page(client.get(f"/ui/pending/{plan_id}"), 200, "&lt;script&gt;alert(&#34;ghost&#34;)&lt;/script&gt;")
    assert "<script" not in plan
    post(client, f"/ui/pending/{plan_id}/approve")
    removed = assert_page(client.get("/ui/removals"), 200, "&lt;script&gt;")
    assert "<script" not in removed


def test_every_page_forbids_scripts_framing_and_caching(app):
    client = logged_in(app.test_client())
    for path in [*PAGES, "/ui/nothing-here"]:
        headers = client.get(path).headers
        assert (
            "default-src 'none'" in headers["Content-Security-Policy"]
            and "script-src" not in headers["Content-Security-Policy"]
        )
        assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"


def test_pending_lists_the_plan_and_its_page_lists_its_rows(app, plan_id):
    client = logged_in(app.test_client())
    listing = assert_page(client.get("/ui/pending"), 200, "guard", "41 of 47", "review 41 rows")
    assert f'action="/ui/pending/{plan_id}/approve"' in listing
    rows = assert_page(client.get(f"/ui/pending/{plan_id}"), 200, "Plan 1", "pending")
    assert rows.count("<tr>") == 4 + 1 + 41  # the plan's facts, the header, its rows
    assert_page(client.get("/ui/pending/999"), 404, "no pending plan 999")


def test_approving_removes_the_reviewed_rows_as_ui(app, plan_id, caplog):
    caplog.set_level(logging.INFO)
    client = logged_in(app.test_client())
    answer = post(client, f"/ui/pending/{plan_id}/approve")
    assert flashes(answer) == ["plan 1 approved: 41 of 41 rows removed"]
    assert plan_state(app, plan_id) == ("approved", "ui")
    assert set(table_vmids_of(app)).isdisjoint(ERROR_VMIDS) and len(table_vmids_of(app)) == 6
    assert "ui from 127.0.0.1: plan 1 approved" in caplog.text
    again = post(client, f"/ui/pending/{plan_id}/approve")
    assert "approval refused, nothing changed" in flashes(again)[0] and "already approved" in flashes(again)[0]
    assert_page(client.get("/ui/pending"), 200, "No plan waits for review", "approved")


def test_an_approval_the_pipeline_refuses_keeps_the_plan(app, plan_id, seed_sim):
    client = logged_in(app.test_client())
    seed_sim.set_fault("http500")
    answer = post(client, f"/ui/pending/{plan_id}/approve")
    assert "plan 1 is still pending: refused" in flashes(answer)[0]
    assert plan_state(app, plan_id) == ("pending", None)
    seed_sim.set_fault(None)
    assert len(table_vmids_of(app)) == 47


def test_rejecting_removes_nothing_and_keeps_the_reason(app, plan_id):
    client = logged_in(app.test_client())
    answer = post(client, f"/ui/pending/{plan_id}/reject", reason="those are still billed")
    assert flashes(answer) == ["plan 1 rejected: nothing removed"]
    assert plan_state(app, plan_id) == ("rejected", "ui")
    assert_page(client.get("/ui/pending"), 200, "those are still billed")
    assert len(table_vmids_of(app)) == 47


def test_restore_puts_the_row_back_held_and_refuses_twice(app, plan_id):
    client = logged_in(app.test_client())
    post(client, f"/ui/pending/{plan_id}/approve")
    page = assert_page(client.get("/ui/removals"), 200, "Restore")
    audit_id = int(re.search(r'action="/ui/removals/(\d+)/restore"', page).group(1))  # type: ignore[union-attr]
    answer = post(client, f"/ui/removals/{audit_id}/restore")
    (message,) = flashes(answer)
    assert message.startswith(f"audit entry {audit_id} restored: row ") and "held (hold 1)" in message
    assert len(table_vmids_of(app)) == 7
    assert_page(client.get("/ui/removals"), 200, "restored ")
    holds_page = assert_page(client.get("/ui/holds"), 200, f"restored from audit entry {audit_id}")
    assert "restore" in holds_page
    again = flashes(post(client, f"/ui/removals/{audit_id}/restore"))
    assert "restore refused, nothing changed" in again[0] and "already restored" in again[0]
    assert "no audit entry 99999" in flashes(post(client, "/ui/removals/99999/restore"))[0]


def test_removals_page_on_to_older_entries(app, plan_id, monkeypatch):
    monkeypatch.setattr(ui, "PAGE_SIZE", 20)
    client = logged_in(app.test_client())
    post(client, f"/ui/pending/{plan_id}/approve")
    pages, path = [], "/ui/removals"
    while path:
        text = assert_page(client.get(path), 200)
        pages.append([int(n) for n in re.findall(r'<td class="num">(\d+)</td>\s*<td title', text)])
        older = re.search(r'href="(/ui/removals\?before=\d+)">older', text)
        path = older.group(1) if older else ""
    assert [len(p) for p in pages] == [20, 20, 1]
    every = [n for p in pages for n in p]
    assert every == sorted(every, reverse=True) and len(set(every)) == 41
    for bad in ("0", "x", "-1", str(2**63)):
        assert_page(client.get(f"/ui/removals?before={bad}"), 400, "before must be an audit id")


def test_holds_place_by_vmid_or_row_and_release(app):
    client = logged_in(app.test_client())
    answer = post(client, "/ui/holds", vmid="130", until="2h", reason="billing dispute")
    (message,) = flashes(answer)
    assert message.startswith("hold 1 until ") and message.endswith(": billing dispute placed on VMID 130")
    assert flashes(post(client, "/ui/holds", row_key="007")) == ["hold 2 placed on row 7"]  # as the table spells it
    page = assert_page(client.get("/ui/holds"), 200, "billing dispute", "released by hand", ">ui<")
    assert page.count('action="/ui/holds/') == 2 and 'action="/ui/holds"' in page  # two release buttons, the form
    assert flashes(post(client, "/ui/holds/1/release")) == [f"released {message.removesuffix(' placed on VMID 130')}"]
    assert flashes(post(client, "/ui/holds/1/release")) == ["no hold 1: nothing released"]


@pytest.mark.parametrize(
    ("form", "fragment"),
    [
        ({}, "name exactly one of a VMID or a row key"),
        ({"vmid": "130", "row_key": "7"}, "name exactly one"),
        ({"vmid": "13O"}, "is not a whole number"),
        ({"vmid": "99"}, "outside Proxmox's range"),
        ({"row_key": "4711"}, "no row '4711' in table 'apps'"),
        ({"vmid": "130", "until": "yesterday"}, "neither a duration"),
        ({"vmid": "130", "until": "2000-01-01"}, "is not in the future"),
    ],
)
def test_a_hold_that_cannot_be_placed_says_why(app, form, fragment):
    client = logged_in(app.test_client())
    (message,) = flashes(post(client, "/ui/holds", **form))
    assert message.startswith("hold not placed: ") and fragment in message and "--" not in message
    with app.extensions["janitor"].runtime.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.holds)).scalar_one() == 0


def test_coverage_shows_each_node_and_the_guests_without_the_hook(app):
    engine, now = app.extensions["janitor"].runtime.engine, utcnow()
    read = [  # as the lease holder's refresher writes what it read
        GuestConfig(100, "pve1", "lxc", Result.PRESENT, "a", "local:snippets/pve-janitor-hook"),
        GuestConfig(102, "pve2", "qemu", Result.PRESENT, "c", "local:snippets/other.sh"),
    ]
    coverage_db.write(engine, [GuestConfig(101, "pve1", "lxc", Result.PRESENT, "b")], now - timedelta(hours=3))
    coverage_db.write(engine, read, now)
    text = assert_page(logged_in(app.test_client()).get("/ui/coverage"), 200, "local:snippets/other.sh", "3 h ago")
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", text)
    second = cells.index("pve2")
    assert cells[:4] == ["pve1", "2", "1", "50 %"] and cells[second : second + 4] == ["pve2", "1", "1", "0 %"]
    assert "pct set 101 --hookscript local:snippets/pve-janitor-hook" in text
    assert "qm set 102 --hookscript local:snippets/pve-janitor-hook" in text
    assert "set 100 " not in text  # a covered guest is not listed
    assert "not looked" in text  # no refresher in this process: no node check


def test_allocations_show_reservations_and_release_one(app):
    runtime = app.extensions["janitor"].runtime
    now = utcnow()
    made = reservations.reserve(
        runtime.engine,
        "apps",
        now=now,
        expires_at=now + timedelta(minutes=15),
        source="http",
        label="deploy shop",
        values=[("vmid", "170"), ("hostname", "shop.apps.local"), ("public_port", "20170")],
    )
    client = logged_in(app.test_client())
    assert_page(client.get("/ui/allocations"), 200, "shop.apps.local", "deploy shop", "public_port 20170", ">170<")
    assert flashes(post(client, f"/ui/allocations/{made.id}/release")) == [f"released {made.describe()}"]
    assert_page(client.get("/ui/allocations"), 200, "No reservation in force")


# --- errors are pages under /ui, JSON elsewhere -----------------------------------------------


def test_errors_under_ui_are_html_pages_and_the_apis_stay_json(app):
    client = logged_in(app.test_client())
    assert_page(client.get("/ui/nothing-here"), 404, "no such page")
    put = client.put("/ui/holds")
    assert_page(put, 405, "PUT is not allowed here")
    assert set(put.headers["Allow"].split(", ")) >= {"GET", "POST"}
    api = client.get("/api/v1/nothing-here")
    assert api.status_code == 404 and api.mimetype == "application/json"


def test_a_database_failure_is_a_503_page(app):
    runtime = app.extensions["janitor"].runtime
    client = logged_in(app.test_client())
    good = runtime.engine
    runtime.engine = sa.create_engine("sqlite:////nonexistent-dir/x.db")
    try:
        text = assert_page(client.get("/ui"), 503, "the database is unavailable")
        assert "Traceback" not in text
    finally:
        runtime.engine.dispose()
        runtime.engine = good
