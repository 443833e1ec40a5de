"""Hostile input: the worker keeps running, nothing is lost, and each message gets a clear outcome.

* Payloads that are not UTF-8, not JSON, 5000 levels deep, or of the wrong types go to the DLQ
  as ``invalid`` after exactly one delivery, byte for byte, with a one-line reason.
* A payload over the server's ``max_payload`` is refused by ``publish`` (exit 65, one line).
* A reused (or forged) ``Nats-Msg-Id`` is reported as a duplicate and stored once.
* A garbage ``traceparent`` with tracing on starts a fresh trace; the job is processed.
* A replayed dead letter that fails again gets a new DLQ entry, with its own reason.
* A handler that hangs is timed out, retried and dead-lettered with ``HandlerTimeoutError``.
* A handler that blocks the event loop is reported ("event loop was blocked"), and its job
  still completes.

Worker processes and the CLI run against the session's server with this test's own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from worker_testkit import WorkerEnv, WorkerProcess, wait_until

from {{ cookiecutter.__package_name }}.runtime.consume import dlq
from {{ cookiecutter.__package_name }}.runtime.consume.context import JobContext
from {{ cookiecutter.__package_name }}.runtime.consume.worker import Worker
from {{ cookiecutter.__package_name }}.runtime.names import WORKER_NAME
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob as Job

pytestmark = pytest.mark.integration

EXIT_DATAERR = 65
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")

HOSTILE: dict[str, bytes] = {
    "not-utf8": b"\xff\xfe\xfd not utf-8 \xc3\x28",
    "all-bytes": bytes(range(256)),
    "not-json": b"hello, world",
    "truncated": b'{"id": "t"',
    "empty": b"",
    "null": b"null",
    "nested-arrays": b"[" * 5000 + b"]" * 5000,
    "nested-objects": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "nested-in-a-field": b'{"id": "n", "item": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "wrong-types": b'{"id": 42, "quantity": "many", "work_seconds": "soon"}',
    "huge-number": b'{"id": "h", "quantity": 1' + b"0" * 5000 + b"}",
    "unknown-field": b'{"id": "u", "is_admin": true}',
    "control-char": b'{"id": "a\x00b"}',
    "line-breaks-in-a-key": b'{"id": "k", "x\\r\\nDlq-Reason: forged\\r\\nlevel": 1}',
}


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr[-2000:]}"
    return lines[0]


def headers_of(entry: RawStreamMsg) -> dict[str, str]:
    return dict(entry.headers or {})


def publish_raw(env: WorkerEnv, messages: list[tuple[bytes, Mapping[str, str]]]) -> list[bool]:
    """Publish bytes with headers straight to the ingress; returns each ack's duplicate flag."""

    async def go(js: JetStreamContext) -> list[bool]:
        acks = [await js.publish(env.ingress, data, headers=dict(h)) for data, h in messages]
        return [bool(a.duplicate) for a in acks]

    return env.js(go)


def no_crash(proc: WorkerProcess) -> None:
    """Alive, no traceback, no internal error."""
    assert proc.proc is not None
    assert proc.proc.poll() is None, proc.tail()
    assert not proc.non_json_lines(), proc.non_json_lines()[:5]
    assert not proc.find(lambda r: r.get("level") in ("error", "critical")), proc.tail()


# ------------------------------------------------------------------------------------ payloads


@pytest.mark.timeout(60)
def test_undecodable_payloads_are_dead_lettered_once_and_nothing_is_lost(
    worker_env: WorkerEnv,
) -> None:
    worker_env.provision()
    proc = worker_env.spawn()
    names = list(HOSTILE)
    publish_raw(worker_env, [(HOSTILE[n], {"Nats-Msg-Id": f"hostile-{n}"}) for n in names])
    worker_env.publish([{"id": "after-the-storm"}])

    proc.wait_done(["after-the-storm"])
    wait_until(
        lambda: len(worker_env.dlq_entries()) >= len(names),
        20,
        f"{len(names)} DLQ entries",
        details=lambda: f"{len(worker_env.dlq_entries())} so far\n{proc.tail()}",
    )
    entries = {headers_of(e).get("Dlq-Msg-Id"): e for e in worker_env.dlq_entries()}
    assert set(entries) == {f"hostile-{n}" for n in names}
    for name in names:
        entry = entries[f"hostile-{name}"]
        h = headers_of(entry)
        assert (entry.data or b"") == HOSTILE[name], f"{name}: payload changed in the DLQ"
        assert h["Dlq-Reason"] == "invalid", (name, h)
        assert h["Dlq-Deliveries"] == "1", (name, h)  # never retried
        reason = h["Dlq-Error"]
        assert reason, (name, h)
        assert reason.isprintable(), (name, reason)
        assert len(reason) <= 1024, (name, reason)
        assert h["Dlq-Error-Type"], (name, h)
        assert "forged" not in h["Dlq-Reason"]
    # One log line per dead letter, whatever the payload's field names contain.
    for record in proc.with_msg("job dead-lettered"):
        assert str(record["msg"]).isprintable(), repr(record["msg"])
    consumer = worker_env.consumer_info()
    assert consumer.num_redelivered == 0
    assert consumer.num_pending == 0
    assert consumer.num_ack_pending == 0
    assert worker_env.stored() == 0  # nothing left behind in the work queue
    no_crash(proc)
    assert proc.stop() == 0


@pytest.mark.timeout(60)
def test_a_payload_over_max_payload_is_refused_with_one_line(
    worker_env: WorkerEnv, tmp_path: Path
) -> None:
    worker_env.provision()
    big = tmp_path / "big.bin"
    big.write_bytes(b'{"id": "big", "item": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    for args in (["publish", "--raw", "--file", str(big)], ["publish", "--raw", "-"]):
        stdin = big.read_text() if args[-1] == "-" else None
        line = one_line_error(worker_env.run_cli(args, input=stdin), EXIT_DATAERR)
        assert "max_payload" in line, line
    assert worker_env.stored() == 0


# ------------------------------------------------------------------------------------ headers


@pytest.mark.timeout(60)
def test_a_reused_or_forged_msg_id_is_reported_as_duplicate_and_stored_once(
    worker_env: WorkerEnv,
) -> None:
    worker_env.provision()
    first = worker_env.cli_ok("publish", "--raw", "--msg-id", "forged-1", '{"id": "a"}')
    assert "published 1 job(s)" in first
    again = worker_env.cli_ok("publish", "--raw", "--msg-id", "forged-1", '{"id": "b"}')
    assert "published 0 job(s)" in again, again
    assert "1 duplicate(s)" in again, again

    assert "published 1 job(s)" in worker_env.cli_ok("publish", '{"id": "dup-7"}')
    twice = worker_env.cli_ok("publish", '{"id": "dup-7", "item": "changed"}')
    assert "1 duplicate(s)" in twice, twice
    # Someone else's id on a different payload: dropped, the original stays.
    forged = worker_env.cli_ok("publish", "--raw", "--msg-id", "dup-7", '{"id": "evil"}')
    assert "1 duplicate(s)" in forged, forged
    assert publish_raw(worker_env, [(b'{"id": "evil2"}', {"Nats-Msg-Id": "dup-7"})]) == [True]

    assert worker_env.stored() == 2

    async def stored(js: JetStreamContext) -> list[bytes]:
        info = await js.stream_info(worker_env.stream)
        first_seq, last_seq = info.state.first_seq, info.state.last_seq
        return [
            (await js.get_msg(worker_env.stream, s)).data or b""
            for s in range(first_seq, last_seq + 1)
        ]

    payloads = [json.loads(p) for p in worker_env.js(stored)]
    assert payloads[0] == {"id": "a"}
    assert payloads[1]["id"] == "dup-7"
    assert payloads[1]["item"] != "changed"


@pytest.mark.timeout(60)
def test_a_garbage_traceparent_with_tracing_on_still_gets_the_job_processed(
    worker_env: WorkerEnv,
) -> None:
    worker_env.provision()
    proc = worker_env.spawn(OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none")
    valid_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    garbage = {
        "word": "garbage",
        "bad-hex": "00-" + "z" * 32 + "-" + "z" * 16 + "-01",
        "zero-ids": "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
        "bad-version": "ff-" + valid_trace + "-00f067aa0ba902b7-01",
        "too-many-parts": "00-" + valid_trace + "-00f067aa0ba902b7-01-extra-parts",
        "very-long": "00-" + "a" * 4000,
        "empty": "",
    }
    messages: list[tuple[bytes, Mapping[str, str]]] = [
        (
            json.dumps({"id": f"tp-{name}"}).encode(),
            {"Nats-Msg-Id": f"tp-{name}", "traceparent": value, "tracestate": "=,,=;;garbage"},
        )
        for name, value in garbage.items()
    ]
    control = "00-" + valid_trace + "-00f067aa0ba902b7-01"
    messages.append(
        (b'{"id": "tp-control"}', {"Nats-Msg-Id": "tp-control", "traceparent": control})
    )
    publish_raw(worker_env, messages)

    ids = [f"tp-{name}" for name in garbage] + ["tp-control"]
    proc.wait_done(ids)
    done = {str(r["job_id"]): r for r in proc.done()}
    # Tracing was on: every job ran inside a span; the control job continued its trace, the
    # garbage ones started fresh, valid traces.
    assert done["tp-control"].get("trace_id") == valid_trace, done["tp-control"]
    for name in garbage:
        trace_id = str(done[f"tp-{name}"].get("trace_id", ""))
        assert TRACE_ID.match(trace_id), (name, trace_id)
        assert trace_id != "0" * 32, name
    assert worker_env.dlq_entries() == []
    no_crash(proc)
    assert proc.stop() == 0


# ------------------------------------------------------------------------------------ failures


@pytest.mark.timeout(60)
def test_a_replayed_dead_letter_that_fails_again_gets_a_new_entry(worker_env: WorkerEnv) -> None:
    worker_env.provision()
    proc = worker_env.spawn(MAX_DELIVER=1)
    worker_env.publish([{"id": "again-1", "fail_times": 99}])

    def entries() -> list[RawStreamMsg]:
        return worker_env.dlq_entries()

    first = wait_until(entries, 15, "the first dead letter", details=proc.tail)[0]
    h1 = headers_of(first)
    assert h1["Dlq-Reason"] == "exhausted", h1
    assert "demo failure" in h1["Dlq-Error"], h1
    assert first.seq is not None

    out = worker_env.cli_ok("dlq", "replay", "--seq", str(first.seq))
    assert "replayed 1 job(s)" in out

    def second_entry() -> list[RawStreamMsg]:
        return [
            e
            for e in entries()
            if e.seq is not None and first.seq is not None and e.seq > first.seq
        ]

    second = wait_until(second_entry, 15, "the replay's own dead letter", details=proc.tail)[0]
    h2 = headers_of(second)
    assert h2["Dlq-Reason"] == "exhausted", h2
    assert "demo failure" in h2["Dlq-Error"], h2

    # The replay's bookkeeping is part of the new entry's original headers (Dlq-Original-Headers).
    async def decoded(js: JetStreamContext) -> list[dlq.DeadLetter]:
        return [e async for e in dlq.iter_dead_letters(js, worker_env.settings())]

    [entry] = worker_env.js(decoded)
    original = dict(entry.original_header_pairs())
    assert original["Dlq-Replayed-From"] == str(first.seq)
    assert original.get("Job-Id") == "again-1"
    assert original["Nats-Msg-Id"] == f"again-1:replay:{first.seq}"
    assert [e.seq for e in entries()] == [second.seq]  # the replayed entry left the DLQ
    listed = json.loads(worker_env.cli_ok("dlq", "list", "--json"))
    assert [(e["dlq_seq"], e["reason"]) for e in listed] == [(second.seq, "exhausted")]
    no_crash(proc)
    assert proc.stop() == 0


@pytest.mark.timeout(60)
def test_a_hanging_handler_is_timed_out_retried_and_dead_lettered(worker_env: WorkerEnv) -> None:
    worker_env.provision()
    proc = worker_env.spawn(HANDLER_TIMEOUT=0.5, MAX_DELIVER=2)
    started = time.monotonic()
    worker_env.publish([{"id": "hang-1", "work_seconds": 3600}])

    entry = wait_until(worker_env.dlq_entries, 20, "the hung job in the DLQ", details=proc.tail)[0]
    took = time.monotonic() - started
    h = headers_of(entry)
    assert h["Dlq-Error-Type"] == "HandlerTimeoutError", h
    assert h["Dlq-Reason"] == "exhausted", h
    assert h["Dlq-Deliveries"] == "2", h
    assert took < 10, f"took {took:.1f}s with HANDLER_TIMEOUT=0.5"
    retries = proc.with_msg("job failed, retry")
    assert len(retries) == 1, proc.tail()
    assert "HandlerTimeoutError" in str(retries[0]["msg"]), proc.tail()

    worker_env.publish([{"id": "after-hang"}])  # the slot is free again
    proc.wait_done(["after-hang"])
    no_crash(proc)
    assert proc.stop() == 0


class Collect(logging.Handler):
    """Keeps the worker's log messages; ``stalled`` is set by the stall warning."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.stalled = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if "event loop was blocked" in self.messages[-1]:
            self.stalled.set()


@pytest.mark.timeout(60)
def test_a_handler_that_blocks_the_event_loop_is_reported_and_its_job_completes(
    worker_env: WorkerEnv,
) -> None:
    """An embedded Worker with the default LOOP_STALL_WARNING (1.0 s) and a handler that blocks
    for 1.5 s with time.sleep, published the moment the worker is ready."""
    settings = worker_env.settings(loop_stall_warning=1.0)
    handled: list[str] = []
    logger = logging.getLogger(Worker.__module__)

    async def scenario(collect: Collect) -> tuple[int, int]:
        done = asyncio.Event()

        async def blocking(job: Job, ctx: JobContext[Any]) -> None:
            time.sleep(1.5)  # noqa: ASYNC251 - blocking the loop is the point of the test
            handled.append(job.id)
            done.set()

        worker = Worker(settings, Job, blocking, install_signal_handlers=False)
        task = asyncio.create_task(worker.run())
        try:
            ready = asyncio.create_task(worker.ready.wait())
            await asyncio.wait({ready, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
            assert worker.ready.is_set(), "the worker never became ready"
            assert worker.js is not None
            await worker.js.publish(
                settings.names.ingress, b'{"id": "blocker-1"}', headers={"Nats-Msg-Id": "b-1"}
            )
            await asyncio.wait_for(done.wait(), 15)
            # The beat notices on its first tick after the block.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(collect.stalled.wait(), 2)
        finally:
            worker.stop("test over")
            code = await asyncio.wait_for(task, 20)
        return code, worker.counters.processed

    collect = Collect()
    logger.addHandler(collect)
    try:
        code, processed = asyncio.run(scenario(collect))
    finally:
        logger.removeHandler(collect)
    assert code == 0
    assert handled == ["blocker-1"]
    assert processed == 1
    stalls = [m for m in collect.messages if "event loop was blocked" in m]
    assert stalls, f"no stall warning for a 1.5 s block; {WORKER_NAME} logged: {collect.messages}"
    seconds = float(re.findall(r"blocked for ([0-9.]+)s", stalls[0])[0])
    assert 1.0 <= seconds <= 2.5, stalls[0]
