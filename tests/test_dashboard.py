"""The fleet dashboard in a real headless browser (Debian's chromium, driven by selenium through
the system chromedriver), on a real nats-server with running workers.

The page is opened once; a ``route v2`` given through the worker's CLI must then show on it
without a reload (its Server-Sent Events), as must the old lane draining. Without chromium and
chromedriver the test skips locally (``apt-get install -y chromium chromium-driver``) and fails
under CI=true, whose .ci/run installs them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Baker
from .fleet_support import (
    Process,
    cli,
    fleet,
    live_lanes,
    nats_server,
    ok,
    start,
    wait_for,
)
from .test_generated_suite import InstalledProject, install_layered

pytestmark = pytest.mark.slow

WORKER = "dash-probe"
# the same worker's second deployment on the account (a staging stream next to production)
STAGING = {
    "SUBJECT_ROOT": "staging",
    "STREAM_NAME": "DASH_PROBE_STAGING",
    "DLQ_STREAM_NAME": "DASH_PROBE_STAGING_DLQ",
}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "no chromium/chromedriver on PATH: apt-get install -y chromium chromium-driver "
            "(.ci/run installs them)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def lane_state(chrome: Any, stream: str, lane: str) -> str | None:
    """What the page shows for ``lane`` of the worker reading ``stream`` (None: no such row).

    Read in one script call: the page redraws its cards on every update, so an element found
    by one WebDriver call may be gone by the next."""
    state: str | None = chrome.execute_script(
        "const row = document.querySelector(arguments[0]);return row ? row.dataset.state : null;",
        f'section[data-stream="{stream}"] tr[data-lane="{lane}"]',
    )
    return state


def dashboard_url(process: Process) -> str | None:
    for line in process.lines():
        found = re.search(r"dashboard on (http://\S+/)", line)
        if found:
            return found.group(1)
    return None


@pytest.mark.timeout(300)
def test_a_route_switch_shows_on_the_open_page(bake: Baker, tmp_path: Path, browser: Any) -> None:
    project: InstalledProject = install_layered(bake.fresh(worker_name=WORKER), tmp_path / "venv")
    stream = project.baked.context["__stream_name"]
    with nats_server(tmp_path / "store") as url:
        processes: list[Process] = []

        def live() -> set[str]:
            return live_lanes(fleet(project, url), WORKER, stream)

        try:
            processes.append(
                start(project, url, tmp_path / "v1.log", "run", env={"LANE": "v1"}, name="v1")
            )
            wait_for(lambda: live() == {"v1"}, 60, "v1 live")  # the first to start gets the route
            processes.append(
                start(project, url, tmp_path / "v2.log", "run", env={"LANE": "v2"}, name="v2")
            )
            staging = {"LANE": "v1", **STAGING}
            processes.append(
                start(project, url, tmp_path / "staging.log", "run", env=staging, name="staging")
            )
            wait_for(lambda: live() == {"v1", "v2"}, 60, "both lanes live")
            board = start(
                project, url, tmp_path / "dashboard.log", "dashboard", "--port", "0", name="board"
            )
            processes.append(board)
            address = wait_for(lambda: dashboard_url(board), 30, "the dashboard's address")

            browser.get(address)
            wait_for(lambda: lane_state(browser, stream, "v1") == "current", 30, "v1 current")
            assert lane_state(browser, stream, "v2") == "inactive"
            wait_for(
                lambda: lane_state(browser, STAGING["STREAM_NAME"], "v1") == "current",
                30,
                "the staging deployment's card",
            )
            assert "live" in browser.find_element("id", "conn").text
            browser.execute_script("window.sameDocument = true")  # gone after any reload
            browser.save_screenshot(str(tmp_path / "before.png"))

            ok(cli(project, url, "route", "v2"))
            wait_for(lambda: lane_state(browser, stream, "v2") == "current", 30, "v2 current")
            browser.save_screenshot(str(tmp_path / "switched.png"))
            wait_for(
                lambda: lane_state(browser, stream, "v1") in ("draining", "drained"),
                30,
                "v1 draining or drained",
            )
            # the v1 instance retires once its lane is drained: the page shows that too
            wait_for(
                lambda: lane_state(browser, stream, "v1") == "drained" and not processes[0].alive(),
                60,
                "v1 drained and its instance retired",
            )
            browser.save_screenshot(str(tmp_path / "after.png"))
            assert browser.execute_script("return window.sameDocument") is True
            assert lane_state(browser, STAGING["STREAM_NAME"], "v1") == "current"
            text = browser.find_element("tag name", "body").text
            assert "v1 \u2192 v2" in text, text  # the route change, listed on the card
        finally:
            codes = {p.name: p.stop() for p in processes}
        assert codes == {name: 0 for name in codes}, codes
