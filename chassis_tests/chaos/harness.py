"""The chaos suite's moving parts: worker processes, a fault-tolerant load publisher, accounting.

* :class:`Fleet` -- worker processes (``python -m <package> run``) on one test-unique stream of
  the cluster, each in its own process group with its JSON log in a file; ``kill -9``, SIGTERM,
  replacements, and the worker CLI (``route``, ``dlq list --json``, ``status --json``);
* :class:`LoadPublisher` -- unique jobs at a steady rate from a background thread. A publish that
  fails (no responders or a timeout while the stream elects a leader) is retried with the *same*
  ``Nats-Msg-Id``, so the stream's duplicate window keeps it exactly-once in the stream; retries
  and final failures are counted;
* :func:`account` -- lost = published ids with neither a ``job done`` line nor a DLQ entry;
  duplicates (at-least-once) classified by cause; DLQ entries checked for a reason.

Every loop here is bounded in count and time; everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client

import {{ cookiecutter.__package_name }} as package
from {{ cookiecutter.__package_name }}.runtime.names import JOB_TYPE, WORKER_NAME
from {{ cookiecutter.__package_name }}.runtime.settings import Settings

from .cluster import (
    NatsCluster,
    consumer_leader,
    js_api,
    move_consumer_leader,
    move_stream_leader,
    poll,
    stream_leader,
)

PACKAGE = package.__name__
Record = dict[str, Any]
T = TypeVar("T")

# Worker settings for the chaos runs: R3 everywhere, short ack wait so a lost ack or a killed
# worker shows up as a redelivery within seconds, fast registry/lane timings.
CHAOS_ENV: dict[str, str] = {
    "STREAM_REPLICAS": "3",
    "CONCURRENCY": "16",
    "ACK_WAIT": "2",
    "MAX_DELIVER": "5",
    "BACKOFF": "0.2,0.5,1",
    "HANDLER_TIMEOUT": "30",
    "DRAIN_TIMEOUT": "10",
    "HEARTBEAT_INTERVAL": "1",
    "INSTANCE_TTL": "4",
    "RETIRE_GRACE": "1",
    "ROUTE_CHECK_INTERVAL": "3",
    "HEALTH_PORT": "0",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "DEBUG",
    "NATS_CONNECT_TIMEOUT": "15",
    "PYTHONUNBUFFERED": "1",
}


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass(frozen=True)
class Knobs:
    """Load size: CI defaults, or CHAOS_DURATION / CHAOS_RATE for a longer, heavier run."""

    duration: float
    rate: float

    @property
    def timeout(self) -> float:
        """A per-test bound for pytest-timeout that grows with the load duration."""
        return 150 + 4 * self.duration


def knobs(default_duration: float = 10.0, default_rate: float = 250.0) -> Knobs:
    return Knobs(
        duration=env_float("CHAOS_DURATION", default_duration),
        rate=env_float("CHAOS_RATE", default_rate),
    )


def parse_ts(ts: object) -> float:
    """The JSON log's ``ts`` (UTC, millisecond precision) as epoch seconds; 0.0 if absent."""
    if not isinstance(ts, str) or len(ts) < 20:
        return 0.0
    try:
        base = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
        return base + int(ts[20:23]) / 1000.0
    except ValueError:
        return 0.0


def _inherited_env() -> dict[str, str]:
    """This environment minus anything the worker reads as a setting (no developer NATS_URL)."""
    settings_vars = {name.upper() for name in Settings.model_fields}
    drop = settings_vars | {"OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"}
    return {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in drop and not k.upper().startswith("OTEL_")
    }


# --------------------------------------------------------------------------------- workers


class WorkerProc:
    """One ``run`` process in its own process group; its log is parsed as JSON lines."""

    def __init__(self, name: str, lane: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.lane = lane
        self.proc = proc
        self.log_path = log
        self.started_at = time.time()
        self.killed_at: float | None = None  # wall time of a SIGKILL from the test
        self.termed_at: float | None = None
        self._offset = 0
        self._partial = b""
        self._records: list[Record] = []
        self._done: list[Record] = []

    def __repr__(self) -> str:
        return f"WorkerProc({self.name}, lane={self.lane}, pid={self.proc.pid})"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def records(self) -> list[Record]:
        with self.log_path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            text = line.decode("utf-8", "replace").strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                record = {"msg": text, "raw": True}
            record["_t"] = parse_ts(record.get("ts"))
            record["_worker"] = self.name
            self._records.append(record)
            if record.get("msg") == "job done":
                self._done.append(record)
        return self._records

    def done(self) -> list[Record]:
        self.records()
        return self._done

    def matching(self, prefix: str) -> list[Record]:
        return [r for r in self.records() if str(r.get("msg", "")).startswith(prefix)]

    def tail(self, lines: int = 12) -> str:
        return "\n".join(
            f"  [{self.name}] {r.get('level', '?')} {r.get('msg')}" for r in self.records()[-lines:]
        )

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:g}s:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the process group and reap; safe to call any number of times."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@dataclass
class Fleet:
    """Worker processes of one deployment (a stream of its own) on the cluster."""

    cluster: NatsCluster
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workers: list[WorkerProc] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return f"CHAOS_{self.tag.upper()}"

    @property
    def dlq_stream(self) -> str:
        return f"{self.stream}_DLQ"

    @property
    def subject_root(self) -> str:
        return f"chaos-{self.tag}"

    @property
    def ingress(self) -> str:
        return f"{self.subject_root}.jobs.{JOB_TYPE}"

    def consumer(self, lane: str = "v1") -> str:
        return f"{WORKER_NAME}-{lane}"

    def env(self, **overrides: str) -> dict[str, str]:
        env = _inherited_env()
        env.update(CHAOS_ENV)
        env.update(
            NATS_URL=self.cluster.url,
            STREAM_NAME=self.stream,
            DLQ_STREAM_NAME=self.dlq_stream,
            SUBJECT_ROOT=self.subject_root,
            LANE="v1",
        )
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def start(self, name: str, lane: str = "v1", **env: str) -> WorkerProc:
        instance = f"{name}-{self.tag}"
        log = self.workdir / f"{instance}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", PACKAGE, "--app", "demo", "run"],
                env=self.env(LANE=lane, INSTANCE_ID=instance, NATS_NAME=instance, **env),
                cwd=self.workdir,  # no developer .env is read
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        worker = WorkerProc(instance, lane, proc, log)
        self.workers.append(worker)
        return worker

    def wait_started(self, *workers: WorkerProc, timeout: float = 30.0) -> None:
        """Until each worker logged ``started`` (connected, provisioned, bound)."""

        def check() -> bool:
            for worker in workers:
                if not worker.alive:
                    raise AssertionError(f"{worker.name} exited early:\n{worker.tail()}")
            return all(w.matching("started ") for w in workers)

        poll(check, timeout, f"{', '.join(w.name for w in workers)} started", interval=0.1)

    def kill9(self, worker: WorkerProc) -> None:
        worker.killed_at = time.time()
        worker.kill()
        self.cluster.note(f"kill -9 worker {worker.name}")

    def terminate(self, worker: WorkerProc, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the drain; the exit code."""
        worker.termed_at = time.time()
        self.cluster.note(f"SIGTERM worker {worker.name}")
        worker.signal(signal.SIGTERM)
        code = worker.wait(timeout)
        self.cluster.note(f"worker {worker.name} exited {code}")
        return code

    def cli(
        self, *args: str, timeout: float = 60.0, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", PACKAGE, "--app", "demo", *args],
            input=stdin,
            env=self.env(LOG_LEVEL="WARNING"),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli_ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, (
            f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    def dlq_entries(self) -> list[Record]:
        entries: list[Record] = json.loads(self.cli_ok("dlq", "list", "--json"))
        return entries

    def done_records(self) -> list[Record]:
        return [r for w in self.workers for r in w.done()]

    def done_ids(self) -> set[str]:
        return {str(r.get("job_id")) for r in self.done_records()}

    def count(self, prefix: str) -> int:
        return sum(len(w.matching(prefix)) for w in self.workers)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()


# --------------------------------------------------------------------------------- load

GOOD, FAIL_ONCE, EXHAUSTED, INVALID = "good", "fail_once", "exhausted", "invalid"
SLOW, TIMEOUT = "slow", "timeout"  # a slow job that finishes; one that outlives HANDLER_TIMEOUT
TO_DLQ = {EXHAUSTED: "exhausted", INVALID: "invalid", TIMEOUT: "exhausted"}  # kind -> DLQ reason
DLQ_REASONS = {"exhausted": {"exhausted", "max_deliveries"}, "invalid": {"invalid"}}


def job_kind(n: int) -> str:
    """A fixed mix: 2% fail once then succeed, 0.5% always fail (DLQ), 0.5% invalid (DLQ)."""
    if n % 200 == 17:
        return EXHAUSTED
    if n % 200 == 113:
        return INVALID
    if n % 50 == 9:
        return FAIL_ONCE
    return GOOD


@dataclass
class Published:
    kind: str
    started: float  # wall time the first attempt started
    acked: float  # wall time the stream confirmed it
    attempts: int
    seq: int


class LoadPublisher:
    """Publish unique jobs at ``rate``/s for ``duration`` s from a background thread.

    ``work_seconds`` (a float or a function of the job number) goes into each job. Each publish is
    retried with the same ``Nats-Msg-Id`` (exponential pause, up to ``give_up_after`` s) until the
    stream acknowledges it; ``retries`` counts the extra attempts, ``final_failures`` the ids given
    up on. The connection fails over between the cluster's nodes and pings every 2 s, so a
    publisher on a partitioned node moves on.
    """

    def __init__(
        self,
        urls: list[str],
        subject: str,
        *,
        rate: float,
        duration: float,
        work_seconds: float | Callable[[int], float] = 0.02,
        kinds: Callable[[int], str] = job_kind,
        prefix: str = "job",
        max_in_flight: int = 1024,
        attempt_timeout: float = 2.0,
        give_up_after: float = 45.0,
        keyed: Callable[[int], bool] | None = None,
    ) -> None:
        self.urls = urls
        self.subject = subject
        self.keyed = keyed  # which jobs go to <ingress>.<id> (as Producer sends them)
        self.rate = rate
        self.duration = duration
        self.work_seconds = work_seconds
        self.kinds = kinds
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.max_in_flight = max_in_flight
        self.attempt_timeout = attempt_timeout
        self.give_up_after = give_up_after
        self.published: dict[str, Published] = {}
        self.final_failures: dict[str, str] = {}
        self.retries = 0
        self.retried_ids: set[str] = set()
        self.retry_errors: Counter[str] = Counter()
        self.duplicate_acks = 0  # a retry whose first attempt had been stored after all
        self.attempted = 0
        self.started_at = 0.0
        self.finished_at = 0.0
        self.crash: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-publisher", daemon=True)

    def __enter__(self) -> LoadPublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float) -> None:
        if self._thread.ident is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"publisher still running after {timeout:g}s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def ids(self, *kinds: str) -> set[str]:
        items = dict(self.published).items()
        return {k for k, p in items if not kinds or p.kind in kinds}

    def ids_between(self, start: float, end: float) -> set[str]:
        """Jobs whose first attempt started after ``start`` and were stored before ``end``."""
        return {k for k, p in dict(self.published).items() if p.started > start and p.acked < end}

    def summary(self) -> str:
        took = max(1e-9, self.finished_at - self.started_at)
        return (
            f"published {len(self.published)} in {took:.1f}s ({len(self.published) / took:.0f}/s, "
            f"target {self.rate:g}/s); publish retries {self.retries} on "
            f"{len(self.retried_ids)} jobs {dict(self.retry_errors)}; duplicate acks on retry "
            f"{self.duplicate_acks}; final failures {len(self.final_failures)}"
        )

    def _payload(self, n: int, job_id: str, kind: str) -> bytes:
        work = self.work_seconds(n) if callable(self.work_seconds) else self.work_seconds
        if kind == INVALID:
            return json.dumps({"id": job_id, "quantity": 0}).encode()  # quantity must be >= 1
        fail = {FAIL_ONCE: 1, EXHAUSTED: 1000}.get(kind, 0)
        return json.dumps({"id": job_id, "work_seconds": work, "fail_times": fail}).encode()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as exc:  # surfaced through self.crash
            self.crash = repr(exc)

    async def _run(self) -> None:
        async def quiet(exc: Exception) -> None:
            return None

        nc = await nats.connect(
            servers=self.urls,
            connect_timeout=2,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            ping_interval=2,
            max_outstanding_pings=2,
            error_cb=quiet,
        )
        slots = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self.started_at = time.time()
        begin = loop.time()
        sent = 0
        total = int(self.rate * self.duration)
        try:
            # Paced at ``rate``; after a stall (an election) it catches up, within 2x duration.
            while not self._stop.is_set() and sent < total:
                elapsed = loop.time() - begin
                if elapsed >= 2 * self.duration:
                    break
                due = min(total, int(self.rate * elapsed) + 1)
                while sent < due and not self._stop.is_set():
                    await slots.acquire()
                    task = asyncio.create_task(self._publish_one(nc, sent, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                self.attempted = sent
                await asyncio.sleep(0.005)
            if tasks:
                await asyncio.wait(set(tasks), timeout=self.give_up_after + 10)
        finally:
            self.finished_at = time.time()
            await nc.close()

    async def _publish_one(self, nc: Client, n: int, slots: asyncio.Semaphore) -> None:
        js = nc.jetstream()
        job_id = f"{self.prefix}-{n:06d}"
        kind = self.kinds(n)
        data = self._payload(n, job_id, kind)
        headers = {"Nats-Msg-Id": job_id}
        subject = f"{self.subject}.{job_id}" if self.keyed and self.keyed(n) else self.subject
        started = time.time()
        deadline = time.monotonic() + self.give_up_after
        pause = 0.1
        attempts = 0
        try:
            while True:
                attempts += 1
                try:
                    ack = await js.publish(
                        subject, data, headers=headers, timeout=self.attempt_timeout
                    )
                except Exception as exc:  # no responders / timeout during an election, ...
                    if time.monotonic() + pause >= deadline:
                        self.final_failures[job_id] = repr(exc)
                        return
                    self.retries += 1
                    self.retried_ids.add(job_id)
                    self.retry_errors[type(exc).__name__] += 1
                    await asyncio.sleep(pause)
                    pause = min(1.0, pause * 2)
                    continue
                if ack.duplicate:
                    self.duplicate_acks += 1
                self.published[job_id] = Published(kind, started, time.time(), attempts, ack.seq)
                return
        finally:
            slots.release()


# --------------------------------------------------------------------------------- accounting


@dataclass
class Accounting:
    scenario: str
    published: int
    processed: int  # "job done" lines, duplicates included
    unique_processed: int
    lost: list[str]
    duplicates: dict[str, int]
    duplicate_causes: Counter[str]
    stored_twice: list[str]
    dlq: int
    dlq_reasons: Counter[str]
    dlq_without_reason: list[Record]
    dlq_reason_mismatch: list[str]
    wrongly_dead_lettered: list[str]
    poison_processed: list[str]
    unexpected: list[str]
    redelivered_done: int  # job done lines with attempt > 1 (retries and redeliveries)
    unplanned_redeliveries: int  # ... beyond the failures a job asked for (fail_once: 1)
    publisher: str
    stream_left: int
    facts: dict[str, object] = field(default_factory=dict)
    runtime_s: float = 0.0

    def line(self) -> str:
        return (
            f"{self.scenario}: published={self.published} processed={self.processed} "
            f"(unique {self.unique_processed}) lost={len(self.lost)} "
            f"duplicates={sum(n - 1 for n in self.duplicates.values())} "
            f"(jobs {len(self.duplicates)}: {dict(self.duplicate_causes)}) "
            f"DLQ={self.dlq} {dict(self.dlq_reasons)} runtime={self.runtime_s:.1f}s"
        )

    def report(self) -> str:
        out = [
            f"=== chaos accounting: {self.scenario}",
            f"  published (stored in the stream) : {self.published}",
            f"  processed ('job done' lines)     : {self.processed} "
            f"({self.unique_processed} unique ids, {self.redelivered_done} on attempt > 1, "
            f"{self.unplanned_redeliveries} of them redelivered by a fault)",
            f"  lost                             : {len(self.lost)} {self.lost[:5]}",
            f"  duplicate processing             : {sum(n - 1 for n in self.duplicates.values())} "
            f"extra runs of {len(self.duplicates)} jobs; causes {dict(self.duplicate_causes)}",
            f"  stored twice (dedup failure)     : {len(self.stored_twice)} "
            f"{self.stored_twice[:5]}",
            f"  DLQ entries                      : {self.dlq} by reason {dict(self.dlq_reasons)}",
            f"  DLQ entries without a reason     : {len(self.dlq_without_reason)}",
            f"  DLQ entries with the wrong reason: {len(self.dlq_reason_mismatch)}",
            f"  good jobs dead-lettered wrongly  : {len(self.wrongly_dead_lettered)} "
            f"{self.wrongly_dead_lettered[:5]}",
            f"  poison jobs reported done        : {len(self.poison_processed)}",
            f"  ids nobody published             : {len(self.unexpected)} {self.unexpected[:5]}",
            f"  messages left in the work stream : {self.stream_left}",
            f"  publisher                        : {self.publisher}",
        ]
        out += [f"  {key:<33}: {value}" for key, value in self.facts.items()]
        out.append(f"  runtime                          : {self.runtime_s:.1f}s")
        return "\n".join(out)


FAULT_WINDOW = (-1.0, 12.0)  # a first run this close to a fault had its ack lost to the fault


def _duplicate_cause(
    runs: list[Record], workers: dict[str, WorkerProc], faults: list[tuple[float, str]]
) -> str:
    first = runs[0]
    worker = workers.get(str(first.get("_worker")))
    t = float(first.get("_t") or 0.0)
    if worker is not None and worker.killed_at is not None and t <= worker.killed_at:
        return "first run's worker was SIGKILLed before its ack left"
    later_attempt = all(
        int(r.get("attempt") or 1) > int(first.get("attempt") or 1) for r in runs[1:]
    )
    near = [what for at, what in faults if at + FAULT_WINDOW[0] <= t <= at + FAULT_WINDOW[1]]
    kind = near[-1].split(" node ")[0].split(" worker ")[0] if near else ""
    lanes = {str(r.get("lane")) for r in runs}
    seqs = {r.get("stream_seq") for r in runs}
    if len(lanes) > 1 and len(seqs) == 1 and not later_attempt:
        # Seen on nats-server 2.15.1 with R3 streams: for a while after a route step changes
        # the lane consumers' filters, one stored job can be delivered by both consumers.
        return "delivered by two lane consumers after a route step (JetStream R3)"
    if later_attempt and near:
        return f"ack lost around a fault ({kind})"
    if near:  # the same delivery count twice: a new consumer leader had not seen the delivery
        return f"redelivered by a new consumer leader around a fault ({kind})"
    if later_attempt:
        return "redelivered after ack_wait, no fault nearby (unexplained)"
    return "same attempt delivered twice, no fault nearby (unexplained)"


def describe_duplicates(result: Accounting, fleet: Fleet, limit: int = 5) -> list[str]:
    """Each run of the first few duplicated jobs: when (relative to the first fault), where."""
    faults = [at for at, what in fleet.cluster.events if _is_fault(what)]
    origin = faults[0] if faults else 0.0
    runs: dict[str, list[Record]] = {}
    for record in fleet.done_records():
        if str(record.get("job_id")) in result.duplicates:
            runs.setdefault(str(record.get("job_id")), []).append(record)
    out: list[str] = []
    for job_id in sorted(runs)[:limit]:
        parts = [
            f"{r.get('_worker')}@{float(r['_t']) - origin:+.2f}s seq={r.get('stream_seq')} "
            f"attempt={r.get('attempt')}"
            for r in sorted(runs[job_id], key=lambda r: float(r["_t"]))
        ]
        out.append(f"{job_id}: " + " | ".join(parts))
    return out


def account(
    scenario: str,
    publisher: LoadPublisher,
    fleet: Fleet,
    dlq: list[Record],
    *,
    stream_left: int,
    started: float,
) -> Accounting:
    published = dict(publisher.published)
    workers = {w.name: w for w in fleet.workers}
    done = fleet.done_records()
    runs: dict[str, list[Record]] = {}
    for record in done:
        runs.setdefault(str(record.get("job_id")), []).append(record)
    for records in runs.values():
        records.sort(key=lambda r: float(r.get("_t") or 0.0))
    dlq_ids: dict[str, list[Record]] = {}
    for entry in dlq:
        dlq_ids.setdefault(str(entry.get("job_id") or entry.get("msg_id")), []).append(entry)
    faults = [(at, what) for at, what in fleet.cluster.events if _is_fault(what)]
    duplicates = {k: len(v) for k, v in runs.items() if len(v) > 1}
    causes: Counter[str] = Counter(_duplicate_cause(runs[k], workers, faults) for k in duplicates)
    stored_twice = sorted(k for k, v in runs.items() if len({r.get("stream_seq") for r in v}) > 1)
    good = {k for k, p in published.items() if p.kind not in TO_DLQ}
    poison = {k for k, p in published.items() if p.kind in TO_DLQ}
    return Accounting(
        scenario=scenario,
        published=len(published),
        processed=len(done),
        unique_processed=len(runs),
        lost=sorted(k for k in published if k not in runs and k not in dlq_ids),
        duplicates=duplicates,
        duplicate_causes=causes,
        stored_twice=stored_twice,
        dlq=len(dlq),
        dlq_reasons=Counter(str(e.get("reason")) for e in dlq),
        dlq_without_reason=[e for e in dlq if not e.get("reason")],
        dlq_reason_mismatch=sorted(
            k
            for k in poison
            for e in dlq_ids.get(k, [])
            # the server giving up first (a delivery lost to a fault) is exhaustion too
            if e.get("reason") not in DLQ_REASONS[TO_DLQ[published[k].kind]]
        ),
        wrongly_dead_lettered=sorted(k for k in good if k in dlq_ids),
        poison_processed=sorted(k for k in poison if k in runs),
        unexpected=sorted((set(runs) | set(dlq_ids)) - set(published)),
        redelivered_done=sum(1 for r in done if int(r.get("attempt") or 1) > 1),
        unplanned_redeliveries=sum(
            1
            for r in done
            if int(r.get("attempt") or 1) > 1 + _planned_failures(published, r.get("job_id"))
        ),
        publisher=publisher.summary(),
        stream_left=stream_left,
        runtime_s=time.time() - started,
    )


def _planned_failures(published: dict[str, Published], job_id: object) -> int:
    entry = published.get(str(job_id))
    return 1 if entry is not None and entry.kind == FAIL_ONCE else 0


def _is_fault(what: str) -> bool:
    return what.startswith(("kill -9", "SIGSTOP", "SIGTERM", "route ", "SIGCONT", "restarted"))


def wait_settled(
    publisher: LoadPublisher, fleet: Fleet, timeout: float, *, dlq_count: Callable[[], int]
) -> bool:
    """Until every stored good job has a ``job done`` line and every poison job a DLQ entry.

    Returns False at the deadline instead of failing: the accounting then says what is missing.
    """
    kinds = {p.kind for p in dict(publisher.published).values()}
    good = publisher.ids(*(kinds - set(TO_DLQ)))
    poison = len(publisher.ids(*(kinds & set(TO_DLQ))))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if good <= fleet.done_ids():
            with contextlib.suppress(Exception):
                if dlq_count() >= poison:
                    return True
        time.sleep(0.5)
    return False


# --------------------------------------------------------------------------------- admin


def admin(cluster: NatsCluster, fn: Callable[[Client], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run ``fn(nc)`` on a fresh admin connection to the cluster (from synchronous test code)."""

    async def go() -> T:
        nc = await cluster.connect()
        try:
            return await asyncio.wait_for(fn(nc), timeout)
        finally:
            await nc.close()

    return asyncio.run(go())


def consumer_facts(cluster: NatsCluster, stream: str) -> list[str]:
    """Each consumer's filters and positions: what a stranded job needs explained."""

    async def read(nc: Client) -> list[str]:
        answer = await js_api(nc, f"CONSUMER.LIST.{stream}")
        out = []
        for ci in answer.get("consumers") or []:
            config = ci.get("config") or {}
            filters = config.get("filter_subjects") or [config.get("filter_subject")]
            out.append(
                f"{ci.get('name')}: pending={ci.get('num_pending')} "
                f"ack_pending={ci.get('num_ack_pending')} "
                f"delivered={(ci.get('delivered') or {}).get('stream_seq')} "
                f"ack_floor={(ci.get('ack_floor') or {}).get('stream_seq')} "
                f"filters={len(filters)} e.g. {filters[:3]}"
            )
        return out

    try:
        return admin(cluster, read, 20)
    except Exception as exc:  # diagnostics only
        return [f"could not list consumers: {exc!r}"]


def stream_messages(cluster: NatsCluster, stream: str, timeout: float = 20.0) -> int:
    """Messages in ``stream``; retried through an election, -1 if it never answered."""

    async def read(nc: Client) -> int:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                answer = await js_api(nc, f"STREAM.INFO.{stream}")
                return int((answer.get("state") or {}).get("messages") or 0)
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    return -1
                await asyncio.sleep(0.5)

    return admin(cluster, read, timeout + 10)


def leftovers(cluster: NatsCluster, stream: str, limit: int = 10) -> list[str]:
    """The first messages still stored in the work stream: sequence, subject and job id."""

    async def read(nc: Client) -> list[str]:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        seq, out = info.state.first_seq, list[str]()
        while seq and seq <= info.state.last_seq and len(out) < limit:
            try:
                raw = await js.get_msg(stream, seq=seq, subject=">", next=True)
            except Exception:
                break
            msg_id = (raw.headers or {}).get("Nats-Msg-Id")
            out.append(f"seq {raw.seq} {raw.subject} {msg_id}")
            seq = (raw.seq or seq) + 1
        return out

    try:
        return admin(cluster, read)
    except Exception as exc:  # diagnostics only
        return [f"could not read: {exc!r}"]


def place_leaders(
    cluster: NatsCluster,
    fleet: Fleet,
    node: str,
    *,
    lanes: tuple[str, ...] = ("v1",),
    dlq: bool = True,
) -> None:
    """Make ``node`` the leader of the work stream, the lanes' consumers and (opt.) the DLQ."""

    async def move(nc: Client) -> None:
        await move_stream_leader(nc, fleet.stream, node)
        for lane in lanes:
            await move_consumer_leader(nc, fleet.stream, fleet.consumer(lane), node)
        if dlq:
            await move_stream_leader(nc, fleet.dlq_stream, node)

    admin(cluster, move, 90)
    cluster.note(f"leaders of {fleet.stream} (+consumers{', DLQ' if dlq else ''}) on {node}")


def leaders(cluster: NatsCluster, fleet: Fleet, lanes: tuple[str, ...] = ("v1",)) -> dict[str, str]:
    """Who leads the work stream, the DLQ and each lane's consumer ("?" while electing)."""

    async def one(nc: Client, read: Callable[[], Awaitable[str | None]]) -> str:
        for _ in range(20):
            try:
                leader = await read()
            except Exception:  # an election in progress
                leader = None
            if leader:
                return leader
            await asyncio.sleep(0.5)
        return "?"

    async def read(nc: Client) -> dict[str, str]:
        out = {
            "stream": await one(nc, lambda: stream_leader(nc, fleet.stream)),
            "dlq": await one(nc, lambda: stream_leader(nc, fleet.dlq_stream)),
        }
        for lane in lanes:
            consumer = fleet.consumer(lane)
            out[f"consumer {lane}"] = await one(
                nc,
                lambda c=consumer: consumer_leader(nc, fleet.stream, c),  # type: ignore[misc]
            )
        return out

    return admin(cluster, read, 120)


# --------------------------------------------------------------------------------- scenarios


def start_workers(fleet: Fleet, count: int, lane: str = "v1", **env: str) -> list[WorkerProc]:
    """The first worker provisions alone; the others start together once it is bound."""
    first = fleet.start(f"{lane}-w1", lane, **env)
    fleet.wait_started(first)
    rest = [fleet.start(f"{lane}-w{i}", lane, **env) for i in range(2, count + 1)]
    if rest:
        fleet.wait_started(*rest)
    return [first, *rest]


def busiest_node(cluster: NatsCluster, workers: list[WorkerProc]) -> str:
    """The node most of ``workers`` are connected to (the one to break)."""
    where = [cluster.client_node(w.name) for w in workers]
    counts = {n.name: where.count(n.name) for n in cluster.nodes}
    return max(counts, key=lambda name: counts[name])


def sleep_until(t0: float, offset: float) -> None:
    time.sleep(max(0.0, t0 + offset - time.time()))


def finish(
    scenario: str,
    pub: LoadPublisher,
    fleet: Fleet,
    results: list[Accounting],
    started: float,
    *,
    settle: float = 40.0,
    facts: dict[str, object] | None = None,
) -> Accounting:
    """Wait for the publisher and the backlog, then account, print and record."""
    pub.join(pub.duration + pub.give_up_after + 30)
    cluster = fleet.cluster
    settled = wait_settled(
        pub, fleet, settle, dlq_count=lambda: stream_messages(cluster, fleet.dlq_stream)
    )
    dlq = fleet.dlq_entries()
    left = stream_messages(cluster, fleet.stream)
    result = account(scenario, pub, fleet, dlq, stream_left=left, started=started)
    result.facts["settled within bound"] = settled
    result.facts["DLQ publish failures logged"] = fleet.count("DLQ publish failed")
    result.facts["pull re-issued (silent request)"] = fleet.count(
        "re-issuing pull requests (pull request went silent)"
    )
    result.facts["pull re-issued (reconnect)"] = fleet.count(
        "re-issuing pull requests (reconnected)"
    )
    result.facts.update(facts or {})
    if result.duplicates:
        result.facts["duplicates (t from 1st fault)"] = describe_duplicates(result, fleet)
    if left:
        result.facts["left in the work stream"] = leftovers(cluster, fleet.stream)
        result.facts["consumers then"] = consumer_facts(cluster, fleet.stream)
    print(result.report())
    print("events:\n" + "\n".join(f"  {t:.3f} {what}" for t, what in cluster.events))
    results.append(result)
    return result


def assert_accounting(result: Accounting, pub: LoadPublisher, *, duplicates: str) -> None:
    """``duplicates``: "none" (must be 0) or "explained" (each one caused by a fault)."""
    report = result.report()
    assert pub.crash is None, pub.crash
    assert not pub.final_failures, f"publishes given up: {list(pub.final_failures.items())[:3]}"
    assert result.published > 0
    assert not result.lost, f"lost jobs\n{report}"
    assert not result.stored_twice, f"dedup failed: jobs stored twice\n{report}"
    assert not result.unexpected, report
    assert not result.dlq_without_reason, report
    assert not result.dlq_reason_mismatch, report
    assert not result.wrongly_dead_lettered, report
    assert not result.poison_processed, report
    assert result.stream_left == 0, f"messages stuck in the work stream\n{report}"
    if duplicates == "none":
        assert not result.duplicates, report
    else:
        unexplained = {c: n for c, n in result.duplicate_causes.items() if "unexplained" in c}
        assert not unexplained, report


def processing_gap(records: list[Record], start: float, end: float) -> float:
    """The longest time without any ``job done`` line across the fleet in [start, end]."""
    times = sorted(float(r["_t"]) for r in records if start <= float(r["_t"]) <= end)
    points = [start, *times, end]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


def recovery(worker: WorkerProc, since: float, until: float) -> dict[str, float | None]:
    """After a fault at ``since``: when this worker reconnected, and its longest idle time."""
    reconnect = next(
        (r["_t"] for r in worker.matching("reconnected to NATS") if r["_t"] >= since), None
    )
    first_done = next((r["_t"] for r in worker.done() if r["_t"] >= since), None)
    return {
        "reconnected_after_s": None if reconnect is None else round(reconnect - since, 2),
        "first_job_after_s": None if first_done is None else round(first_done - since, 2),
        "longest_idle_s": round(processing_gap(worker.done(), since, until), 2),
    }
