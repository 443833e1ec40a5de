"""OpenTelemetry tracing and metrics, configured by the standard ``OTEL_*`` variables.

Off unless asked for, and then imported lazily: a worker with no exporter never loads the SDK and
runs the uninstrumented hot path (chosen once at startup, not checked per message).

* Traces go over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``)
  is set, to the console in dev mode (``run --embedded-nats``) or with
  ``OTEL_TRACES_EXPORTER=console``, and nowhere otherwise. ``OTEL_SDK_DISABLED=true`` turns
  everything off.
* Metrics go over OTLP with the same endpoint, and/or to ``/metrics`` on the health port when
  ``PROMETHEUS_METRICS=true``. Job counters are observable instruments that read the worker's
  own integer counters at collection time, so they cost nothing per message.
* Context crosses NATS in W3C ``traceparent``/``tracestate`` message headers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import (
    CallbackOptions,
    Meter,
    MeterProvider,
    Observation,
    set_meter_provider,
)
from opentelemetry.semconv._incubating.attributes import messaging_attributes as msg_attrs
from opentelemetry.semconv.attributes import service_attributes
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from ... import __version__
from ..errors import describe
from ..names import WORKER_NAME
from ..settings import Settings
from .telemetry_config import wanted

if TYPE_CHECKING:
    from .consumer_spans import ConsumerSpans
    from .job_durations import JobDurations

log = logging.getLogger(__name__)
SCOPE = "worker.chassis"
FLUSH_TIMEOUT = 3.0  # seconds the final flush may take on shutdown

ATTR_SYSTEM = msg_attrs.MESSAGING_SYSTEM
ATTR_DESTINATION = msg_attrs.MESSAGING_DESTINATION_NAME
ATTR_MESSAGE_ID = msg_attrs.MESSAGING_MESSAGE_ID
ATTR_OPERATION = msg_attrs.MESSAGING_OPERATION_TYPE
ATTR_OPERATION_NAME = msg_attrs.MESSAGING_OPERATION_NAME
ATTR_CONSUMER = msg_attrs.MESSAGING_CONSUMER_GROUP_NAME
ATTR_SUBSCRIPTION = msg_attrs.MESSAGING_DESTINATION_SUBSCRIPTION_NAME
ATTR_DELIVERY_COUNT = "messaging.nats.delivery_count"
ATTR_STREAM = "messaging.nats.stream"
ATTR_STREAM_SEQ = "messaging.nats.stream_sequence"
ATTR_LANE = "worker.lane"
ATTR_VERSION = "worker.version"
ATTR_OUTCOME = "worker.outcome"
# Semconv's advice for messaging durations, in seconds (the SDK's default buckets are meant for
# milliseconds and would put every job in the first one).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


class Telemetry:
    """Tracer, meter and the instruments the chassis records into."""

    def __init__(
        self,
        settings: Settings,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        shutdown: Callable[[], None] | None = None,
        consumer_spans: ConsumerSpans | None = None,
        durations: JobDurations | None = None,
    ) -> None:
        self.settings = settings
        # Set when the CONSUMER span skips the SDK (OTLP export, standard sampler): the worker
        # then records it through this instead of start_consume/end_consume.
        self.consumer_spans = consumer_spans
        self.tracing = tracer_provider is not None
        self.metrics = meter_provider is not None
        self.tracer: Tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer(
            SCOPE, __version__
        )
        self.meter: Meter | None = (
            meter_provider.get_meter(SCOPE, __version__) if meter_provider else None
        )
        self._shutdown = shutdown
        self._static = consumer_attributes(settings)
        self.backlog: dict[str, int] = {"pending": 0, "unacked": 0}
        self._consume_name = f"process {settings.names.ingress}"  # the same for every job
        # messaging.process.duration, aggregated by the chassis (see job_durations.py); the
        # worker records into it directly. None when metrics are off.
        self.durations = durations

    # ------------------------------------------------------------------ producer side

    @contextmanager
    def producing(self, subject: str, headers: dict[str, str]) -> Iterator[Span | None]:
        """A PRODUCER span whose context is injected into ``headers`` (no-op when off)."""
        if not self.tracing:
            yield None
            return
        with self.tracer.start_as_current_span(
            f"send {subject}",
            kind=SpanKind.PRODUCER,
            attributes={
                ATTR_SYSTEM: "nats",
                ATTR_DESTINATION: subject,
                ATTR_OPERATION: "send",
                ATTR_OPERATION_NAME: "send",
                ATTR_MESSAGE_ID: headers.get("Nats-Msg-Id", ""),
            },
        ) as span:
            propagate.inject(headers)
            yield span

    @contextmanager
    def replaying(
        self, subject: str, headers: dict[str, str], dlq_headers: Mapping[str, str]
    ) -> Iterator[None]:
        """A PRODUCER span for a DLQ replay, *linked* to the dead letter's original trace."""
        if not self.tracing:
            yield
            return
        original = trace.get_current_span(propagate.extract(dict(dlq_headers)))
        links = [Link(original.get_span_context())] if original.get_span_context().is_valid else []
        for key in ("traceparent", "tracestate"):
            headers.pop(key, None)
        with self.tracer.start_as_current_span(
            f"send {subject}",
            kind=SpanKind.PRODUCER,
            links=links,
            context=Context(),  # a replay starts a new trace, linked to the failed one
            attributes={
                ATTR_SYSTEM: "nats",
                ATTR_DESTINATION: subject,
                ATTR_OPERATION: "send",
                "worker.replay": True,
            },
        ):
            propagate.inject(headers)
            yield

    # ------------------------------------------------------------------ consumer side

    def current_headers(self) -> dict[str, str]:
        """W3C headers of the current span (empty when tracing is off or no span is current)."""
        carrier: dict[str, str] = {}
        if self.tracing:
            propagate.inject(carrier)
        return carrier

    def extract(self, headers: Mapping[str, str] | None) -> Context:
        return propagate.extract(headers or {})

    def start_consume(self, msg: Msg) -> tuple[Span, object]:
        """Start the CONSUMER span of one delivery and make it current.

        The hot path of tracing, so it does the least it can: the producer's context is
        extracted only when a ``traceparent`` came along, the span name is built once, and
        attributes (which need the parsed ack metadata) are set only on a recording span.
        Returns the span and the context token for :meth:`end_consume`.
        """
        headers = msg.headers
        parent = self.extract(headers) if headers and "traceparent" in headers else None
        span = self.tracer.start_span(self._consume_name, context=parent, kind=SpanKind.CONSUMER)
        if span.is_recording():
            meta = msg.metadata
            span.set_attributes(self._static)
            span.set_attribute(ATTR_DELIVERY_COUNT, int(meta.num_delivered or 1))
            span.set_attribute(ATTR_STREAM_SEQ, meta.sequence.stream)
            if headers and (msg_id := headers.get("Nats-Msg-Id")):
                span.set_attribute(ATTR_MESSAGE_ID, msg_id)
        return span, context_api.attach(trace.set_span_in_context(span))

    @staticmethod
    def end_consume(span: Span, token: object) -> None:
        context_api.detach(token)  # type: ignore[arg-type]
        span.end()

    @staticmethod
    def fail(span: Span, exc: BaseException, outcome: str) -> None:
        span.record_exception(exc)
        span.set_attribute(ATTR_OUTCOME, outcome)
        span.set_status(Status(StatusCode.ERROR, describe(exc, 256)))

    # ------------------------------------------------------------------ metrics

    def observe(
        self, counters: Callable[[], Mapping[str, int]], in_flight: Callable[[], int]
    ) -> None:
        """Register observable instruments that read the worker's counters at collection time."""
        if self.meter is None:
            return
        lane = {ATTR_LANE: self.settings.lane}

        def counter(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda _options: [Observation(counters()[name], lane)]

        for name, what in (
            ("processed", "Jobs handled successfully"),
            ("failed", "Handler failures (exceptions and timeouts)"),
            ("retried", "Jobs handed back for another attempt"),
            ("dead_lettered", "Jobs sent to the dead-letter queue"),
        ):
            self.meter.create_observable_counter(
                f"worker.jobs.{name}", [counter(name)], unit="{job}", description=what
            )
        self.meter.create_observable_up_down_counter(
            "worker.jobs.in_flight",
            [lambda _o: [Observation(in_flight(), lane)]],
            unit="{job}",
            description="Jobs being handled right now",
        )
        for key, what in (
            ("pending", "waiting in the lane, not yet delivered"),
            ("unacked", "delivered and not yet acknowledged"),
        ):
            self.meter.create_observable_gauge(
                f"worker.lane.{key}",
                [lambda _o, key=key: [Observation(self.backlog[key], lane)]],  # type: ignore[misc]
                unit="{job}",
                description=f"Jobs {what} (what KEDA's scaler reads)",
            )

    def shutdown(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Flush spans and metrics (graceful stop), waiting at most ``timeout`` seconds.

        The OTLP exporter retries an unreachable collector with backoff for much longer than a
        container's stop grace period, so the flush runs on a daemon thread that is abandoned
        (spans dropped, a warning logged) once the time is up; the exit is never held hostage.
        """
        if self._shutdown is None:
            return
        close = self._shutdown

        def run() -> None:
            try:
                close()
            except Exception as exc:  # an unreachable collector must not fail the exit
                log.warning("telemetry flush failed: %s", describe(exc))

        flusher = threading.Thread(target=run, name="telemetry-flush", daemon=True)
        flusher.start()
        flusher.join(timeout)
        if flusher.is_alive():
            log.warning(
                "telemetry flush still waiting after %gs (collector unreachable?); "
                "leaving without it",
                timeout,
            )


def consumer_attributes(settings: Settings) -> dict[str, str]:
    """The CONSUMER span's attributes that are the same for every delivery.

    The destination is the ingress, not the stored subject: that one carries the route
    generation, the bucket and the job's key, and would make span names unbounded.
    """
    return {
        ATTR_SYSTEM: "nats",
        ATTR_DESTINATION: settings.names.ingress,
        ATTR_OPERATION: "process",
        ATTR_OPERATION_NAME: "process",
        ATTR_CONSUMER: settings.names.durable,
        ATTR_SUBSCRIPTION: settings.names.durable,
        ATTR_STREAM: settings.stream_name,
        ATTR_LANE: settings.lane,
        ATTR_VERSION: __version__,
    }


class TraceContextFilter(logging.Filter):
    """Stamp ``trace_id``/``span_id`` of the current span on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


def setup(settings: Settings, *, dev: bool = False) -> Telemetry | None:
    """Build providers and exporters from the environment; None when nothing is asked for."""
    traces, metrics = wanted(settings, dev=dev)
    if traces == "none" and not metrics:
        return None
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(
        {
            service_attributes.SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", WORKER_NAME),
            service_attributes.SERVICE_VERSION: __version__,
            "service.instance.id": settings.instance_id,
            ATTR_LANE: settings.lane,
        }
    )
    closers: list[Callable[[], Any]] = []
    tracer_provider = None
    consumer_spans = None
    if traces != "none":
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        # shutdown_on_exit=False: we flush ourselves, with a bound (see Telemetry.shutdown);
        # the SDK's own atexit hook would wait out an unreachable collector at exit.
        sdk_tracer = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
        if traces == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            sdk_tracer.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            consumer_spans = _consumer_spans(settings, resource)
            if consumer_spans is not None:
                closers.append(consumer_spans.shutdown)
        else:
            sdk_tracer.add_span_processor(
                SimpleSpanProcessor(ConsoleSpanExporter(formatter=_one_line_span))
            )
        tracer_provider = sdk_tracer
        # Global, so the handler's own spans (and instrumented libraries) join the job's trace.
        trace.set_tracer_provider(sdk_tracer)
        closers.append(sdk_tracer.shutdown)
        for handler in logging.getLogger().handlers:
            handler.addFilter(TraceContextFilter())
    meter_provider = None
    durations = None
    if metrics:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

        from .job_durations import reader_with

        durations = job_durations(settings)
        readers: list[Any] = []
        if "otlp" in metrics:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(
                reader_with(durations, PeriodicExportingMetricReader, OTLPMetricExporter())
            )
        if "prometheus" in metrics:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            readers.append(reader_with(durations, PrometheusMetricReader))
        sdk_meter = SdkMeterProvider(
            resource=resource, metric_readers=readers, shutdown_on_exit=False
        )
        meter_provider = sdk_meter
        set_meter_provider(sdk_meter)  # the handler's own instruments export with the chassis's
        closers.append(sdk_meter.shutdown)
    log.info(
        "telemetry: traces=%s metrics=%s%s",
        traces,
        ",".join(metrics) or "none",
        " (consumer spans: chassis)" if consumer_spans else "",
    )

    def shutdown() -> None:
        for close in closers:
            close()

    return Telemetry(settings, tracer_provider, meter_provider, shutdown, consumer_spans, durations)


def job_durations(settings: Settings) -> JobDurations:
    """The chassis's ``messaging.process.duration`` (give it to the readers and to Telemetry)."""
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from .job_durations import JobDurations

    return JobDurations(
        DURATION_BUCKETS,
        {ATTR_SYSTEM: "nats", ATTR_LANE: settings.lane},
        InstrumentationScope(SCOPE, __version__),
        ATTR_OUTCOME,
    )


def _consumer_spans(settings: Settings, resource: Any) -> ConsumerSpans | None:
    """The SDK-free CONSUMER span recorder, unless the SDK must record it (see wanted())."""
    if settings.sdk_consumer_spans:
        return None
    from . import consumer_spans as fast

    sampling = fast.wanted()
    if sampling is None:
        return None
    env = os.environ
    encoder = fast.OtlpEncoder(
        dict(resource.attributes), SCOPE, __version__, consumer_attributes(settings)
    )
    return fast.ConsumerSpans(
        sampling,
        fast.OtlpSender(encoder, env),
        max_queue=int(fast.env_number(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)),
        batch_size=int(fast.env_number(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
        delay=fast.env_number(env, "OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000,
    )


def _one_line_span(span: Any) -> str:
    """Console format for dev mode: one readable line per span instead of a JSON page."""
    ctx, parent = span.context, span.parent
    took = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    attrs = span.attributes or {}
    return (
        f"span {span.name} [{span.kind.name.lower()}] trace={ctx.trace_id:032x} "
        f"span={ctx.span_id:016x} parent={f'{parent.span_id:016x}' if parent else '-'} "
        f"{took:.1f}ms {span.status.status_code.name}"
        + (f" delivery={attrs[ATTR_DELIVERY_COUNT]}" if ATTR_DELIVERY_COUNT in attrs else "")
        + "\n"
    )


def prometheus_text() -> bytes:
    """The Prometheus exposition of the default registry (fed by PrometheusMetricReader)."""
    from prometheus_client import REGISTRY, generate_latest

    return bytes(generate_latest(REGISTRY))
