"""A do-nothing OTLP/HTTP collector for tests: keeps every span it is sent, decoded."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


@dataclass
class Exported:
    """One span as the collector saw it, with its resource and scope."""

    span: Span
    resource: dict[str, Any]
    scope: str

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: value(kv.value) for kv in self.span.attributes}

    @property
    def trace_id(self) -> int:
        return int.from_bytes(self.span.trace_id, "big")

    @property
    def span_id(self) -> int:
        return int.from_bytes(self.span.span_id, "big")

    @property
    def parent_id(self) -> int:
        return int.from_bytes(self.span.parent_span_id, "big")


@dataclass
class OtlpSink:
    """``with OtlpSink() as sink``: ``sink.endpoint`` for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""

    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    status: int = 200

    def __enter__(self) -> OtlpSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    with sink._lock:
                        sink.requests.append(request)
                        sink.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(sink.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def spans(self) -> list[Exported]:
        with self._lock:
            requests = list(self.requests)
        return list(flatten(requests))

    def consumer_spans(self) -> list[Exported]:
        return [s for s in self.spans() if s.span.kind == Span.SPAN_KIND_CONSUMER]


def flatten(requests: list[ExportTraceServiceRequest]) -> Iterator[Exported]:
    for request in requests:
        for resource_spans in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    yield Exported(span, resource, scope_spans.scope.name)
