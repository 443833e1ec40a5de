"""The SDK-free CONSUMER span: same decisions as the SDK, valid OTLP, nothing lost on shutdown."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

import pytest
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.trace import sampling as sdk_sampling
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from otlp_sink import OtlpSink, flatten, value

from {{ cookiecutter.__package_name }}.runtime.observe.consumer_spans import (
    ConsumerSpans,
    OtlpEncoder,
    OtlpSender,
    Record,
    Sampling,
    env_number,
    parse_headers,
    parse_traceparent,
    traces_endpoint,
    wanted,
)

# The destination is the ingress, one per worker: stored subjects carry buckets and keys.
STATIC = {
    "messaging.system": "nats",
    "worker.lane": "v1",
    "messaging.destination.name": "orders.jobs.order",
}
RESOURCE = {"service.name": "svc", "process.pid": 42, "flag": True, "list": ["a", "b"]}


def js_msg(headers: dict[str, str] | None = None, delivered: int = 2, seq: int = 41) -> Msg:
    return Msg(
        _client=None,  # type: ignore[arg-type]
        subject="orders.v1.order",
        reply=f"$JS.ACK.ORDERS.worker-v1.{delivered}.{seq}.7.1700000000000000000.3",
        data=b"{}",
        headers=headers,
    )


def decode(data: bytes) -> list[Span]:
    request = ExportTraceServiceRequest.FromString(data)
    return [exported.span for exported in flatten([request])]


# ------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("name", Sampling.KNOWN)
@pytest.mark.parametrize("arg", ["0.25", None])
@pytest.mark.parametrize("parent_flags", [None, 0, 1])
def test_sampling_decides_like_the_sdk(
    name: str, arg: str | None, parent_flags: int | None
) -> None:
    env = {"OTEL_TRACES_SAMPLER": name}
    if arg is not None:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    ours = Sampling.from_env(env)
    assert ours is not None
    rate = float(arg) if arg is not None else 1.0
    sdk = {
        "always_on": sdk_sampling.ALWAYS_ON,
        "always_off": sdk_sampling.ALWAYS_OFF,
        "traceidratio": sdk_sampling.TraceIdRatioBased(rate),
        "parentbased_always_on": sdk_sampling.ParentBased(sdk_sampling.ALWAYS_ON),
        "parentbased_always_off": sdk_sampling.ParentBased(sdk_sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sdk_sampling.ParentBased(sdk_sampling.TraceIdRatioBased(rate)),
    }[name]
    rng = random.Random(7)  # noqa: S311 (reproducible ids, not secrets)
    decisions = set()
    for _ in range(400):
        trace_id = rng.getrandbits(128) or 1
        context = None
        if parent_flags is not None:
            parent = SpanContext(trace_id, 99, is_remote=True, trace_flags=TraceFlags(parent_flags))
            context = trace.set_span_in_context(NonRecordingSpan(parent))
        decision = sdk.should_sample(context, trace_id, "n").decision
        expected = decision == sdk_sampling.Decision.RECORD_AND_SAMPLE
        assert ours.sampled(trace_id, parent_flags) is expected, (trace_id, parent_flags)
        decisions.add(expected)
    ratio_decides = parent_flags is None or not name.startswith("parent")
    if name.endswith("ratio") and arg is not None and ratio_decides:
        assert decisions == {True, False}  # the ratio really splits


def test_unknown_sampler_or_a_proxy_leave_the_span_to_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    collector = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert wanted({**collector, "OTEL_TRACES_SAMPLER": "jaeger_remote"}) is None
    assert wanted({**collector, "OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://collector:4317"}) is None
    assert wanted(collector) is not None
    monkeypatch.setenv("http_proxy", "http://proxy:3128")
    assert wanted(collector) is None
    monkeypatch.setenv("no_proxy", "collector")
    assert wanted(collector) is not None


def test_a_bad_ratio_samples_everything_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ours = Sampling("traceidratio", "lots")
    assert ours.root(2**64 - 1)
    assert "OTEL_TRACES_SAMPLER_ARG" in caplog.text


@pytest.mark.parametrize(
    "header",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
        "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "garbage",
        "",
    ],
)
def test_traceparent_is_read_like_the_sdks_propagator(header: str) -> None:
    sdk = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header}))
    context = sdk.get_span_context()
    expected = (
        (context.trace_id, context.span_id, int(context.trace_flags)) if context.is_valid else None
    )
    assert parse_traceparent(header) == expected


# ------------------------------------------------------------------------------ encoding


def record(**changes: object) -> Record:
    base: dict[str, object] = {
        "trace_id": 0x0AF7651916CD43DD8448EB211C80319C,
        "span_id": 0xB7AD6B7169203331,
        "parent_id": 0,
        "start": 1_700_000_000_000_000_000,
        "end": 1_700_000_000_000_123_456,
        "subject": "orders.v1.order",
        "reply": "$JS.ACK.ORDERS.worker-v1.3.4000000000.7.1700000000000000000.0",
        "msg_id": "job-1",
        "failure": None,
    }
    base.update(changes)
    return tuple(base.values())  # type: ignore[return-value]


def encoder() -> OtlpEncoder:
    return OtlpEncoder(RESOURCE, "worker.chassis", "1.2.3", STATIC)


def test_the_encoding_decodes_with_the_otlp_protobuf_classes() -> None:
    failure = ("retried", "mod.Boom", "it broke", "Traceback ...\n", "Boom: it broke")
    records = [
        record(),
        record(span_id=5, parent_id=0x1122334455667788, msg_id="", failure=failure),
        record(span_id=6, subject="orders.v2.order", reply="not-an-ack"),
        record(span_id=7, reply="$JS.ACK.hub.ACCHASH.ORDERS.w.4.77.9.1700000000000000000.0.tok"),
    ]
    request = ExportTraceServiceRequest.FromString(encoder().request(records))
    [resource_spans] = request.resource_spans
    attributes = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
    assert attributes == RESOURCE
    [scope_spans] = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("worker.chassis", "1.2.3")
    plain, failed, other, with_domain = scope_spans.spans

    assert plain.trace_id == bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
    assert plain.span_id == bytes.fromhex("b7ad6b7169203331")
    assert plain.parent_span_id == b""
    assert plain.name == "process orders.jobs.order"
    assert plain.kind == Span.SPAN_KIND_CONSUMER
    assert (plain.start_time_unix_nano, plain.end_time_unix_nano) == (
        1_700_000_000_000_000_000,
        1_700_000_000_000_123_456,
    )
    assert plain.flags == 0x101
    assert {kv.key: value(kv.value) for kv in plain.attributes} == {
        **STATIC,
        "messaging.nats.delivery_count": 3,
        "messaging.nats.stream_sequence": 4_000_000_000,
        "messaging.message.id": "job-1",
    }
    assert plain.status.code == Status.STATUS_CODE_UNSET
    assert not plain.events

    assert failed.parent_span_id == (0x1122334455667788).to_bytes(8, "big")
    assert failed.flags == 0x301
    assert "messaging.message.id" not in {kv.key for kv in failed.attributes}
    assert {kv.key: value(kv.value) for kv in failed.attributes}["worker.outcome"] == "retried"
    assert (failed.status.code, failed.status.message) == (
        Status.STATUS_CODE_ERROR,
        "Boom: it broke",
    )
    [event] = failed.events
    assert event.name == "exception"
    assert {kv.key: value(kv.value) for kv in event.attributes} == {
        "exception.type": "mod.Boom",
        "exception.message": "it broke",
        "exception.stacktrace": "Traceback ...\n",
        "exception.escaped": "False",
    }

    assert other.name == "process orders.jobs.order"  # whatever the stored subject
    assert "messaging.nats.delivery_count" not in {kv.key for kv in other.attributes}
    domain_attributes = {kv.key: value(kv.value) for kv in with_domain.attributes}
    assert domain_attributes["messaging.nats.delivery_count"] == 4
    assert domain_attributes["messaging.nats.stream_sequence"] == 77


# ------------------------------------------------------------------------------ recording


class Collect(OtlpSender):
    """A sender that keeps batches instead of POSTing them."""

    def __init__(self) -> None:
        self.encoder = encoder()
        self.batches: list[Sequence[Record]] = []

    def send(self, records: Sequence[Record]) -> bool:
        self.batches.append(list(records))
        return True


def test_the_span_is_current_while_the_job_runs_and_continues_the_producers_trace() -> None:
    sender = Collect()
    spans = ConsumerSpans(Sampling("parentbased_always_on"), sender, delay=60)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    msg = js_msg({"traceparent": parent, "tracestate": "vendor=x", "Nats-Msg-Id": "j-1"})
    state = spans.start(msg)
    current = trace.get_current_span().get_span_context()
    assert current.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert current.trace_flags.sampled
    assert current.trace_state.get("vendor") == "x"
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)  # what a publish in the handler sends
    assert carrier["traceparent"].split("-")[2] == f"{current.span_id:016x}"
    spans.end(state, msg, ("retried", ValueError("nope")))
    assert not trace.get_current_span().get_span_context().is_valid
    spans.shutdown()  # exports what is queued
    [[rec]] = sender.batches
    assert rec[:3] == (current.trace_id, current.span_id, 0xB7AD6B7169203331)
    assert rec[6:8] == (msg.reply, "j-1")
    assert rec[8] is not None
    assert rec[8][:3] == ("retried", "ValueError", "nope")


def test_an_unsampled_parent_is_propagated_and_nothing_is_recorded() -> None:
    sender = Collect()
    spans = ConsumerSpans(Sampling("parentbased_always_on"), sender, delay=60)
    msg = js_msg({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"})
    state = spans.start(msg)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    assert carrier["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert carrier["traceparent"].endswith("-00")
    spans.end(state, msg)
    spans.shutdown()
    assert sender.batches == []


def test_a_full_queue_drops_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    sender = Collect()
    spans = ConsumerSpans(Sampling("always_on"), sender, max_queue=3, batch_size=100, delay=60)
    for _ in range(5):
        spans.end(spans.start(js_msg()), js_msg())
    with caplog.at_level(logging.WARNING):
        spans.shutdown()
    assert [len(b) for b in sender.batches] == [3]
    assert "dropped 2 spans" in caplog.text


def test_a_full_batch_is_sent_without_waiting_for_the_schedule() -> None:
    sender = Collect()
    spans = ConsumerSpans(Sampling("always_on"), sender, batch_size=4, delay=60)
    for _ in range(4):
        spans.end(spans.start(js_msg()), js_msg())
    deadline = time.monotonic() + 10
    while not sender.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [len(b) for b in sender.batches] == [4]
    spans.shutdown()


# ------------------------------------------------------------------------------ sending


def test_the_sender_honours_endpoint_headers_and_compression() -> None:
    with OtlpSink() as sink:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint + "/",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%20ecret,x-team=jobs",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        }
        sender = OtlpSender(encoder(), env)
        assert sender.send([record(), record(span_id=9)])
        [headers] = sink.headers
        assert headers["api-key"] == "s ecret"
        assert headers["x-team"] == "jobs"
        assert headers["content-encoding"] == "gzip"
        assert headers["content-type"] == "application/x-protobuf"
        assert [s.span_id for s in sink.spans()] == [0xB7AD6B7169203331, 9]


def test_an_unreachable_collector_drops_the_batch_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with OtlpSink() as sink:
        endpoint = sink.endpoint
    sender = OtlpSender(encoder(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint + "/v1/traces"})
    with caplog.at_level(logging.WARNING):
        assert not sender.send([record()])
        assert not sender.send([record()])
    assert sender.failures == 2
    assert caplog.text.count("could not export") == 1


def test_a_collector_error_status_counts_as_a_failure() -> None:
    with OtlpSink(status=503) as sink:
        sender = OtlpSender(encoder(), {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint})
        assert not sender.send([record()])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "http://localhost:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t/custom",
            },
            "https://t/custom",
        ),
    ],
)
def test_the_endpoint_follows_the_otlp_rules(env: dict[str, str], expected: str) -> None:
    assert traces_endpoint(env) == expected


def test_headers_parse_like_the_exporter() -> None:
    assert parse_headers("a=1, B = two%3D2 ,bad,=x") == {"a": "1", "b": "two=2"}


def test_bad_numbers_fall_back_to_the_default_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert env_number({"X": "soon"}, "X", 10) == 10
        assert env_number({"X": "-1"}, "X", 10) == 10
    assert env_number({"X": "2.5"}, "X", 10) == 2.5
    assert env_number({}, "X", 10) == 10
    assert caplog.text.count("is not a positive number") == 2


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_an_exception_that_cannot_print_itself_still_ends_the_span() -> None:
    sender = Collect()
    spans = ConsumerSpans(Sampling("always_on"), sender, delay=60)
    msg = js_msg()
    spans.end(spans.start(msg), msg, ("retried", UnprintableError()))
    spans.shutdown()
    [[rec]] = sender.batches
    assert rec[8] is not None
    assert rec[8][0] == "retried"
    assert rec[8][4] == "UnprintableError"  # the status text falls back to the type
