"""The dashboard in a real browser: headless Chromium driven by Selenium, against ``pve-janitor serve``.

A real receiver (a subprocess, as an operator starts it) on a SQLite file with the seed scene
and the Proxmox simulator: its first sweep trips the deletion-percentage guard (41 ghosts of 47
rows) and keeps a pending plan.  The browser logs in with the admin token, loads every page,
approves the plan, restores a removed row, and, in a fresh session on a receiver with
``CLEANUP_UI_PUBLIC=true``, reads without a token and has an action refused.

Chromium and chromedriver come from the distribution (``make test`` installs them where it
can: Debian's ``chromium`` and ``chromium-driver``); without them these tests are skipped with
the command that installs them, and in CI (``CI=true``) they fail instead.
``JANITOR_UI_SCREENSHOTS=docs/img`` saves a screenshot of each page there (docs/dashboard.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ROOT, Database, janitor_env

from receiver import store
from receiver.db import make_engine
from receiver.schema import upgrade
from receiver.simulator import ProxmoxSimulator
from receiver.simulator.launch import Launched, free_port, serving
from receiver.simulator.scene import load_into, seed_database

ADMIN_TOKEN = "browser-admin-token-8e6c4a2f0b"
HOOK = "local:snippets/pve-janitor-hook"
INSTALL = "apt-get install -y chromium chromium-driver  (Debian, as root; `make test` runs it where it can)"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SHOTS = os.environ.get("JANITOR_UI_SCREENSHOTS")
WAIT = 30.0  # seconds for anything to appear


def missing() -> str | None:
    """Why the browser tests cannot run here, naming what installs the missing piece; None when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -c constraints.txt -e '.[test]'"
    if not any(shutil.which(b) for b in BROWSERS) or not shutil.which("chromedriver"):
        return f"headless Chromium and chromedriver are not installed: {INSTALL}"
    return None


def wait_until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s")


# --- the scene: a simulator, a database, a receiver, a browser -------------------------------


class Scene:
    def __init__(self, sim: ProxmoxSimulator, db: Database, tmp: Path):
        self.sim, self.db, self.tmp = sim, db, tmp

    def env(self, **extra: Any) -> dict[str, str]:
        port = free_port()
        return janitor_env(
            self.sim,
            self.db,
            CLEANUP_BIND=f"127.0.0.1:{port}",
            CLEANUP_ADMIN_TOKEN=ADMIN_TOKEN,
            CLEANUP_HOOK_SECRET="browser-hook-secret",
            CLEANUP_COVERAGE_RPS=50,
            **extra,
        )

    def count(self, table: sa.Table, *where: Any) -> int:
        with self.db.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())

    def apps(self) -> int:
        with self.db.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM apps")).scalar_one())


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Iterator[Scene]:
    if why := missing():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the browser tests: {why}")
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("ui-browser")
    url = f"sqlite:///{tmp / 'platform.db'}"
    engine = make_engine(url)
    upgrade(engine)
    seed_database(engine)
    with ProxmoxSimulator(nodes=("pve1", "pve2")).start() as sim:
        load_into(sim, "seed")
        for vmid in (100, 101, 102, 103, 106):  # the others' configs name no hookscript
            sim.set_hookscript(vmid, HOOK)
        yield Scene(sim, Database("sqlite", url, engine), tmp)
    engine.dispose()


@pytest.fixture(scope="module")
def receiver(scene: Scene) -> Iterator[Launched]:
    with serving(scene.env(), scene.tmp / "receiver.log") as launched:
        # serve sweeps at start: the guard trips and keeps the plan of the 41 ghosts.
        wait_until(lambda: scene.count(store.pending) == 1, "the first sweep's pending plan")
        yield launched
    assert ADMIN_TOKEN not in launched.log_text()


@pytest.fixture(scope="module")
def browser(scene: Scene) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(str(shutil.which(b)) for b in BROWSERS if shutil.which(b))
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def open_page(browser: Any, base: str, path: str) -> str:
    browser.get(base + path)
    return str(browser.find_element("tag name", "h1").text)


def flash(browser: Any) -> list[str]:
    return [e.text for e in browser.find_elements("css selector", "p.flash")]


def submit(browser: Any, form_action: str, **fields: str) -> None:
    """Fill a form of the page and press its button, as a person would."""
    form = browser.find_element("css selector", f'form[action="{form_action}"]')
    for name, value in fields.items():
        form.find_element("name", name).send_keys(value)
    press(browser, form.find_element("css selector", "button[type=submit]"))


def press(browser: Any, button: Any) -> None:
    """Click, and wait for the next page: a click returns before the browser has left this one."""
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    page = browser.find_element("tag name", "html")
    button.click()
    WebDriverWait(browser, WAIT).until(staleness_of(page))
    WebDriverWait(browser, WAIT).until(lambda b: b.execute_script("return document.readyState") == "complete")


def shoot(browser: Any, name: str) -> None:
    """docs/dashboard.md's screenshots: the whole page, when JANITOR_UI_SCREENSHOTS names a directory."""
    if not SHOTS:
        return
    folder = Path(SHOTS) if Path(SHOTS).is_absolute() else ROOT / SHOTS
    folder.mkdir(parents=True, exist_ok=True)
    height = int(browser.execute_script("return document.querySelector('main').getBoundingClientRect().bottom"))
    metrics = {"width": 1280, "height": max(300, min(height + 8, 1400)), "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    browser.save_screenshot(str(folder / f"dashboard-{name}.png"))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# --- the tests ---------------------------------------------------------------------------------


def test_log_in_with_the_token_and_load_every_page(scene, receiver, browser):
    base = receiver.base
    browser.delete_all_cookies()
    assert open_page(browser, base, "/ui/pending") == "Log in"  # not public: reading needs the login
    assert browser.current_url == f"{base}/ui/login?next=/ui/pending"
    shoot(browser, "login")
    submit(browser, "/ui/login", token=ADMIN_TOKEN)
    assert browser.current_url == f"{base}/ui/pending" and ADMIN_TOKEN not in browser.current_url
    cookie = browser.get_cookie("pve_janitor_ui")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"

    wait_until(lambda: scene.count(store.coverage) >= 12, "the hook coverage of the seed guests")
    answer = urllib.request.urlopen(
        urllib.request.Request(
            f"{base}/api/v1/allocations",
            data=json.dumps({"hostname": "shop", "label": "deploy shop"}).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        ),
        timeout=WAIT,
    )
    assert answer.status == 201
    pages = [
        ("status", "/ui", "Status · table apps", "CLEANUP_MAX_DELETE_PERCENT"),
        ("pending", "/ui/pending", "Pending plans", "41 of 47"),
        ("plan", "/ui/pending/1", "Plan 1 · pending", "app120.apps.local"),
        ("removals", "/ui/removals", "Removals · newest first", "Nothing removed"),
        ("holds", "/ui/holds", "Holds", "Place a hold"),
        ("coverage", "/ui/coverage", "Hook coverage", f"pct set 104 --hookscript {HOOK}"),
        ("allocations", "/ui/allocations", "Allocations · reservations in force", "deploy shop"),
    ]
    for name, path, title, fragment in pages:
        assert open_page(browser, base, path) == title, path
        assert fragment in browser.page_source, (path, fragment)
        assert not browser.find_elements("tag name", "script")
        if name not in ("removals", "holds"):  # shot after the approval and the restore below
            shoot(browser, name)


def test_approve_the_pending_plan_then_restore_a_row(scene, receiver, browser):
    base = receiver.base
    open_page(browser, base, "/ui/pending")
    if browser.current_url.startswith(f"{base}/ui/login"):
        submit(browser, "/ui/login", token=ADMIN_TOKEN)
    assert scene.apps() == 47
    submit(browser, "/ui/pending/1/approve")
    assert browser.current_url == f"{base}/ui/pending"
    assert flash(browser) == ["plan 1 approved: 41 of 41 rows removed"]
    assert scene.apps() == 6

    open_page(browser, base, "/ui/removals")
    restore = browser.find_elements("css selector", 'form[action^="/ui/removals/"] button')
    assert len(restore) == 41
    action = browser.find_elements("css selector", 'form[action^="/ui/removals/"]')[0].get_attribute("action")
    audit_id = int(action.rsplit("/", 2)[-2])
    press(browser, restore[0])
    (message,) = flash(browser)
    assert message.startswith(f"audit entry {audit_id} restored: row ") and "held (hold 1)" in message
    assert scene.apps() == 7 and scene.count(store.holds, store.holds.c.source == "restore") == 1
    shoot(browser, "removals")
    assert open_page(browser, base, "/ui/holds") == "Holds"
    assert f"restored from audit entry {audit_id}" in browser.page_source
    shoot(browser, "holds")


def test_reading_with_ui_public_needs_no_token_and_an_action_without_it_is_refused(scene, receiver, browser):
    with serving(scene.env(CLEANUP_UI_PUBLIC="true"), scene.tmp / "public.log") as public:
        browser.delete_all_cookies()  # a fresh session: never logged in
        assert open_page(browser, public.base, "/ui") == "Status · table apps"
        assert "reading only" in browser.find_element("css selector", "header .who").text
        assert open_page(browser, public.base, "/ui/removals") == "Removals · newest first"
        assert "every action needs a" in browser.page_source
        open_page(browser, public.base, "/ui/holds")
        holds, apps = scene.count(store.holds), scene.apps()
        submit(browser, "/ui/holds", vmid="130", reason="not logged in")
        assert browser.find_element("tag name", "h1").text == "401 Unauthorized"
        assert "log in with the admin token first" in browser.page_source
        assert (scene.count(store.holds), scene.apps()) == (holds, apps)
