"""The dashboard in headless Chromium (Debian's chromium + chromedriver, driven by selenium)
against a real API and database: the page loads without console errors, every chart and
list shows the API's data, the token reaches the API; a screenshot is kept in
tests/artifacts/ for a person to look at."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_harness import RunningApi, Traffic, api_settings, event

from socks5_analytics.storage import NodeReport

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN = "dashboard-token-of-the-tests"
DEADLINE = 30.0

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Debian chromium and chromium-driver are not installed (make system-deps)",
)

NOW = datetime.now(UTC).replace(second=0, microsecond=0)


def _traffic() -> Traffic:
    t = Traffic()
    domains = [("www.example.com", "example.com"), ("cdn.example.net", "example.net"),
               ("api.example.com", "example.com"), ("news.example.org", "example.org")]
    for n in range(120):
        domain, registered = domains[n % len(domains) if n % 3 else 0]
        t.events.append(event(
            NOW - timedelta(minutes=5 * n + 1),
            domain=domain, dest_host=domain, registered_domain=registered,
            source_ip=ip_address(f"192.0.2.{10 + n % 5}"),
            user_name=("alice", "bob", "")[n % 3],
            connect_ms=float(5 + (n * 37) % 400), bytes_in=10_000 * (1 + n % 7),
            bytes_out=1_000 * (1 + n % 4),
            status="ok" if n % 10 else "refused",
        ))
    t.nodes = [NodeReport(node_id="node-a", version="0.1.0", started_at=NOW - timedelta(hours=3),
                          last_seen=NOW, policy_version="p-1a2b3c", active_connections=7)]
    return t


TRAFFIC = _traffic()


@pytest.fixture(scope="module")
def api(database_url: str) -> Iterator[RunningApi]:
    TRAFFIC.store(database_url, now=NOW)
    with RunningApi(api_settings(database_url, token=TOKEN)) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="s5a-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1800",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver: selenium must not look for (or download) one of its own.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(browser: Any, script: str, what: str) -> Any:
    """Poll a JavaScript expression until it is truthy, with a deadline."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = browser.execute_script(f"return {script}")
        if value:
            return value
        browser.execute_async_script(
            "const done = arguments[arguments.length - 1]; requestAnimationFrame(() => done())")
    raise AssertionError(f"timed out waiting for {what}")


def test_dashboard_draws_the_api_data(api: RunningApi, browser: Any) -> None:
    browser.get(f"{api.url}/dashboard#token={TOKEN}")
    wait_for(browser, "window.s5aDashboard && window.s5aDashboard.refreshes > 0",
             "the first refresh")
    errors = browser.execute_script("return window.s5aDashboard.errors")
    assert errors == []
    data = browser.execute_script("return window.s5aDashboard.data")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    span = {"from": data["span"]["from"], "to": data["span"]["to"]}
    with httpx.Client(base_url=api.url, headers=headers) as http:
        assert data["traffic"] == http.get("/stats/traffic", params=span).json()
        assert data["domains"] == http.get("/stats/top-domains", params=span).json()

    # the charts hold the API's series
    charted = browser.execute_script("""
        const c = window.s5aDashboard.charts;
        return {bytes: c.bytes.data, connections: c.connections.data, latency: c.latency.data};
    """)
    points = data["traffic"]["points"]
    assert charted["bytes"][1] == [p["bytes_in"] for p in points]
    assert charted["bytes"][2] == [p["bytes_out"] for p in points]
    assert charted["connections"][1] == [p["connections"] for p in points]
    assert sum(charted["connections"][1]) == len(TRAFFIC.events)
    assert any(v is not None for v in charted["latency"][1])
    # canvases were drawn
    assert browser.execute_script(
        "return document.querySelectorAll('#chart-bytes canvas, #chart-latency canvas').length"
    ) == 2

    # the lists and the nodes table show what the API said
    def texts(selector: str) -> list[str]:
        return browser.execute_script(
            f"return [...document.querySelectorAll({selector!r})].map(e => e.textContent)")

    assert texts("#list-domains .key") == [i["domain"] for i in data["domains"]["items"]]
    assert texts("#list-registered .key") == [i["domain"] for i in data["registered"]["items"]]
    assert texts("#list-sources .key") == [i["source_ip"] for i in data["sources"]["items"]]
    assert texts("#list-users .key") == [i["user"] or "(no authentication)"
                                         for i in data["users"]["items"]]
    assert set(texts("#list-statuses .key")) == {"ok", "refused"}
    assert texts("#nodes tbody td")[:4] == ["node-a", "0.1.0", "p-1a2b3c", "7"]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    # The page itself comes with the route's 401 (a browser cannot send the token when it
    # opens a page); nothing else may fail.
    page_401 = [entry for entry in problems if entry["message"].startswith(
        f"{api.url}/dashboard#token=") and "status of 401" in entry["message"]]
    assert len(page_401) == 1
    assert [entry for entry in problems if entry not in page_401] == []


def test_dashboard_asks_for_a_token(api: RunningApi, browser: Any) -> None:
    browser.get(f"{api.url}/dashboard")
    browser.execute_script("localStorage.clear(); location.reload()")
    wait_for(browser, "window.s5aDashboard && window.s5aDashboard.errors.length > 0",
             "the 401")
    assert browser.execute_script("return document.getElementById('token-dialog').open")
    browser.get_log("browser")  # the 401s are expected here


def test_docs_page_renders_the_document(api: RunningApi, browser: Any) -> None:
    browser.get("about:blank")
    browser.get_log("browser")  # what earlier pages left
    browser.get(f"{api.url}/docs#token={TOKEN}")
    wait_for(browser, "document.querySelectorAll('.op').length > 5", "the operations")
    paths = browser.execute_script(
        "return [...document.querySelectorAll('.op h2 code')].map(e => e.textContent)")
    assert {"/stats/top-domains", "/logs", "/nodes", "/healthz"} <= set(paths)
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []
