"""With telemetry on, the handler's own OpenTelemetry calls join the job's trace and metrics.

Runs in a subprocess: the global providers can be set once per process, and the test process
must stay free of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from worker_testkit import PACKAGE

PROBE = textwrap.dedent(
    """
    import json
    from nats.aio.msg import Msg
    from opentelemetry import metrics, trace
    from PKG.runtime.settings import load_settings
    from PKG.runtime.observe.telemetry import setup

    telemetry = setup(load_settings())
    msg = Msg(
        _client=None,
        subject="jobs.v1.x",
        reply="$JS.ACK.S.c.1.5.5.1700000000000000000.0",
        data=b"[]",
        headers=None,
    )
    span, token = telemetry.start_consume(msg)
    with trace.get_tracer("handler").start_as_current_span("own work") as own:
        own_recording = own.is_recording()
    telemetry.end_consume(span, token)
    counter = metrics.get_meter("handler").create_counter("own.counter")
    print(json.dumps(dict(
        job=[span.get_span_context().trace_id, span.get_span_context().span_id],
        own=[own.get_span_context().trace_id, own.parent.span_id if own.parent else None],
        own_recording=own_recording,
        meter=type(counter).__module__,
    )))
    telemetry.shutdown()
    """
).replace("PKG", PACKAGE)


def test_handler_spans_are_children_of_the_consumer_span_and_its_meter_is_the_sdks() -> None:
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:9/v1/metrics",
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    job_trace, job_span = result["job"]
    assert result["own"] == [job_trace, job_span]
    assert result["own_recording"] is True
    assert result["meter"].startswith("opentelemetry.sdk.metrics"), result["meter"]
