"""The dashboard and the compliance report in a real browser: Debian's
Chromium, headless, driven over the Chrome DevTools protocol by
Playwright. Pages must load without console errors, follow the run as it
commits, and show an auditor pseudonyms only. Screenshots for the README
go to target/screenshots."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

from conftest import MNIST, SCREENSHOTS, binary, dashboard_url, enroll_as, need, run, token
from local_server import eventually

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def browser():
    chromium = need("chromium", "chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class Page:
    """A page that records every console error and uncaught exception."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def number(self, selector: str) -> int:
        text = self.page.inner_text(selector).strip()
        return int(text) if text.isdigit() else -1

    def points(self, chart: str) -> int:
        return int(self.page.get_attribute(f"#{chart}", "data-points") or 0)

    def wait(self, check, timeout: float = 60):
        # Polls from Python so Playwright's own waits need no CSP exception.
        eventually(check, timeout, every=0.2)


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_a_covey_sim_run_updates_the_dashboard_live(browser, tmp_path):
    # Output to a file: a pipe nobody reads would fill and stall the run.
    log = tmp_path / "sim.err"
    with open(log, "w") as err:
        sim = subprocess.Popen(
            [binary("covey-sim"), "--model", "logreg", "--clients", "4", "--rounds", "100000",
             "--dashboard", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        def printed_url():
            return re.search(r"^dashboard: (\S+)$", log.read_text(), re.M)
        eventually(lambda: printed_url() or sim.poll() is not None, 60)
        assert printed_url(), f"covey-sim printed no dashboard URL: {log.read_text()[-2000:]}"
        url = printed_url().group(1)
        page = Page(browser)
        page.page.goto(url)
        page.wait(lambda: page.number("#version") >= 1)
        first_version, first_points = page.number("#version"), page.points("accuracy-chart")
        # Without reloading, the version and the accuracy curve move on.
        page.wait(lambda: page.number("#version") >= first_version + 3)
        page.wait(lambda: page.points("accuracy-chart") >= first_points + 3)
        assert "Live" in page.page.inner_text("#feed-state")
        audit = page.page.inner_text("#audit-state").lower()
        assert "entries verified" in audit and "not" not in audit, audit
        shot(page, "dashboard-sim")
        assert page.errors == [], page.errors
    finally:
        sim.kill()
        sim.wait()


def test_an_auditor_signed_in_sees_pseudonyms_only(browser, federation):
    federation.init("--model", "logreg", "--rounds", "100000", "--clients-per-round", "2",
                    "--test-data", str(MNIST))
    names = ["alice-phone", "bob-laptop"]
    devices = [federation.enroll(n) for n in names]
    auditor = enroll_as(federation, "audit-desk", "auditor")
    operator = enroll_as(federation, "ops-desk", "operator")
    federation.start()
    clients = [federation.rust_client(d, MNIST) for d in devices]
    url = dashboard_url(federation)
    try:
        page = Page(browser)
        page.page.goto(url + "login")
        page.page.fill("#token", token(federation, auditor))
        page.page.click("button[type=submit]")
        page.wait(lambda: "signed in as auditor" in page.page.inner_text("#viewer"))
        page.wait(lambda: page.number("#version") >= 2)
        body = page.page.inner_text("body")
        assert not any(n in body for n in names + ["audit-desk", "ops-desk"]), body
        assert re.search(r"c-[0-9a-f]{16}", body), "pseudonyms are listed"
        assert "(hidden)" in body
        shot(page, "dashboard-auditor")

        # The same page for an operator names the devices: the check above
        # would have seen them.
        ops = Page(browser)
        ops.page.goto(url + "login")
        ops.page.fill("#token", token(federation, operator))
        ops.page.click("button[type=submit]")
        ops.wait(lambda: "signed in as operator" in ops.page.inner_text("#viewer"))
        ops.wait(lambda: "alice-phone" in ops.page.inner_text("#devices"))

        # A wrong token is refused on the login page itself.
        bad = Page(browser)
        bad.page.goto(url + "login")
        bad.page.fill("#token", "covey-login-" + "0" * 64)
        bad.page.click("button[type=submit]")
        assert "unknown or revoked login" in bad.page.inner_text(".problem")

        # Signing out ends the auditor's login.
        page.page.click("#sign-out button")
        page.page.wait_for_url(url + "login")
        assert page.errors == [], page.errors
        assert ops.errors == [], ops.errors
    finally:
        federation.server.send_signal(signal.SIGINT)
        federation.server.wait(timeout=60)
        for c in clients:
            c.kill()
            c.wait()


def test_the_compliance_report_renders_cleanly(browser, federation):
    federation.init("--model", "logreg", "--rounds", "4", "--clients-per-round", "2",
                    "--test-data", str(MNIST))
    devices = [federation.enroll(f"device-{i}") for i in range(2)]
    federation.start()
    clients = [federation.rust_client(d, MNIST) for d in devices]
    assert federation.finish()["final_version"] == 4
    for c in clients:
        c.wait(timeout=60)
    out = federation.root / "report"
    run([binary("covey-server"), "report", "--dir", federation.dir, "--out", out])
    page = Page(browser)
    page.page.goto((out / "report.html").as_uri())
    text = page.page.inner_text("body")
    assert re.search(r"Generated \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text[:300]
    assert "unix time" not in text
    assert page.page.locator("svg").count() == 3
    # Round axes carry whole rounds only: in each plot, the numeric labels
    # on the lowest row are the x axis's ticks.
    plots = page.page.eval_on_selector_all("svg", """svgs => svgs.map(svg =>
        [...svg.querySelectorAll("text")].map(t => [t.textContent.trim(),
            t.getBoundingClientRect().top]))""")
    for labels in plots:
        numeric = [(text, top) for text, top in labels if re.fullmatch(r"-?\d+(\.\d+)?", text)]
        bottom = max(top for _, top in numeric)
        x_ticks = [text for text, top in numeric if abs(top - bottom) < 2]
        assert len(x_ticks) >= 2 and all(t.isdigit() for t in x_ticks), x_ticks
    shot(page, "report")
    assert page.errors == [], page.errors
