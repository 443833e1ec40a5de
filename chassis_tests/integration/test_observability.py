"""Observability against a real nats-server: traces, metrics, health probes and liveness.

* Traces cross a real NATS hop (PRODUCER -> CONSUMER, W3C ``traceparent`` in message headers),
  one CONSUMER span per delivery, DLQ entries keep the trace, replays link back to it.
* Metrics are read from an in-memory reader wired into the real ``serve()``.
* With telemetry off, no OpenTelemetry SDK module is ever imported by a running worker.
* Health: ``/readyz`` and ``/livez`` of a worker subprocess through a broker outage and a drain;
  a broker that stops answering (SIGSTOP) turns ``/livez`` red while ``/readyz`` stays green.

Every wait is a poll with a deadline; servers and worker processes are stopped however a test
ends; everything listens on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otlp_sink import Exported, OtlpSink
from worker_testkit import NatsServer, WorkerEnv, WorkerProcess, free_port, wait_until

import {{ cookiecutter.__package_name }} as package
from {{ cookiecutter.__package_name }}.runtime import JobContext, app
from {{ cookiecutter.__package_name }}.runtime.binding import WorkerApp
from {{ cookiecutter.__package_name }}.runtime.consume import dlq
from {{ cookiecutter.__package_name }}.runtime.consume.worker import Handler, Worker
from {{ cookiecutter.__package_name }}.runtime.observe.job_durations import reader_with
from {{ cookiecutter.__package_name }}.runtime.observe.logs import JsonFormatter
from {{ cookiecutter.__package_name }}.runtime.observe.telemetry import (
    DURATION_BUCKETS,
    Telemetry,
    TraceContextFilter,
    job_durations,
)
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob as Job
from {{ cookiecutter.__package_name }}.runtime.operate.demo import handle
from {{ cookiecutter.__package_name }}.runtime.publish import Producer
from {{ cookiecutter.__package_name }}.runtime.settings import Settings

pytestmark = pytest.mark.integration

PACKAGE = package.__name__
VERSION = package.__version__
MSG_ID = "messaging.message.id"
T = TypeVar("T")
Record = dict[str, Any]


# --------------------------------------------------------------------------------- helpers


async def until(check: Callable[[], T], within: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy, inside the event loop the worker under
    test runs in; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = check()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what} (last {value!r})")
        await asyncio.sleep(interval)


def tag() -> str:
    return uuid.uuid4().hex[:8]


def settings_for(env: WorkerEnv, **overrides: Any) -> Settings:
    """In-process settings on this test's own stream, DLQ and subject root (see conftest)."""
    values: dict[str, Any] = {
        "instance_id": f"obs-{env.token}",
        "max_deliver": 3,
        "concurrency": 8,
        "fetch_batch": 8,
        "drain_timeout": 5.0,
    }
    values.update(overrides)
    return env.settings(**values)


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's OTEL_* variables must not switch telemetry on behind a test's back."""
    for name in list(os.environ):
        if name.startswith("OTEL_") or name.upper() == "PROMETHEUS_METRICS":
            monkeypatch.delenv(name)


@dataclass
class Captured:
    """A Telemetry whose spans and metrics stay in memory."""

    telemetry: Telemetry
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if kind is None or s.kind == kind]

    def consumer_spans(self, message_id: str) -> list[ReadableSpan]:
        """CONSUMER spans of one message, by delivery count."""
        found = [s for s in self.finished(SpanKind.CONSUMER) if attrs(s).get(MSG_ID) == message_id]
        return sorted(found, key=lambda s: int(attrs(s)["messaging.nats.delivery_count"]))

    def producer_span(self, message_id: str) -> ReadableSpan:
        found = [s for s in self.finished(SpanKind.PRODUCER) if attrs(s).get(MSG_ID) == message_id]
        assert len(found) == 1, f"expected one PRODUCER span for {message_id}, got {found}"
        return found[0]

    def metrics(self) -> dict[str, list[Any]]:
        """Metric name -> its data points (collected now: observable callbacks run)."""
        out: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out


def capture(settings: Settings) -> Captured:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    durations = job_durations(settings)  # wired as telemetry.setup wires it
    reader = reader_with(durations, InMemoryMetricReader)
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry = Telemetry(settings, tracer_provider, meter_provider, durations=durations)
    return Captured(telemetry, spans, reader)


def attrs(span: ReadableSpan) -> Mapping[str, Any]:
    return dict(span.attributes or {})


def traceparent_ids(value: str) -> tuple[int, int]:
    """(trace id, span id) of a W3C ``traceparent`` header."""
    version, trace_id, span_id, _flags = value.split("-")
    assert version == "00", value
    return int(trace_id, 16), int(span_id, 16)


class Collect(logging.Handler):
    """Keeps records, stamped with trace/span ids like the handlers ``telemetry.setup`` sees."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.addFilter(TraceContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def starting(self, prefix: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage().startswith(prefix)]


@contextlib.contextmanager
def capture_logs() -> Iterator[Collect]:
    """DEBUG records of the package (set before the worker is built: it decides once)."""
    logger = logging.getLogger(PACKAGE)
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def json_line(record: logging.LogRecord) -> Record:
    line = JsonFormatter({"worker": "w"}).format(record)
    assert "\n" not in line
    parsed: Record = json.loads(line)
    return parsed


async def with_worker(
    settings: Settings,
    body: Callable[[Worker], Awaitable[T]],
    *,
    handler: Handler = handle,
    telemetry: Telemetry | None = None,
    serve: bool = False,
) -> T:
    """Run a worker in this loop (``Worker.run`` or the full ``app.serve``) around ``body``."""
    workers: list[Worker] = []
    if serve:
        task = asyncio.create_task(
            app.serve(
                settings,
                WorkerApp("demo", Job, handler),
                install_signal_handlers=False,
                on_worker=workers.append,
                telemetry=telemetry,
            )
        )
    else:
        workers.append(
            Worker(settings, Job, handler, install_signal_handlers=False, telemetry=telemetry)
        )
        task = asyncio.create_task(workers[0].run())

    def started() -> bool:
        if task.done():
            raise AssertionError(f"worker ended before it was ready: {task.result()}")
        return bool(workers) and workers[0].ready.is_set()

    try:
        await until(started, 15, "the worker to be ready")
        result = await body(workers[0])
    except BaseException:
        if workers:
            workers[0].stop("test failed")
            workers[0].stop("test failed")  # second stop: no drain wait
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 15)
        raise
    workers[0].stop("test done")
    code = await asyncio.wait_for(task, 15)
    assert code == 0, f"worker exited {code}"
    return result


async def poison_aware(job: Job, ctx: JobContext[Any]) -> None:
    """The generated handler, except that item 'poison' always fails."""
    if job.item == "poison":
        raise RuntimeError(f"poison pill {job.id}")
    await handle(job, ctx)


# --------------------------------------------------------------------------------- traces


def test_trace_crosses_a_real_nats_hop(worker_env: WorkerEnv) -> None:
    settings = settings_for(worker_env)
    cap = capture(settings)
    job = Job(id=f"trace-{tag()}")

    async def body(worker: Worker) -> None:
        async with Producer(settings, telemetry=cap.telemetry) as producer:  # own connection
            await producer.publish(job)
        await until(lambda: cap.consumer_spans(job.id), 10, "the CONSUMER span")
        await until(lambda: worker.counters.processed == 1, 5, "the job acknowledged")

    with capture_logs() as logs:
        asyncio.run(with_worker(settings, body, telemetry=cap.telemetry))

    producer = cap.producer_span(job.id)
    [consumer] = cap.consumer_spans(job.id)
    assert producer.kind == SpanKind.PRODUCER
    assert consumer.kind == SpanKind.CONSUMER
    assert producer.context is not None
    assert consumer.context is not None
    assert producer.name == f"send {settings.names.ingress}"
    assert attrs(producer)["messaging.destination.name"] == settings.names.ingress
    # Same trace; the consumer's parent is the producer span, arriving from the wire.
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.parent.is_remote
    # Named by the ingress, not the stored subject (generation, bucket and key would make
    # span names unbounded).
    assert consumer.name == f"process {settings.names.ingress}"
    a = attrs(consumer)
    assert a["messaging.system"] == "nats"
    assert a["messaging.destination.name"] == settings.names.ingress
    assert a[MSG_ID] == job.id
    assert a["messaging.nats.delivery_count"] == 1
    assert a["messaging.consumer.group.name"] == settings.names.durable
    assert a["messaging.nats.stream"] == settings.stream_name
    assert a["worker.lane"] == settings.lane
    assert a["worker.version"] == VERSION
    assert consumer.status.status_code != StatusCode.ERROR
    assert "worker.outcome" not in a

    # The DEBUG 'job done' line carries the job's correlation fields and the consumer span ids.
    [done] = logs.starting("job done")
    line = json_line(done)
    assert line["job_id"] == job.id
    # the log line has the stored subject: route generation and bucket
    assert line["subject"].startswith(f"{settings.subject_root}.{settings.job_type}.g")
    assert line["attempt"] == 1
    assert isinstance(line["stream_seq"], int)
    assert line["trace_id"] == format(consumer.context.trace_id, "032x")
    assert line["span_id"] == format(consumer.context.span_id, "016x")


def test_each_delivery_is_a_consumer_span_in_the_producer_trace(worker_env: WorkerEnv) -> None:
    settings = settings_for(worker_env)
    cap = capture(settings)
    job = Job(id=f"retry-{tag()}", fail_times=2)  # Retry on attempts 1 and 2, then success

    async def body(worker: Worker) -> None:
        async with Producer(settings, worker.nc, telemetry=cap.telemetry) as producer:
            await producer.publish(job)
        await until(lambda: len(cap.consumer_spans(job.id)) == 3, 15, "three deliveries")
        await until(lambda: worker.counters.processed == 1, 5, "the job acknowledged")
        assert worker.counters.retried == 2
        assert worker.counters.dead_lettered == 0

    with capture_logs() as logs:
        asyncio.run(with_worker(settings, body, telemetry=cap.telemetry))

    producer = cap.producer_span(job.id)
    spans = cap.consumer_spans(job.id)
    assert producer.context is not None
    assert [attrs(s)["messaging.nats.delivery_count"] for s in spans] == [1, 2, 3]
    for span in spans:
        assert span.context is not None
        assert span.parent is not None
        assert span.context.trace_id == producer.context.trace_id
        assert span.parent.span_id == producer.context.span_id
    assert len({s.context.span_id for s in spans if s.context}) == 3
    for failed in spans[:2]:
        assert failed.status.status_code == StatusCode.ERROR
        assert "demo failure" in (failed.status.description or "")
        assert attrs(failed)["worker.outcome"] == "retried"
        [event] = [e for e in failed.events if e.name == "exception"]
        assert str(dict(event.attributes or {})["exception.type"]).endswith("Retry")
    assert spans[2].status.status_code != StatusCode.ERROR
    assert "worker.outcome" not in attrs(spans[2])
    assert not [e for e in spans[2].events if e.name == "exception"]

    # Each retry log line points at the span of its own delivery.
    retries = logs.starting("job failed, retry")
    assert [vars(r)["attempt"] for r in retries] == [1, 2]
    for record, span in zip(retries, spans[:2], strict=True):
        assert span.context is not None
        line = json_line(record)
        assert line["job_id"] == job.id
        assert line["trace_id"] == format(span.context.trace_id, "032x")
        assert line["span_id"] == format(span.context.span_id, "016x")


def test_dead_letter_keeps_the_trace_and_replay_links_to_it(worker_env: WorkerEnv) -> None:
    settings = settings_for(worker_env, max_deliver=2)
    cap = capture(settings)
    job = Job(id=f"dlq-{tag()}", item="flaky")
    healed = asyncio.Event()

    async def flaky(job: Job, ctx: JobContext[Any]) -> None:
        if not healed.is_set():
            raise RuntimeError("downstream unavailable")

    replayed: dict[str, Any] = {}

    async def body(worker: Worker) -> None:
        assert worker.js is not None
        async with Producer(settings, worker.nc, telemetry=cap.telemetry) as producer:
            await producer.publish(job)
        await until(lambda: worker.counters.dead_lettered == 1, 15, "the job dead-lettered")
        entries = [e async for e in dlq.iter_dead_letters(worker.js, settings)]
        assert len(entries) == 1, entries
        replayed["entry"] = entries[0]
        healed.set()
        assert await dlq.replay(worker.js, settings, entries, cap.telemetry) == 1
        await until(lambda: worker.counters.processed == 1, 15, "the replayed job processed")
        replayed["left"] = [e async for e in dlq.iter_dead_letters(worker.js, settings)]

    with capture_logs() as logs:
        asyncio.run(with_worker(settings, body, handler=flaky, telemetry=cap.telemetry))

    producer = cap.producer_span(job.id)
    assert producer.context is not None
    original_trace, original_span = producer.context.trace_id, producer.context.span_id
    failed = cap.consumer_spans(job.id)
    assert [attrs(s)["worker.outcome"] for s in failed] == ["retried", "dead_lettered"]
    for span in failed:
        assert span.status.status_code == StatusCode.ERROR
        assert span.context is not None
        assert span.context.trace_id == original_trace
        [event] = [e for e in span.events if e.name == "exception"]
        assert str(dict(event.attributes or {})["exception.type"]).endswith("RuntimeError")

    # The DLQ entry carries the original headers, traceparent included.
    entry: dlq.DeadLetter = replayed["entry"]
    assert entry.headers[dlq.H_REASON] == "exhausted"
    assert entry.headers[dlq.H_MSG_ID] == job.id
    assert traceparent_ids(entry.headers["traceparent"]) == (original_trace, original_span)
    [dead] = logs.starting("job dead-lettered")
    assert json_line(dead)["trace_id"] == format(original_trace, "032x")

    # The replay is a new trace whose PRODUCER span links to the original one.
    [replay] = [s for s in cap.finished(SpanKind.PRODUCER) if attrs(s).get("worker.replay")]
    assert replay.context is not None
    assert replay.context.trace_id != original_trace
    assert replay.parent is None
    [link] = replay.links
    assert (link.context.trace_id, link.context.span_id) == (original_trace, original_span)

    # The replayed delivery continues the replay's trace, not the failed one.
    replay_id = f"{job.id}:replay:{entry.seq}"
    [again] = cap.consumer_spans(replay_id)
    assert again.context is not None
    assert again.parent is not None
    assert again.context.trace_id == replay.context.trace_id
    assert again.parent.span_id == replay.context.span_id
    assert again.status.status_code != StatusCode.ERROR
    assert replayed["left"] == []


# --------------------------------------------------------------------------------- metrics


def _by_lane_sum(points: list[Any]) -> float:
    return sum(float(p.value) for p in points if isinstance(p, NumberDataPoint))


def test_metrics_move_for_success_retry_and_dead_letter(worker_env: WorkerEnv) -> None:
    settings = settings_for(worker_env, max_deliver=2)
    cap = capture(settings)
    t = tag()
    jobs = [
        Job(id=f"ok-{t}"),
        Job(id=f"retry-{t}", fail_times=1),
        Job(id=f"poison-{t}", item="poison"),
    ]
    expected = {"processed": 2, "retried": 2, "failed": 2, "dead_lettered": 1}

    def counters_now() -> dict[str, float]:
        points = cap.metrics()
        return {k: _by_lane_sum(points.get(f"worker.jobs.{k}", [])) for k in expected}

    seen: dict[str, Any] = {}

    async def body(worker: Worker) -> None:
        before = counters_now()
        async with Producer(settings, worker.nc) as producer:
            await producer.publish_all(jobs)
        await until(
            lambda: counters_now() == {k: float(v) for k, v in expected.items()},
            15,
            "the job counters to reach their final values",
        )
        seen["before"] = before
        seen["after"] = cap.metrics()
        seen["counters"] = worker.counters.as_dict()

    asyncio.run(
        with_worker(settings, body, handler=poison_aware, telemetry=cap.telemetry, serve=True)
    )

    assert seen["before"] == dict.fromkeys(expected, 0.0)
    assert {k: seen["counters"][k] for k in expected} == expected
    points: dict[str, list[Any]] = seen["after"]
    for name in ("worker.jobs.processed", "worker.jobs.in_flight"):
        [point] = points[name]
        assert dict(point.attributes or {}) == {"worker.lane": settings.lane}
    assert _by_lane_sum(points["worker.jobs.in_flight"]) == 0
    for gauge in ("worker.lane.pending", "worker.lane.unacked"):
        assert gauge in points, sorted(points)

    histogram = [
        p for p in points["messaging.process.duration"] if isinstance(p, HistogramDataPoint)
    ]
    by_outcome = {str(dict(p.attributes or {})["worker.outcome"]): p for p in histogram}
    assert {k: p.count for k, p in by_outcome.items()} == {
        "processed": 2,
        "retried": 2,
        "dead_lettered": 1,
    }
    for point in histogram:
        assert dict(point.attributes or {})["messaging.system"] == "nats"
        assert dict(point.attributes or {})["worker.lane"] == settings.lane
        assert 0 <= point.min <= point.max < 10
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS  # seconds, not milliseconds


# --------------------------------------------------------------------------------- telemetry off


def test_without_telemetry_jobs_run_and_carry_no_trace_headers(worker_env: WorkerEnv) -> None:
    settings = settings_for(worker_env)
    seen: list[dict[str, str]] = []

    async def record(job: Job, ctx: JobContext[Any]) -> None:
        seen.append(ctx.headers)

    async def body(worker: Worker) -> None:
        assert worker.telemetry is None
        # A Telemetry without a tracer provider is "tracing off" for the producer too.
        off = Telemetry(settings, None, None)
        async with Producer(settings, worker.nc, telemetry=off) as producer:
            await producer.publish(Job(id=f"plain-{tag()}"))
        async with Producer(settings, worker.nc) as producer:
            await producer.publish(Job(id=f"plain-{tag()}"))
        await until(lambda: worker.counters.processed == 2, 10, "both jobs processed")

    asyncio.run(with_worker(settings, body, handler=record))
    assert len(seen) == 2
    for headers in seen:
        assert "traceparent" not in headers
        assert "Nats-Msg-Id" in headers


# --------------------------------------------------------------------------------- subprocesses


def imported_modules(lines: list[str]) -> set[str]:
    """Module names from ``-X importtime`` output ('import time: self | cumulative | name')."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in lines
        if line.startswith("import time:") and line.count("|") == 2
    }


def one_job(env: WorkerEnv, name: str, traces: str = "") -> WorkerProcess:
    """Start a worker (``-X importtime``), have it process one job, stop it (exit 0)."""
    worker = env.spawn(name=name, PYTHONPROFILEIMPORTTIME="1", OTEL_TRACES_EXPORTER=traces)
    job_id = f"{name}-{tag()}"
    env.publish([{"id": job_id}])
    worker.wait_done([job_id])
    assert worker.stop() == 0, worker.tail()
    return worker


def test_a_worker_without_otel_config_never_imports_the_sdk(worker_env: WorkerEnv) -> None:
    """``-X importtime`` lists every module a real ``run`` imports; none is OpenTelemetry's.

    A second worker with ``OTEL_TRACES_EXPORTER=console`` proves the probe would see it.
    """
    off = one_job(worker_env, "off")
    on = one_job(worker_env, "on", traces="console")

    off_modules = imported_modules(off.non_json_lines())
    on_modules = imported_modules(on.non_json_lines())
    assert "nats" in off_modules
    assert f"{PACKAGE}.runtime.consume.worker" in off_modules
    loaded = sorted(m for m in off_modules if m.startswith("opentelemetry"))
    assert not loaded, loaded
    assert f"{PACKAGE}.runtime.observe.telemetry" not in off_modules
    assert "opentelemetry.sdk.trace" in on_modules
    # Job lines carry trace ids exactly when tracing is on (the filter telemetry.setup adds).
    [off_done], [on_done] = off.done(), on.done()
    assert "trace_id" not in off_done
    assert "span_id" not in off_done
    assert len(str(on_done["trace_id"])) == 32
    assert len(str(on_done["span_id"])) == 16


# --------------------------------------------------------------------------------- OTLP export


PRODUCER_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PRODUCER_SPAN = 0x00F067AA0BA902B7


def otlp_run(env: WorkerEnv, sink: OtlpSink, name: str) -> list[Exported]:
    """A worker subprocess exporting to ``sink`` handles a traced job and a job that fails once;
    returns the CONSUMER spans the sink holds the moment the worker has exited."""
    worker = env.spawn(
        name=name,
        OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
        SDK_CONSUMER_SPANS=str(name == "sdk").lower(),
        NO_PROXY="127.0.0.1",  # a proxy set for the machine would send the chassis to the SDK
    )
    traced, flaky = f"{name}-traced-{tag()}", f"{name}-flaky-{tag()}"
    parent = f"00-{PRODUCER_TRACE:032x}-{PRODUCER_SPAN:016x}-01"

    async def publish(js: Any) -> None:
        await js.publish(
            env.ingress,
            json.dumps({"id": traced}).encode(),
            headers={"Nats-Msg-Id": traced, "traceparent": parent},
        )
        await js.publish(
            env.ingress,
            json.dumps({"id": flaky, "fail_times": 1}).encode(),
            headers={"Nats-Msg-Id": flaky},
        )

    env.js(publish)
    worker.wait_done([traced, flaky])
    assert worker.stop() == 0, worker.tail()
    return sink.consumer_spans()  # no waiting: the graceful stop flushed them


def comparable(span: Exported) -> dict[str, Any]:
    """What must not depend on how the span was recorded (ids and times aside)."""
    attributes = span.attributes
    attributes.pop(MSG_ID)  # different jobs in the two runs
    attributes.pop("messaging.nats.stream_sequence")
    return {
        "name": span.span.name,
        "attributes": attributes,
        "status": span.span.status.code,
        "events": [(e.name, sorted(kv.key for kv in e.attributes)) for e in span.span.events],
        "resource": sorted(span.resource),
        "scope": span.scope,
    }


def test_consumer_spans_reach_an_otlp_collector_alike_with_and_without_the_sdk(
    worker_env: WorkerEnv,
) -> None:
    """The chassis's own OTLP path and the SDK's, side by side: same spans, same trace links."""
    by_path: dict[str, list[Exported]] = {}
    for path in ("chassis", "sdk"):
        with OtlpSink() as sink:
            spans = otlp_run(worker_env, sink, path)
            agents = {h.get("user-agent", "").split("/")[0] for h in sink.headers}
        by_path[path] = spans
        sender = "worker-chassis-otlp" if path == "chassis" else "OTel-OTLP-Exporter-Python"
        assert agents == {sender}
        assert len(spans) == 3, [s.span.name for s in spans]
        [traced] = [s for s in spans if s.parent_id]
        assert (traced.trace_id, traced.parent_id) == (PRODUCER_TRACE, PRODUCER_SPAN)
        flaky = sorted(
            (s for s in spans if not s.parent_id), key=lambda s: s.span.start_time_unix_nano
        )
        assert [s.attributes["messaging.nats.delivery_count"] for s in flaky] == [1, 2]
        assert flaky[0].trace_id != flaky[1].trace_id  # no producer context: each is a root
        assert flaky[0].span.status.code == Status.STATUS_CODE_ERROR
        assert flaky[0].attributes["worker.outcome"] == "retried"
        assert flaky[1].span.status.code == Status.STATUS_CODE_UNSET
        for span in spans:
            assert span.span.end_time_unix_nano >= span.span.start_time_unix_nano > 0
            assert span.resource["worker.lane"] == worker_env.settings().lane
    chassis = sorted(map(comparable, by_path["chassis"]), key=repr)
    sdk = sorted(map(comparable, by_path["sdk"]), key=repr)
    assert chassis == sdk


# --------------------------------------------------------------------------------- health


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers on the port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except OSError:
        return 0, ""
    finally:
        conn.close()


def probe_json(port: int, path: str) -> tuple[int, Record]:
    status, body = http_get(port, path)
    return status, (json.loads(body) if status else {})


def health_cli(env: WorkerEnv, port: int, *flags: str) -> int:
    """Exit code of the worker's ``health`` command against ``port``."""
    return env.cli("health", "--port", str(port), "--timeout", "2", *flags).returncode


def prometheus_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_health_through_outage_and_drain(
    restartable_server: NatsServer, worker_env: WorkerEnv
) -> None:
    """A worker subprocess with HEALTH_PORT: readiness follows the broker and the drain."""
    server = restartable_server
    server.stop()  # the worker comes first
    worker_env.set("NATS_URL", server.url)
    health = free_port()
    worker = worker_env.spawn(
        ready=False,
        name="health",
        HEALTH_PORT=health,
        HEALTH_HOST="127.0.0.1",
        PROMETHEUS_METRICS="true",
        NATS_CONNECT_TIMEOUT=30,
        DRAIN_TIMEOUT=20,
    )

    def readyz(want: int) -> Callable[[], Record]:
        def check() -> Record:
            assert worker.proc is not None
            assert worker.proc.poll() is None, worker.tail()
            status, body = probe_json(health, "/readyz")
            return body if status == want else {}

        return check

    # 1. No broker yet: the health server answers, not ready, but alive.
    body = wait_until(readyz(503), 20, "/readyz 503 before connecting", details=worker.tail)
    assert body["ready"] is False
    assert body["connected"] is False
    assert body["state"] == "starting"
    assert probe_json(health, "/livez")[0] == 200
    assert health_cli(worker_env, health) == 1

    # 2. The broker comes up: ready.
    server.start()
    body = wait_until(readyz(200), 20, "/readyz 200 once connected", details=worker.tail)
    assert body == {"ready": True, "connected": True, "state": "running", "in_flight": 0}
    assert health_cli(worker_env, health) == 0
    assert health_cli(worker_env, health, "--live") == 0

    # 3. The Prometheus exposition counts processed jobs.
    worker_env.publish([{"id": f"prom-{tag()}"}])

    def processed() -> float | None:
        status, text = http_get(health, "/metrics")
        assert status == 200, (status, text)
        return prometheus_value(text, "worker_jobs_processed_total")

    assert wait_until(processed, 15, "worker_jobs_processed_total", details=worker.tail) == 1.0
    text = http_get(health, "/metrics")[1]  # the chassis's own histogram, through the reader
    assert prometheus_value(text, "messaging_process_duration_seconds_count") == 1.0, text
    assert 'le="0.005"' in text, text

    # 4. Broker down: not ready (the pod leaves the endpoints), still alive (no restart).
    server.stop()
    body = wait_until(readyz(503), 15, "/readyz 503 with the broker down", details=worker.tail)
    assert body["connected"] is False
    status, live = probe_json(health, "/livez")
    assert status == 200, live
    assert live["live"] is True
    assert health_cli(worker_env, health) == 1
    assert health_cli(worker_env, health, "--live") == 0

    # 5. Same broker back (same port, same store): ready again.
    server.start()
    wait_until(readyz(200), 20, "/readyz 200 after the restart", details=worker.tail)

    # 6. SIGTERM during a long job: not ready while draining, then a clean exit.
    long_id = f"long-{tag()}"
    worker_env.publish([{"id": long_id, "work_seconds": 5.0}])
    wait_until(
        lambda: probe_json(health, "/readyz")[1].get("in_flight") == 1,
        15,
        "the long job running",
        details=worker.tail,
    )
    worker.send_signal(signal.SIGTERM)
    body = wait_until(readyz(503), 3, "/readyz 503 while draining", details=worker.tail)
    assert body["state"] == "draining", body
    assert body["in_flight"] == 1, body
    assert body["connected"] is True
    assert health_cli(worker_env, health) == 1
    assert worker.wait_exit(20) == 0, worker.tail()
    assert long_id in worker.done_ids(), worker.tail()
    assert worker.with_msg("stopped (SIGTERM)"), worker.tail()


async def probe_async(port: int, path: str) -> tuple[int, Record]:
    return await asyncio.to_thread(probe_json, port, path)


async def until_probe(
    port: int, path: str, want: int, within: float, what: str
) -> tuple[Record, float]:
    """Poll a probe of the in-process health server until it answers ``want``.

    Returns the body and how long it took.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        status, body = await probe_async(port, path)
        if status == want:
            return body, loop.time() - start
        if loop.time() - start >= within:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}: {body}")
        await asyncio.sleep(0.1)


def probed_settings(env: WorkerEnv, server: NatsServer, stall: float) -> Settings:
    env.set("NATS_URL", server.url)
    return settings_for(env, health_port=free_port(), health_host="127.0.0.1", liveness_stall=stall)


def test_liveness_fails_when_a_connected_broker_goes_silent(
    restartable_server: NatsServer, worker_env: WorkerEnv
) -> None:
    """SIGSTOP the broker: the TCP connection stays up, the pull loop hears nothing.

    /livez turns 503 after LIVENESS_STALL (readiness cannot see this: still connected), and
    recovers once the broker answers again.
    """
    stall = 3.0
    settings = probed_settings(worker_env, restartable_server, stall)
    port = settings.health_port
    assert restartable_server.proc is not None
    pid = restartable_server.proc.pid

    async def body(worker: Worker) -> None:
        await until_probe(port, "/livez", 200, 10, "/livez 200 while healthy")
        os.kill(pid, signal.SIGSTOP)
        try:
            live, took = await until_probe(port, "/livez", 503, stall + 6, "/livez 503")
            assert live["live"] is False
            assert live["pull_silent_s"] >= stall, live
            assert took >= stall - 2.5, f"/livez failed after only {took:.1f}s"
            status, ready = await probe_async(port, "/readyz")
            assert status == 200, ready
            assert ready["connected"] is True
        finally:
            os.kill(pid, signal.SIGCONT)
        await until_probe(port, "/livez", 200, 12, "/livez 200 once the broker answers again")

    try:
        asyncio.run(with_worker(settings, body, serve=True))
    finally:
        os.kill(pid, signal.SIGCONT)


# --------------------------------------------------------------------------------- regressions


def test_liveness_does_not_count_a_broker_outage_as_a_stall(
    restartable_server: NatsServer, worker_env: WorkerEnv
) -> None:
    """An outage longer than LIVENESS_STALL must not fail /livez once the broker is back."""
    stall = 2.0
    server = restartable_server
    settings = probed_settings(worker_env, server, stall)
    port = settings.health_port
    statuses: list[tuple[float, int, Record]] = []

    async def body(worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        await until_probe(port, "/livez", 200, 10, "/livez 200 while healthy")
        await asyncio.to_thread(server.stop)
        await until_probe(port, "/readyz", 503, 10, "/readyz 503 with the broker down")

        async def outage_outlasted_the_stall() -> bool:
            status, live = await probe_async(port, "/livez")
            assert status == 200, f"/livez failed during the outage: {live}"
            return float(live["pull_silent_s"]) > stall + 0.5

        deadline = loop.time() + stall + 5
        while not await outage_outlasted_the_stall():
            assert loop.time() < deadline, "the outage did not outlast LIVENESS_STALL"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(server.start)
        back = loop.time()
        await until_probe(port, "/readyz", 200, 15, "/readyz 200 after the reconnect")
        # Watch /livez from the reconnect until well after the first idle heartbeat is due.
        window_end = loop.time() + 3.0
        while loop.time() < window_end:
            status, live = await probe_async(port, "/livez")
            statuses.append((round(loop.time() - back, 2), status, live))
            await asyncio.sleep(0.1)

    asyncio.run(with_worker(settings, body, serve=True))
    failures = [s for s in statuses if s[1] != 200]
    assert not failures, f"/livez failed after the reconnect: {failures[:3]}"


def test_dead_letter_of_an_untraced_job_still_links_its_replay(worker_env: WorkerEnv) -> None:
    settings = settings_for(worker_env, max_deliver=1)
    cap = capture(settings)
    job = Job(id=f"untraced-{tag()}", item="poison")
    out: dict[str, Any] = {}

    async def body(worker: Worker) -> None:
        assert worker.js is not None
        async with Producer(settings, worker.nc) as producer:  # e.g. a foreign, untraced producer
            await producer.publish(job)
        await until(lambda: worker.counters.dead_lettered == 1, 15, "the job dead-lettered")
        entries = [e async for e in dlq.iter_dead_letters(worker.js, settings)]
        out["entry"] = entries[0]
        await dlq.replay(worker.js, settings, entries, cap.telemetry)

    asyncio.run(with_worker(settings, body, handler=poison_aware, telemetry=cap.telemetry))
    [failed] = cap.consumer_spans(job.id)
    assert failed.context is not None
    assert failed.parent is None  # the trace starts at the worker
    entry: dlq.DeadLetter = out["entry"]
    assert "traceparent" in entry.headers, sorted(entry.headers)
    assert traceparent_ids(entry.headers["traceparent"]) == (
        failed.context.trace_id,
        failed.context.span_id,
    )
    [replay] = [s for s in cap.finished(SpanKind.PRODUCER) if attrs(s).get("worker.replay")]
    [link] = replay.links
    assert link.context.trace_id == failed.context.trace_id
