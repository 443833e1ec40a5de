"""Regression: an unreachable server at startup gives one line and exit 69, not a hang.

(Was a chassis bug, fixed in runtime/connection.py.)

Unreachable NATS at startup never gives up. ``connection.connect`` passes
``max_reconnect_attempts=-1`` (right for a running worker) to ``nats.connect``, and nats-py applies
that option to the *initial* connect too: ``_select_next_server`` then retries forever and never
raises, so the ``NATS_CONNECT_TIMEOUT`` deadline (checked only after an exception) is never
reached. ``run`` (and ``status``, ``publish``, ``dlq``...) hang instead of exiting 69, printing a
``nats error`` warning every half second.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from worker_testkit import PACKAGE, WorkerEnv, free_port

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["run"]])
def test_unreachable_nats_exits_69_within_the_connect_timeout(
    worker_env: WorkerEnv, command: list[str]
) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    env = worker_env.environ(NATS_URL=closed, NATS_CONNECT_TIMEOUT=1, LOG_LEVEL="INFO")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", PACKAGE, "--app", "demo", *command],
        env=env,
        cwd=worker_env.workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            _, stderr = proc.communicate(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate(timeout=10)
            lines = stderr.splitlines()
            pytest.fail(
                f"'{' '.join(command)}' still running 8 s after NATS_CONNECT_TIMEOUT=1 with "
                f"nothing at {closed}; {len(lines)} stderr lines, the last:\n"
                + "\n".join(lines[-3:])
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    took = time.monotonic() - started
    assert proc.returncode == 69, stderr
    assert took < 6, f"took {took:.1f}s for NATS_CONNECT_TIMEOUT=1"
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"one line for the operator, got {len(lines)}:\n{stderr}"
    assert "cannot reach NATS" in lines[0]
    assert closed in lines[0]
