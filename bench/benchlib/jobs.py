"""The harness's own NATS client work: publish jobs, watch the stream drain, watch acks.

Acked jobs leave a work-queue stream, so the stream's message count is an exact, black-box
progress meter: below N means the first ack happened, zero means every job was acked.

A worker acks a job by publishing to the job's reply subject, ``$JS.ACK.<stream>.<consumer>.
<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>``. That is an ordinary core NATS
publish, so a plain subscriber on ``$JS.ACK.>`` (the harness's own connection) sees every ack as
it happens: :class:`AckWatch` (first ack as an event; per-job ack time for latency at the ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from .procs import Load

PAYLOAD_BYTES = 256
ITEM_MAX = 200  # the template's Job.item max_length
# The template's demo fields, with values that make its handler do nothing (no failure, no work).
# Only those the generated Job model still has are sent (see use_fields): its model forbids extra
# fields, so a field removed from the template must not be sent.
_OPTIONAL = (("quantity", "1"), ("work_seconds", "0.0"), ("fail_times", "0"))
_fields: set[str] | None = None  # None: the template's fields as of this writing


def use_fields(fields: list[str] | None) -> None:
    """Send only the optional fields the generated ``Job`` declares (``None``: all of them)."""
    global _fields
    _fields = set(fields) if fields is not None else None


def payload(job_id: str, size: int = PAYLOAD_BYTES) -> bytes:
    """A valid job of exactly ``size`` bytes, every field of the template's Job set.

    ``{"id": ..., "quantity": 1, "work_seconds": 0.0, "fail_times": 0, "item": "xxx..."}``: the
    default handler does nothing with it (no failures, no work); ``item`` (at most 200 characters)
    pads it to size, and JSON whitespace before the closing brace (no field) pads the rest if
    the model has fewer fields.
    """
    fields = "".join(
        f', "{name}": {value}' for name, value in _OPTIONAL if _fields is None or name in _fields
    )
    head = f'{{"id": "{job_id}"{fields}, "item": "'.encode()
    pad = size - len(head) - 2
    if pad < 0:
        raise ValueError(f"cannot pad job {job_id!r} to {size} bytes")
    item = min(pad, ITEM_MAX)
    return head + b"x" * item + b'"' + b" " * (pad - item) + b"}"


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


ACK_SUBJECTS = "$JS.ACK.>"


def ack_stream_seq(subject: str, stream: str) -> int | None:
    """The stream sequence an ack subject refers to, if it is an ack for ``stream``.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`` (9 tokens), or the
    newer form with domain and account hash, ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.
    <delivered>.<sseq>.<dseq>.<ts>.<pending>[.<token>]`` (11 or 12 tokens)."""
    tokens = subject.split(".")
    if len(tokens) == 9 and tokens[2] == stream:
        return int(tokens[5])
    if len(tokens) >= 11 and tokens[4] == stream:
        return int(tokens[7])
    return None


def _is_ack(data: bytes) -> bool:
    """An empty body or ``+ACK`` acknowledges; ``+NAK``, ``+WPI``, ``+TERM`` do not."""
    return not data or data.startswith(b"+ACK")


class AckWatch:
    """Sees the workers' acks for ``stream`` on the harness's connection (a core subscription to
    ``$JS.ACK.>``: every ack is an ordinary publish, so this needs nothing from the worker).

    * ``first_at``: ``time.monotonic()`` when the first ack arrived (an event, not a poll);
      with ``keep=False`` the subscription is dropped right after it, so a throughput run does not
      pay for a copy of every ack;
    * ``acked``: stream sequence -> ``time.time_ns()`` of the first ack of that message
      (``keep=True``, for latency at the ack).

    Times are taken in the harness's callback: they include the server's forwarding and the
    harness's own dispatch (tens of µs on an idle loop; more while it is busy publishing).
    """

    def __init__(self, nc: Client, stream: str, keep: bool = False) -> None:
        self.nc, self.stream, self.keep = nc, stream, keep
        self.first_at: float | None = None
        self.acked: dict[int, int] = {}
        self.first_event = asyncio.Event()
        self._sub: Subscription | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> AckWatch:
        self._sub = await self.nc.subscribe(ACK_SUBJECTS, cb=self._on_ack)
        await self.nc.flush(timeout=5)  # the server knows the subscription before we go on
        return self

    async def __aenter__(self) -> AckWatch:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):  # the connection may be going away
                await sub.unsubscribe()

    async def _on_ack(self, msg: Msg) -> None:
        now_ns, now = time.time_ns(), time.monotonic()
        if not _is_ack(msg.data):
            return
        seq = ack_stream_seq(msg.subject, self.stream)
        if seq is None:
            return
        if self.first_at is None:
            self.first_at = now
            self.first_event.set()
            if not self.keep:  # from another task: never cancel the one running this callback
                self._stopping = asyncio.get_running_loop().create_task(self.stop())
        if self.keep and seq not in self.acked:
            self.acked[seq] = now_ns
