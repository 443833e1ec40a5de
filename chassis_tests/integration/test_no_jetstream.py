"""A server without JetStream is named as such: one line, exit 69 (the service is missing).

Regression: JetStream's API answers 503 with no code or description when JetStream is off, which
used to surface as "cannot provision stream X: None (code None)" and exit 73.
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
