"""The fleet view from the chassis's side: ``ecosystem`` finds a running worker by its micro
service and its stream's metadata (also a stream provisioned before that metadata existed), and
``dashboard`` serves its page, JSON and live events read-only, on loopback names only, and stops
cleanly with a viewer connected.

The session's server is shared with other tests, so each test looks only at its own stream.
The dashboard in a real browser, and a fleet of several generated workers, are the template's
tests (tests/test_dashboard.py, tests/test_fleet.py).
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from worker_testkit import PACKAGE, WorkerEnv, wait_until

from {{ cookiecutter.__package_name }}.runtime.names import JOB_TYPE, WORKER_NAME

pytestmark = pytest.mark.integration


def mine(report: dict[str, Any], stream: str) -> dict[str, Any] | None:
    return next((w for w in report["workers"] if w["stream"] == stream), None)


def fleet(worker_env: WorkerEnv) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(worker_env.cli_ok("ecosystem", "--json"))
    return report


@pytest.mark.timeout(90)
def test_ecosystem_shows_a_running_worker_from_its_stream_and_service(
    worker_env: WorkerEnv,
) -> None:
    worker_env.spawn(name="v1")
    meta = worker_env.stream_info().config.metadata or {}
    assert {k: meta.get(k) for k in ("worker", "subject_root", "job_type", "dlq_stream")} == {
        "worker": WORKER_NAME,
        "subject_root": worker_env.subject_root,
        "job_type": JOB_TYPE,
        "dlq_stream": worker_env.dlq_stream,
    }

    def live() -> dict[str, Any] | None:
        entry = mine(fleet(worker_env), worker_env.stream)
        return entry if entry and entry["live"] == 1 else None

    entry = wait_until(live, 30, "the worker in the fleet view")
    assert entry is not None
    assert entry["worker"] == WORKER_NAME
    assert entry["self"] is True
    assert entry["ingress"] == worker_env.ingress
    assert [(lane["lane"], lane["state"]) for lane in entry["lanes"]] == [("v1", "current")]
    assert entry["backlog"] == 0
    assert entry["dlq_messages"] == 0
    assert [s["lane"] for s in entry["services"]] == ["v1"]  # it answered $SRV.INFO
    assert [(c["previous"], c["lane"]) for c in entry["route_changes"]] == [(None, "v1")]

    text = worker_env.cli_ok("ecosystem")
    assert re.search(rf"^\* {re.escape(WORKER_NAME)}\s+{worker_env.stream}\s", text, re.M), text
    assert re.search(r"^\s+v1\s+current\s+100\s", text, re.M), text

    watched = worker_env.cli_ok("ecosystem", "--watch", "--count", "2", "--interval", "0.1")
    assert watched.count("fleet at ") == 2
    assert "\x1b[" not in watched  # not a terminal: views one after another, no redraw codes
    lines = worker_env.cli_ok("ecosystem", "--json", "--count", "2", "--interval", "0.1")
    views = [json.loads(line) for line in lines.splitlines()]
    assert len(views) == 2  # JSON lines: one document per view
    assert all(mine(view, worker_env.stream) for view in views)


@pytest.mark.timeout(60)
def test_a_stream_without_the_new_metadata_is_read_from_its_subjects(
    worker_env: WorkerEnv,
) -> None:
    worker_env.provision()

    async def strip(js: JetStreamContext) -> None:  # as a template before the fleet view left it
        config = (await js.stream_info(worker_env.stream)).config
        config.metadata = {"worker": WORKER_NAME}
        await js.update_stream(config)

    worker_env.js(strip)
    entry = mine(fleet(worker_env), worker_env.stream)
    assert entry is not None
    assert (entry["subject_root"], entry["job_type"]) == (worker_env.subject_root, JOB_TYPE)
    assert entry["dlq"] == {"stream": worker_env.dlq_stream, "messages": 0}
    assert "metadata" in worker_env.provision()  # the next provision writes it back
    assert (worker_env.stream_info().config.metadata or {}).get("job_type") == JOB_TYPE


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ecosystem", "--count", "0"], "--count"),
        (["ecosystem", "--interval", "0"], "--interval"),
        (["dashboard", "--port", "70000"], "--port"),
    ],
)
def test_bad_fleet_options_exit_65_in_one_line(
    worker_env: WorkerEnv, args: list[str], needle: str
) -> None:
    result = worker_env.run_cli(args)
    assert result.returncode == 65, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr


def request(
    port: int, path: str, method: str = "GET", host: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Host": host} if host else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.mark.timeout(90)
def test_the_dashboard_serves_the_fleet_read_only_and_stops_with_a_viewer(
    worker_env: WorkerEnv, tmp_path: Path
) -> None:
    worker_env.spawn(name="v1")
    log = tmp_path / "dashboard.log"
    with log.open("wb") as out:
        board = subprocess.Popen(
            [sys.executable, "-m", PACKAGE, "--app", "demo", "dashboard", "--port", "0"],
            env=worker_env.environ(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    viewer = None
    try:

        def address() -> int | None:
            found = re.search(r"dashboard on http://127\.0\.0\.1:(\d+)/", log.read_text())
            return int(found.group(1)) if found else None

        port = wait_until(address, 30, "the dashboard's address")
        assert port is not None
        status, headers, page = request(port, "/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert "script-src 'sha256-" in headers["Content-Security-Policy"]
        assert b"new EventSource(" in page

        def listed() -> dict[str, Any] | None:
            _, _, body = request(port, "/api/fleet")
            entry = mine(json.loads(body), worker_env.stream) if body else None
            return entry if entry and entry["live"] == 1 else None

        entry = wait_until(listed, 30, "the worker in /api/fleet")
        assert entry is not None
        assert entry["lanes"][0]["state"] == "current"
        assert request(port, "/", "POST")[0] == 405  # read-only
        assert request(port, "/", host="attacker.example:80")[0] == 421  # DNS rebinding
        assert request(port, "/nothing")[0] == 404

        viewer = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        viewer.request("GET", "/events")
        events = viewer.getresponse()
        assert events.headers["Content-Type"] == "text/event-stream"
        first = b""
        while not first.startswith(b"data: "):
            first = events.fp.readline()
        assert mine(json.loads(first[len(b"data: ") :]), worker_env.stream) is not None

        board.send_signal(signal.SIGTERM)  # with the viewer still connected
        assert board.wait(15) == 0, log.read_text()
    finally:
        if viewer is not None:
            viewer.close()
        if board.poll() is None:
            board.kill()
            board.wait(10)
