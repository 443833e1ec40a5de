"""Known chassis bugs, each pinned by a focused test that fails until the chassis is fixed.

Kept apart on purpose, and nothing here is skipped or xfailed to hide it. Once a bug is fixed,
move its test next to the tests of the same feature (the earlier ones now live in
test_connect_timeout.py, test_broker_restart.py and test_worker_cli.py).

A server without JetStream gets a meaningless error and the wrong exit code. JetStream's API
answers 503 (ServiceUnavailableError, with no code or description) when JetStream is not
enabled. ``topology._raise_api`` turns that into ProvisionError "cannot provision stream X: None
(code None)" and exit 73, which documents "exists with settings JetStream cannot change"; the
CLI's ``_explain_nats_error`` prints "NATS error: nats: ServiceUnavailableError: code=None
err_code=None description='None'". Neither says what to do: enable JetStream (``-js``). The
server is reachable but the service is not available: exit 69.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from worker_testkit import NatsServer, WorkerEnv

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_a_server_without_jetstream_is_named_as_such(worker_env: WorkerEnv, tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "no-jetstream", jetstream=False).start()
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for args in (["run"], ["provision"], ["status"], ["dlq", "list"]):
            results[" ".join(args)] = worker_env.run_cli(
                args, env={"NATS_URL": server.url, "NATS_CONNECT_TIMEOUT": 2}
            )
    finally:
        server.stop()
    problems = []
    for command, result in results.items():
        lines = result.stderr.strip().splitlines()
        line = lines[-1] if lines else ""
        if result.returncode != 69 or len(lines) != 1 or "JetStream" not in line or "None" in line:
            problems.append(f"{command!r}: exit {result.returncode}: {result.stderr.strip()}")
    assert not problems, "\n".join(problems)
