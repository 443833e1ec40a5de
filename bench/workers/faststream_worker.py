"""FastStream's NATS JetStream pull subscriber, written the way its docs recommend.

``@broker.subscriber(..., stream=..., pull_sub=PullSub(batch_size=...))`` with a typed (pydantic)
handler, one message per call, acked by FastStream after the handler returns (its default ack
policy). Run with its CLI, ``faststream run faststream_worker:app``, which uses uvloop when it is
installed. Logging is off (``logger=None`` on broker and app) for fairness with the other workers,
as in ``shared/perf-notes.md``.

It binds to the durable consumer and stream the generated worker provisions (``declare=False``:
FastStream must not rewrite the stream's subjects). The job model is the template's ``Job``, so
FastStream validates the same payload the generated worker does. With ``BENCH_LATENCY_OUT`` set,
the handler-start time of every job (wall clock, ns) is appended there as ``<id> <ns>`` (one
write per job, as in ``latency_handler.py``).

Env: NATS_URL, STREAM_NAME, DURABLE, FETCH_BATCH, SUBJECT_FILTER, BENCH_LATENCY_OUT (optional).
"""

from __future__ import annotations

import os
import time

from faststream import FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from pydantic import BaseModel, ConfigDict, Field

LATENCY_OUT = os.environ.get("BENCH_LATENCY_OUT")
_FD = os.open(LATENCY_OUT, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if LATENCY_OUT else -1
_now_ns = time.time_ns


class Job(BaseModel):
    """Same fields and rules as the template's ``job.py``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    item: str = Field(default="example", max_length=200)
    quantity: int = Field(default=1, ge=1)
    work_seconds: float = Field(default=0.0, ge=0.0, le=3600.0)
    fail_times: int = Field(default=0, ge=0)


broker = NatsBroker(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"), logger=None)
app = FastStream(broker, logger=None)


@broker.subscriber(
    os.environ.get("SUBJECT_FILTER", "bench-worker.v1.>"),
    stream=JStream(os.environ.get("STREAM_NAME", "BENCH_WORKER"), declare=False),
    durable=os.environ.get("DURABLE", "bench-worker-v1"),
    pull_sub=PullSub(batch_size=int(os.environ.get("FETCH_BATCH", "100"))),
)
async def handle(job: Job) -> None:
    if _FD >= 0:
        started = _now_ns()
        os.write(_FD, f"{job.id} {started}\n".encode())
