"""Each delivery's CONSUMER span, recorded and sent over OTLP/HTTP without the SDK's per-span cost.

Why this exists: the OpenTelemetry Python SDK spends about 15 µs creating a span and about 40 µs
encoding it for OTLP, while a no-op job costs the chassis about 13 µs. Traced through the SDK,
every job cost five times as much. This module does the same work for the one span the chassis
opens per message, at about 10 µs in all (measured by the template's ``bench/``):

* ids and the sampling decision follow the W3C and OpenTelemetry rules (the standard
  ``OTEL_TRACES_SAMPLER`` values), continuing the producer's ``traceparent``;
* the span's context is made current, so log lines, retries, DLQ entries, publishes and the
  handler's own SDK spans join the trace exactly as with an SDK span;
* a sampled span is one tuple on a queue. A background thread encodes batches to OTLP protobuf,
  with the span's name and the static attributes encoded once, and POSTs them to the
  ``OTEL_EXPORTER_OTLP_*`` endpoint (headers, timeout, compression and TLS files honoured).

Anything else (PRODUCER and replay spans, the handler's spans, console output, other samplers)
stays on the SDK. ``SDK_CONSUMER_SPANS=true``, ``OTEL_TRACES_SAMPLER`` values this module does
not know, and an HTTP proxy in front of the collector route the consumer span through the SDK too.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import random
import re
import ssl
import struct
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies, proxy_bypass

from nats.aio.msg import Msg
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from ... import __version__
from ..errors import describe

log = logging.getLogger(__name__)

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ID_LIMIT = (1 << 64) - 1
USER_AGENT = f"worker-chassis-otlp/{__version__}"
_U64 = struct.Struct("<Q").pack
_SMALL = [bytes((n,)) for n in range(0x80)]  # one-byte varints, built once

# Span record: (trace id, span id, parent span id or 0, start ns, end ns, subject, reply subject,
# message id, failure or None). Failure: (outcome, exception type, message, stack, status text).
Failure = tuple[str, str, str, str, str]
Record = tuple[int, int, int, int, int, str, str, str, Failure | None]


# ------------------------------------------------------------------------------ sampling


class Sampling:
    """One of the standard ``OTEL_TRACES_SAMPLER`` rules, decided without the SDK."""

    KNOWN = (
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    )

    def __init__(self, name: str, arg: str | None = None) -> None:
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        ratio = 1.0 if root == "always_on" else 0.0 if root == "always_off" else _ratio(arg)
        # The SDK's TraceIdRatioBased: sampled when the trace id's low 64 bits are below this.
        self.bound = round(ratio * (_ID_LIMIT + 1))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Sampling | None:
        """The configured rule, or None when it is not a standard one (the SDK decides then)."""
        name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        if name not in cls.KNOWN:
            return None
        return cls(name, env.get("OTEL_TRACES_SAMPLER_ARG"))

    def root(self, trace_id: int) -> bool:
        return (trace_id & _ID_LIMIT) < self.bound

    def sampled(self, trace_id: int, parent_flags: int | None) -> bool:
        """``parent_flags``: the remote parent's trace flags, None for a root span."""
        if parent_flags is not None and self.parent_based:
            return bool(parent_flags & TraceFlags.SAMPLED)
        return self.root(trace_id)


def _ratio(arg: str | None) -> float:
    try:
        ratio = float(arg) if arg is not None else 1.0
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a ratio in [0, 1]; sampling all", arg)
        return 1.0
    return ratio


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C ``traceparent``; None when it is invalid."""
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags_hex, 16)


# ------------------------------------------------------------------------------ recording


class ConsumerSpans:
    """Start, end and queue CONSUMER spans; a daemon thread exports them."""

    def __init__(
        self,
        sampling: Sampling,
        exporter: OtlpSender,
        *,
        max_queue: int = 2048,
        batch_size: int = 512,
        delay: float = 1.0,
    ) -> None:
        self.sampling = sampling
        self.exporter = exporter
        self.queue: deque[Record] = deque()
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.delay = delay
        self.dropped = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumer-spans", daemon=True)
        self._thread.start()

    def start(self, msg: Msg) -> tuple[int, int, int, int, bool, object]:
        """Make a new span current; returns the state :meth:`end` needs."""
        headers = msg.headers
        parent = None
        if headers and "traceparent" in headers:
            parent = parse_traceparent(headers["traceparent"])
        if parent is None:
            trace_id, parent_id, flags = random.getrandbits(128) or 1, 0, None
        else:
            trace_id, parent_id, flags = parent
        sampled = self.sampling.sampled(trace_id, flags)
        state = None
        if parent is not None and headers and "tracestate" in headers:
            state = TraceState.from_header([headers["tracestate"]])
        span_id = random.getrandbits(64) or 1
        context = SpanContext(trace_id, span_id, False, SAMPLED if sampled else NOT_SAMPLED, state)
        token = context_api.attach(trace.set_span_in_context(NonRecordingSpan(context)))
        return trace_id, span_id, parent_id, time.time_ns(), sampled, token

    def end(
        self,
        state: tuple[int, int, int, int, bool, object],
        msg: Msg,
        failure: tuple[str, BaseException] | None = None,
    ) -> None:
        trace_id, span_id, parent_id, started, sampled, token = state
        context_api.detach(token)  # type: ignore[arg-type]
        if not sampled:
            return
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        headers = msg.headers
        queue.append(
            (
                trace_id,
                span_id,
                parent_id,
                started,
                time.time_ns(),
                msg.subject,
                msg.reply,
                (headers.get("Nats-Msg-Id") or "") if headers else "",
                _failure(*failure) if failure else None,
            )
        )
        if len(queue) == self.batch_size:  # once per batch, not on every span after it
            self._wake.set()

    # -------------------------------------------------------------------------- export

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.delay)
            self._wake.clear()
            self._export_queued()
        self._export_queued()

    def _export_queued(self) -> None:
        queue, size = self.queue, self.batch_size
        while queue:
            batch = [queue.popleft() for _ in range(min(size, len(queue)))]
            try:
                self.exporter.send(batch)
            except Exception:  # a bug here must not stop tracing for good
                log.exception("could not encode %d spans; dropped", len(batch))
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            log.warning(
                "dropped %d spans: the export queue was full (collector too slow?)", dropped
            )

    def shutdown(self, timeout: float = 3.0) -> None:
        """Export what is queued (graceful stop); Telemetry bounds the wait."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)


def _failure(outcome: str, exc: BaseException) -> Failure:
    """What the SDK's ``record_exception`` and the chassis's ERROR status would say."""
    module, name = type(exc).__module__, type(exc).__qualname__
    kind = f"{module}.{name}" if module and module != "builtins" else name
    try:  # a handler's exception may fail to print itself; the span must still end
        message = str(exc)
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        message, stack = "", ""
    return outcome, kind, message, stack, describe(exc, 256)


# ------------------------------------------------------------------------------ encoding


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited protobuf field (tag byte(s) already encoded)."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[_any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def _key_values(attributes: Mapping[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_any_value(v)) for k, v in attributes.items()]


class OtlpEncoder:
    """OTLP ``ExportTraceServiceRequest`` bytes, written directly (the wire format is stable).

    Field numbers are those of ``opentelemetry/proto/trace/v1/trace.proto``; the unit tests decode
    the output with the generated protobuf classes.
    """

    def __init__(
        self,
        resource: Mapping[str, Any],
        scope_name: str,
        scope_version: str,
        static_attributes: Mapping[str, Any],
    ) -> None:
        resource_pb = PbResource(attributes=_key_values(resource)).SerializeToString()
        scope_pb = InstrumentationScope(name=scope_name, version=scope_version)
        self._resource = _field(b"\x0a", resource_pb)  # ResourceSpans.resource = 1
        self._scope = _field(b"\x0a", scope_pb.SerializeToString())  # ScopeSpans.scope = 1
        self._static = self.attributes(static_attributes)
        # Name, kind and the static attributes: the same for every delivery (the destination is
        # the ingress, so no per-subject state grows with keys or buckets).
        destination = static_attributes.get("messaging.destination.name", "")
        self._head = (
            _field(b"\x2a", f"process {destination}".encode())  # name = 5
            + b"\x30\x05"  # kind = 6: SPAN_KIND_CONSUMER
            + self._static
        )
        # Keys of the per-delivery attributes, as KeyValue.key fields followed by the tag of
        # KeyValue.value (2): only the value is written per span.
        self._delivery_key = _field(b"\x0a", b"messaging.nats.delivery_count") + b"\x12"
        self._sequence_key = _field(b"\x0a", b"messaging.nats.stream_sequence") + b"\x12"
        self._msg_id_key = _field(b"\x0a", b"messaging.message.id") + b"\x12"

    @staticmethod
    def attributes(attributes: Mapping[str, Any]) -> bytes:
        """Span.attributes (field 9) entries, encoded once."""
        return b"".join(_field(b"\x4a", kv.SerializeToString()) for kv in _key_values(attributes))

    @staticmethod
    def _attribute(key: bytes, value: bytes) -> bytes:
        """One Span.attributes entry from a prepared key and an encoded AnyValue."""
        return _field(b"\x4a", key + _varint(len(value)) + value)

    def _counts(self, reply: str) -> bytes:
        """Delivery count and stream sequence, read from the ack subject as nats-py reads it:
        ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...`` (9 tokens) or, with a domain
        and account hash after ``ACK``, 11 or more."""
        tokens = reply.split(".")
        if len(tokens) == 9:
            delivered, sequence = tokens[4], tokens[5]
        elif len(tokens) >= 11:
            delivered, sequence = tokens[6], tokens[7]
        else:
            return b""
        if not (delivered.isdigit() and sequence.isdigit()):
            return b""
        return self._attribute(
            self._delivery_key,
            b"\x18" + _varint(int(delivered)),  # AnyValue.int_value = 3
        ) + self._attribute(self._sequence_key, b"\x18" + _varint(int(sequence)))

    def _failed(self, failure: Failure, at: int) -> bytes:
        """worker.outcome, the exception event and the ERROR status."""
        outcome, kind, message, stack, status = failure
        exception = {
            "exception.type": kind,
            "exception.message": message,
            "exception.stacktrace": stack,
            "exception.escaped": "False",
        }
        event = (
            b"\x09"
            + _U64(at)  # Event.time_unix_nano = 1
            + _field(b"\x12", b"exception")  # Event.name = 2
            + b"".join(  # Event.attributes = 3
                _field(b"\x1a", kv.SerializeToString()) for kv in _key_values(exception)
            )
        )
        return (
            self.attributes({"worker.outcome": outcome})
            + _field(b"\x5a", event)  # events = 11
            # status = 15: message = 2, code = 3 (STATUS_CODE_ERROR = 2)
            + _field(b"\x7a", _field(b"\x12", status.encode()) + b"\x18\x02")
        )

    def span(self, record: Record) -> bytes:
        """One ScopeSpans.spans entry (field 2)."""
        trace_id, span_id, parent_id, start, end, _subject, reply, msg_id, failure = record
        body = b"".join(
            (
                b"\x0a\x10",  # trace_id = 1
                trace_id.to_bytes(16, "big"),
                b"\x12\x08",  # span_id = 2
                span_id.to_bytes(8, "big"),
                b"\x22\x08" + parent_id.to_bytes(8, "big") if parent_id else b"",  # parent = 4
                self._head,
                b"\x39",  # start_time_unix_nano = 7
                _U64(start),
                b"\x41",  # end_time_unix_nano = 8
                _U64(end),
                self._counts(reply),
                self._attribute(self._msg_id_key, _field(b"\x0a", msg_id.encode()))
                if msg_id
                else b"",
                self._failed(failure, end) if failure else b"",
                # flags = 16 (fixed32): trace flags | HAS_IS_REMOTE (| IS_REMOTE: remote parent)
                b"\x85\x01\x01\x03\x00\x00" if parent_id else b"\x85\x01\x01\x01\x00\x00",
            )
        )
        return b"\x12" + _varint(len(body)) + body

    def request(self, records: Iterable[Record]) -> bytes:
        scope_spans = self._scope + b"".join(map(self.span, records))
        resource_spans = self._resource + _field(b"\x12", scope_spans)  # scope_spans = 2
        return _field(b"\x0a", resource_spans)  # ExportTraceServiceRequest.resource_spans = 1


# ------------------------------------------------------------------------------ sending


class OtlpSender:
    """POST encoded batches to the OTLP/HTTP traces endpoint the ``OTEL_*`` variables name.

    Plain ``http.client`` on one kept-alive connection: ``requests`` (the SDK exporter's
    transport) re-reads netrc, proxies and CA paths on every call, which cost as much CPU as
    encoding the batch. Endpoints behind an HTTP proxy keep the SDK path (see :func:`wanted`).
    """

    def __init__(self, encoder: OtlpEncoder, env: Mapping[str, str]) -> None:
        self.encoder = encoder
        self.endpoint = traces_endpoint(env)
        url = urlsplit(self.endpoint)
        self.path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.compression = (_env(env, "COMPRESSION") or "none").strip().lower()
        self.headers = {
            **parse_headers(_env(env, "HEADERS") or ""),
            "Content-Type": "application/x-protobuf",
            "User-Agent": USER_AGENT,
        }
        if self.compression in ("gzip", "deflate"):
            self.headers["Content-Encoding"] = self.compression
        # The per-signal variable wins when set (as in _env); a bad value warns under its name.
        timeout_name = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
        if not env.get(timeout_name):
            timeout_name = "OTEL_EXPORTER_OTLP_TIMEOUT"
        timeout = env_number(env, timeout_name, 10)
        self.connection: http.client.HTTPConnection
        if url.scheme == "https":
            context = ssl.create_default_context(cafile=_env(env, "CERTIFICATE"))
            client_cert = _env(env, "CLIENT_CERTIFICATE")
            if client_cert:
                context.load_cert_chain(client_cert, _env(env, "CLIENT_KEY"))
            self.connection = http.client.HTTPSConnection(
                url.hostname or "localhost", url.port, timeout=timeout, context=context
            )
        else:
            self.connection = http.client.HTTPConnection(
                url.hostname or "localhost", url.port, timeout=timeout
            )
        self.failures = 0
        self._warned_at = 0.0

    def send(self, records: Sequence[Record]) -> bool:
        body = self.encoder.request(records)
        if self.compression == "gzip":
            body = gzip.compress(body)
        elif self.compression == "deflate":
            body = zlib.compress(body)
        try:
            self.connection.request("POST", self.path, body, self.headers)
            response = self.connection.getresponse()
            response.read()
            ok = 200 <= response.status < 300
            why = f"HTTP {response.status}"
        except Exception as exc:  # unreachable collector: drop the batch, keep working
            self.connection.close()  # the next request reconnects
            ok, why = False, describe(exc, 200)
        if not ok:
            self.failures += 1
            now = time.monotonic()
            if now - self._warned_at >= 60:  # one line a minute, not one per batch
                self._warned_at = now
                log.warning(
                    "could not export %d spans to %s (%s); dropped",
                    len(records),
                    self.endpoint,
                    why,
                )
        return ok


def _env(env: Mapping[str, str], name: str) -> str | None:
    """The traces-specific ``OTEL_EXPORTER_OTLP_TRACES_<name>``, else the general one."""
    return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")


def env_number(env: Mapping[str, str], name: str, default: float) -> float:
    """A positive number from ``env``; like the SDK, a bad value is a warning, not a crash."""
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        log.warning("%s=%r is not a positive number; using %g", name, raw, default)
        return default
    return value


def traces_endpoint(env: Mapping[str, str]) -> str:
    """The per-signal endpoint is used as is; the general one gets ``/v1/traces`` appended."""
    specific = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def parse_headers(value: str) -> dict[str, str]:
    """``key1=value1,key2=value2`` (URL-encoded values), as the OTLP exporter reads it."""
    headers: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep and key.strip():
            headers[unquote(key.strip()).lower()] = unquote(val.strip())
    return headers


def wanted(env: Mapping[str, str] | None = None) -> Sampling | None:
    """The sampling rule when consumer spans can skip the SDK, else None."""
    env = os.environ if env is None else env
    url = urlsplit(traces_endpoint(env))
    if url.scheme not in ("http", "https") or (
        url.scheme in getproxies() and not proxy_bypass(url.hostname or "")
    ):
        return None  # a proxy in the way: the SDK's exporter knows how to go through it
    return Sampling.from_env(env)
