"""The chassis's promises, checked in a few seconds. Owned by the template: a template update
rewrites this file. The chassis's full suite runs in the template's own CI.

The worker here runs the chassis's demo job (``--app demo``), whose senders choose failures, so
these checks do not depend on your job model.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from typing import Any

from {{ cookiecutter.__package_name }}.runtime.binding import load_app
from {{ cookiecutter.__package_name }}.runtime.errors import Reject
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob
from {{ cookiecutter.__package_name }}.runtime.testing import Outcome, WorkerUnderTest

PACKAGE = "{{ cookiecutter.__package_name }}"


def run(*steps: Any) -> list[Outcome]:
    """Each step is a DemoJob or raw bytes; all go through one demo worker."""
    demo = load_app("demo")

    async def reject_on_request(job: DemoJob, ctx: Any) -> None:
        if job.item == "reject":
            raise Reject("refused on request")
        await demo.handler(job, ctx)

    async def go() -> list[Outcome]:
        app = type(demo)("demo", demo.job_model, reject_on_request)
        async with WorkerUnderTest(app) as worker:
            return [
                await (worker.process_raw(s) if isinstance(s, bytes) else worker.process(s))
                for s in steps
            ]

    return asyncio.run(go())


def test_jobs_are_acked_retried_and_dead_lettered_as_promised() -> None:
    ok, flaky, exhausted, rejected, malformed = run(
        DemoJob(id="ok"),
        DemoJob(id="flaky", fail_times=1),
        DemoJob(id="exhausted", fail_times=99),
        DemoJob(id="rejected", item="reject"),
        b'{"id": 42',
    )
    assert (ok.status, ok.attempts) == ("acked", 1)
    assert (flaky.status, flaky.attempts) == ("acked", 2)
    # MAX_DELIVER=3 in the testing kit
    assert (exhausted.status, exhausted.dlq_reason, exhausted.attempts) == (
        "dead_lettered",
        "exhausted",
        3,
    )
    assert (rejected.status, rejected.dlq_reason, rejected.attempts) == (
        "dead_lettered",
        "rejected",
        1,
    )
    # never reached a handler
    assert (malformed.status, malformed.dlq_reason, malformed.attempts) == (
        "dead_lettered",
        "invalid",
        0,
    )


def test_the_readme_demo_runs_end_to_end(tmp_path: Any) -> None:
    """`run --embedded-nats --demo 3`: real nats-server, jobs published, handled, exit 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", PACKAGE, "run", "--embedded-nats", "--demo", "3"],
        cwd=tmp_path,
        env={**os.environ, "HEALTH_PORT": "0", "NATS_URL": f"nats://127.0.0.1:{port}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo: 3 jobs handled" in result.stderr
