"""The harness's own NATS client work: publish jobs, watch the stream drain.

Acked jobs leave a work-queue stream, so the stream's message count is an exact, black-box
progress meter: below N means the first ack happened, zero means every job was acked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from .procs import Load

PAYLOAD_BYTES = 256


def payload(job_id: str, size: int = PAYLOAD_BYTES) -> bytes:
    """A valid job of exactly ``size`` bytes, every field of the template's Job set.

    ``{"id": ..., "quantity": 1, "work_seconds": 0.0, "fail_times": 0, "item": "xxx..."}``: the
    default handler does nothing with it (no failures, no work); ``item`` (at most 200 characters)
    pads it to size.
    """
    head = (
        f'{{"id": "{job_id}", "quantity": 1, "work_seconds": 0.0, "fail_times": 0, "item": "'
    ).encode()
    pad = size - len(head) - 2
    if pad < 0 or pad > 200:
        raise ValueError(f"cannot pad job {job_id!r} to {size} bytes")
    return head + b"x" * pad + b'"}'


async def connect(url: str) -> Client:
    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=2)


async def publish_jobs(
    js: JetStreamContext, subject: str, n: int, prefix: str, within: float = 120.0
) -> float:
    """Publish ``n`` jobs with many publishes in flight; return the publish rate (jobs/s).

    ``publish_async`` keeps up to 4,000 unacknowledged publishes in flight (perf notes: ~45k/s;
    awaiting each publish would be ~4.4k/s). Every PubAck is checked.
    """
    t0 = time.monotonic()
    futures = []
    for i in range(n):
        job_id = f"{prefix}-{i:07d}"
        futures.append(
            await js.publish_async(
                subject, payload(job_id), wait_stall=30.0, headers={"Nats-Msg-Id": job_id}
            )
        )
    acks = await asyncio.wait_for(asyncio.gather(*futures), within)
    dups = sum(1 for a in acks if a.duplicate)
    if dups:
        raise RuntimeError(f"{dups} duplicate publishes while pre-publishing")
    return n / (time.monotonic() - t0)


async def stream_messages(js: JetStreamContext, stream: str) -> int:
    info = await js.stream_info(stream)
    return int(info.state.messages)


@dataclass
class Drain:
    """How a worker worked off a pre-published backlog (monotonic times)."""

    first_ack_at: float | None = None
    left_at_first: int = 0
    done_at: float | None = None
    left: int = 0
    polls: int = 0
    worker_died: bool = False
    cpu_at_first: float | None = None
    cpu_at_done: float | None = None
    server_cpu_at_first: float | None = None
    server_cpu_at_done: float | None = None
    other_cores: float | None = None  # CPU the rest of the machine used while draining
    series: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, left) per poll


async def watch_drain(
    js: JetStreamContext,
    stream: str,
    n: int,
    alive: Callable[[], bool],
    within: float,
    cpu: Callable[[], float | None],
    server_cpu: Callable[[], float | None],
    load: Callable[[], Load],
) -> Drain:
    """Poll the stream until it is empty: tightly (2 ms) until the first ack, then every 10 ms.

    ``alive()`` says whether the worker still runs; ``cpu()``/``server_cpu()`` read CPU seconds.
    """
    d = Drain(left=n)
    window: Load | None = None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = await stream_messages(js, stream)
        now = time.monotonic()
        d.polls += 1
        d.left = left
        d.series.append((now, left))
        if d.first_ack_at is None and left < n:
            d.first_ack_at, d.left_at_first = now, left
            d.cpu_at_first, d.server_cpu_at_first = cpu(), server_cpu()
            window = load()
        if left == 0:
            d.done_at = now
            d.cpu_at_done, d.server_cpu_at_done = cpu(), server_cpu()
            d.other_cores = window.other_cores() if window is not None else None
            return d
        if not alive():
            d.worker_died = True
            return d
        await asyncio.sleep(0.002 if d.first_ack_at is None else 0.01)
    return d
