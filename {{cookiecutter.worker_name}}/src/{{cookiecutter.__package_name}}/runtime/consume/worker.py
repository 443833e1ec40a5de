"""The processing cycle: beat, pull, process, repeat; and the graceful stop.

The hot path, shaped by measurements (the template repository's ``bench/``, whose README gives
the method and the figures; the numbers are in this project's README, "Sizing CONCURRENCY"):

* ``CONCURRENCY`` long-lived *slot* coroutines read straight from the pull subscription's inbox.
  No task, queue hop or timer is created per message; a quick handler is awaited inline. One idle
  slot waits on the inbox and the others park, so a burst of quick jobs runs in one step of one
  slot (as a callback subscription would), and a job that suspends hands the rest to parked slots.
* Pull requests are *credit*: the puller asks for as many messages as there are free slots, plus
  a small *prefetch* while jobs are quick, once enough slots are free: half the window
  (``min(CONCURRENCY, FETCH_BATCH)``) for quick jobs, so the server never serves one pull per
  freed slot, and fewer as measured handling times grow (``_adapt_refill``), so slots of slow
  jobs do not idle waiting for others to finish. The prefetch covers the jobs that finish during
  one pull round trip, so a freed slot finds its next job waiting instead of idling for ~1 ms;
  it is off for jobs slower than ``PREFETCH_BELOW`` (a job waiting behind a slow one would eat
  into its ``ack_wait``). A request stays open (``expires``) and is refilled as messages arrive,
  like nats.go's ``Consume()``.
* Idle heartbeats on each request tell a live-but-quiet stream from a pull request that died with
  a broker restart (nats.py #504); a dead request's credit is reclaimed and re-issued.
* One *beat* task, not a timer per message, sends ``in_progress`` for long jobs, cancels handlers
  past ``HANDLER_TIMEOUT`` and watches the heartbeats.

Stopping (first SIGTERM/SIGINT): stop pulling; unsubscribe the inbox and hand back (nak) whatever
was delivered but not started; let running jobs finish within ``DRAIN_TIMEOUT``, then nak the rest;
log the counters; drain the connection. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel

from ... import __version__
from ..connection import connect
from ..errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    HandlerTimeoutError,
    Reject,
    Retry,
    WorkerError,
    describe,
)
from ..evolve.provision import provision
from ..settings import Settings
from .acks import AckBatch, ack_batch
from .context import JobContext, bound_context
from .dlq import dead_letter

if TYPE_CHECKING:
    from ..observe.telemetry import Telemetry

log = logging.getLogger(__name__)

Handler = Callable[[Any, JobContext[Any]], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]
Outcome = tuple[str, BaseException] | None  # None: handled and acknowledged
PULL_EXPIRES = 30.0  # a pull request stays open this long on an idle stream
REFUSED_BACKOFF_MAX = 1.0  # longest pause after the server refused a pull request
PULL_HEARTBEAT = 1.0  # the server pings an idle request this often (silence: 3 of them)
_NS = 1_000_000_000
SAMPLE_MASK = 15  # handling times are sampled every SAMPLE_MASK + 1 jobs
# Pull requests per second a busy worker may send, at most (about): the refill threshold is sized
# so that CONCURRENCY / handling time / threshold stays under this (see _adapt_refill).
PULL_RATE_BUDGET = 4000.0
# Prefetch: jobs asked for beyond the free slots, enough for the completions during PULL_LEAD (a
# pull round trip, ~1 ms on loopback, with room to spare), at most CONCURRENCY; none for jobs of
# PREFETCH_BELOW or more, where a round trip is under 1 % of a job and waiting is not free.
PULL_LEAD = 0.003
PREFETCH_BELOW = 0.25


@dataclass
class Counters:
    """What this instance did; logged at stop and reported in heartbeats."""

    processed: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    handed_back: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Slot:
    """One unit of concurrency. The beat reads these fields; the slot writes them."""

    __slots__ = ("handler_since", "msg", "progress_at", "task", "timed_out")

    def __init__(self) -> None:
        self.msg: Msg | None = None
        self.handler_since = 0.0  # loop time the handler started; 0.0 when not in the handler
        self.progress_at = 0.0
        self.timed_out = False
        self.task: asyncio.Task[None] | None = None


class Worker:
    """Consume one lane of the work stream with bounded concurrency.

    ``install_signal_handlers=False`` lets tests and other programs embed the worker and stop it
    with :meth:`stop`.
    """

    def __init__(
        self,
        settings: Settings,
        job_model: type[BaseModel],
        handler: Handler,
        *,
        install_signal_handlers: bool = True,
        telemetry: Telemetry | None = None,
        resources: object = None,
    ) -> None:
        self.settings = settings
        self._context = bound_context(resources)  # what the handler sees as ctx.resources
        self.telemetry = telemetry
        # Chosen once: with telemetry off the hot path has no tracing code at all.
        self._process_job = (
            self._process
            if telemetry is None
            else self._process_recorded
            if telemetry.consumer_spans is not None
            else self._process_traced
            if telemetry.tracing
            else self._process_timed
        )
        self.job_model = job_model
        self.handler = handler
        self.install_signal_handlers = install_signal_handlers
        self.counters = Counters()
        self.recent: deque[float] = deque(maxlen=256)  # sampled handling times (seconds)
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.stop_reason: str | None = None
        self.exit_code = EXIT_OK
        self.ready = asyncio.Event()  # bound to the consumer and pulling
        self.stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._slots = [_Slot() for _ in range(settings.concurrency)]
        self._busy = 0  # slots running a job
        self._credit = 0  # messages requested and not yet taken by a slot (queued ones count)
        # Pull once this many slots are free: half the window for quick jobs, fewer for slow
        # ones (_adapt_refill); a request asks for the free slots plus the prefetch, at most.
        self._refill_max = max(1, min(settings.fetch_batch, settings.concurrency) // 2)
        self._refill = self._refill_max
        self._prefetch = 0  # extra credit beyond the slots while jobs are quick (_adapt_refill)
        self._window = settings.concurrency  # slots + prefetch: the most credit + busy
        self._inbox: asyncio.Queue[Msg] | None = None
        self._handling = 0.0  # smoothed handling time of a job (seconds), sampled
        self._room = asyncio.Event()
        self._leader = False  # an idle slot is waiting on the inbox
        self._parked: list[asyncio.Future[None]] = []  # the other idle slots
        self._promoting = False  # a _promote call is scheduled
        self._activity = 0  # bumped by every delivery and status; the beat watches it
        self._refused_backoff = 0.0  # pause after the server refused a pull request
        self._refused_until = 0.0
        self._refused_logged = 0.0
        self._puller: asyncio.Task[None] | None = None
        self._acks: AckBatch | None = None  # None: acks via msg.ack() (see acks.py)
        self._log_jobs = log.isEnabledFor(logging.DEBUG)  # decided once, not per message
        self.last_activity_at = 0.0  # loop time of the last delivery or heartbeat (liveness)
        self.retiring = False  # set by the lane watcher once this lane is routed away from
        self.lost: WorkerError | None = None  # the client cannot make progress: connection_lost
        self._closing = False  # closing the client on purpose: its closed callback is expected
        self._down_since = 0.0  # loop time of the disconnect the client has not recovered from
        # Extension points for the registry, the lane watcher and health (see app.py):
        self.started_hooks: list[Hook] = []  # after connect+bind, before the first pull
        self.closing_hooks: list[Hook] = []  # after the drain, before the connection closes
        self.reconnect_hooks: list[Callable[[], None]] = []

    @property
    def in_flight(self) -> int:
        return self._busy

    @property
    def state(self) -> str:
        """starting -> running (or retiring) -> draining; the registry adds 'stopped'."""
        if self.stopping.is_set():
            return "draining"
        if not self.ready.is_set():
            return "starting"
        return "retiring" if self.retiring else "running"

    # ----------------------------------------------------------------------------- lifecycle

    def stop(self, reason: str = "stop requested") -> None:
        """First call: graceful stop. Second call: hand everything back and exit now."""
        if self.stopping.is_set():
            if not self._forced.is_set():
                log.warning("second stop request (%s): handing back running jobs now", reason)
                self._forced.set()
            return
        self.stop_reason = reason
        log.info(
            "draining (%s): no new jobs; waiting up to %gs for %d running",
            reason,
            self.settings.drain_timeout,
            self._busy,
        )
        self.ready.clear()
        self.stopping.set()
        self._room.set()

    async def run(self) -> int:
        """Connect, provision, consume until stopped; return the process exit code."""
        loop = asyncio.get_running_loop()
        if self.install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        try:
            connecting = asyncio.ensure_future(
                connect(
                    self.settings,
                    on_disconnect=self._on_disconnect,
                    on_reconnect=self._on_reconnect,
                    on_lost=self.connection_lost,
                )
            )
            stopped = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not connecting.done():  # a signal during the first connect: just leave
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
                return self.exit_code
            self.nc = connecting.result()
            self.js = self.nc.jetstream()
            if self.settings.provision:
                report = await provision(self.js, self.settings)
                for line in report.lines():
                    log.info("provision: %s", line)
            psub = await self.js.pull_subscribe_bind(
                durable=self.settings.names.durable, stream=self.settings.stream_name
            )
            log.info(
                "started %s lane=%s consumer=%s concurrency=%d loop=%s",
                __version__,
                self.settings.lane,
                self.settings.names.durable,
                self.settings.concurrency,
                type(asyncio.get_running_loop()).__module__.split(".")[0],
            )
            for hook in self.started_hooks:
                await hook()
            if not self.stopping.is_set():
                await self._consume(psub)
        except Exception as exc:
            if self.lost is None:
                raise
            log.debug("cut short by the lost connection: %s", describe(exc), exc_info=exc)
        finally:
            for closing in reversed(self.closing_hooks):
                try:
                    await closing()
                except Exception as exc:  # a failed final heartbeat must not hide the exit
                    level = logging.DEBUG if self.lost is not None else logging.WARNING
                    log.log(level, "shutdown step failed: %s", describe(exc))
            if self.install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._closing = True
            if self.nc is not None and not self.nc.is_closed:
                try:
                    if self.lost is not None:  # nothing to drain into: stop reconnecting
                        raise ConnectionError(str(self.lost))
                    await asyncio.wait_for(self.nc.drain(), timeout=5.0)
                except Exception:  # a dead broker must not turn a clean stop into a crash
                    try:
                        await self.nc.close()
                    except Exception as exc:  # nats-py may fail flushing into a dead socket
                        log.debug("closing the connection failed: %s", exc)
        log.info("stopped (%s) %s", self.stop_reason or "done", _fmt(self.counters.as_dict()))
        return self.exit_code

    def connection_lost(self, error: WorkerError) -> None:
        """The client can no longer make progress: stop, and exit with ``error.exit_code``.

        Called by ``connection.connect`` when nats-py closed the client for good (a fatal
        ``-ERR`` such as 'Maximum Payload Violation' or 'Maximum Subscriptions Exceeded', an
        'Authorization Violation') or refused the credentials on every reconnect for
        ``NATS_CONNECT_TIMEOUT``; and by the beat and the puller if they find the client closed.

        Why exit instead of reconnecting with a fresh client: every delivered job is bound to the
        old client (its acks, naks and ``in_progress`` go through it), the subscriptions, the
        registry entry and the lane watcher would all have to be rebuilt, and a refusal of the
        credentials needs them re-read from the environment anyway. A restart does all of that,
        is what Docker and Kubernetes do with a failed process, and a crash loop of exit 77 is
        visible where a worker that retries in place is not. So: one error line naming the
        cause, ``/livez`` fails from now on, and the process exits with 69 (77 when the
        credentials were refused); jobs it held are redelivered after ``ACK_WAIT``.

        Running handlers: their outcome can no longer be acknowledged, but cutting one mid-way
        gains nothing until another worker may receive its job, and a handler that finishes its
        side effects leaves cleaner state than one cancelled between two of them. So they may
        finish, within ``DRAIN_TIMEOUT`` and never past the moment JetStream may redeliver their
        job (``ACK_WAIT`` after the last ``in_progress`` that reached the server): at that point
        the handler is cancelled, as it would be on a drain timeout. With nothing running the
        exit is immediate. Unstarted deliveries cannot be handed back; they are redelivered too.
        """
        if self.lost is not None or self._closing:
            return
        self.lost = error
        self.exit_code = error.exit_code
        running = self._busy
        log.error(
            "%s: exiting with %d so that the supervisor starts a fresh worker%s; JetStream "
            "redelivers unacknowledged jobs after ACK_WAIT",
            error,
            error.exit_code,
            f" ({running} running job(s) may finish first, unacknowledged)" if running else "",
        )
        self.stop_reason = "connection lost"
        self._credit = 0  # whatever was asked for will not come
        self.ready.clear()
        self.stopping.set()
        self._room.set()

    def _client_closed(self, nc: Client) -> None:
        """The client is closed and nobody asked for it (a callback we missed)."""
        from ..connection import lost_error

        self.connection_lost(lost_error(nc.last_error))

    async def _on_disconnect(self) -> None:
        if not self._down_since:
            self._down_since = asyncio.get_running_loop().time()

    async def _on_reconnect(self) -> None:
        # Pull requests parked on the old connection may be gone with it (nats.py #504):
        # reclaim their credit and ask again at once instead of waiting for heartbeats to lapse.
        # The outage was readiness' business: liveness counts silence from the reconnect.
        self._down_since = 0.0
        self.last_activity_at = asyncio.get_running_loop().time()
        self._reset_credit("reconnected")
        for hook in self.reconnect_hooks:
            hook()

    def _internal_task_done(self, task: asyncio.Task[None]) -> None:
        """The puller and the beat run for the worker's whole life; if one dies, stop (exit 1)."""
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        log.error("internal task %s ended unexpectedly: %s", task.get_coro(), exc, exc_info=exc)
        self.exit_code = EXIT_FAILURE
        self.stop("internal error")

    def _queued(self) -> int:
        """Deliveries waiting in the inbox for a slot (the prefetch, mostly): credit the server
        has already honoured."""
        return self._inbox.qsize() if self._inbox is not None else 0

    def _reset_credit(self, why: str) -> None:
        """Forget the outstanding pull requests; what was delivered and waits keeps its credit."""
        queued = self._queued()
        if self._credit > queued:
            log.info("re-issuing pull requests (%s)", why)
        self._credit = queued
        self._room.set()

    async def _consume(self, psub: JetStreamContext.PullSubscription) -> None:
        sub = psub._sub  # noqa: SLF001 - the inbox subscription behind the pull consumer
        assert sub is not None
        # Credit bounds what the inbox can hold; the slots read it directly and do not maintain
        # nats-py's byte counter, so its slow-consumer byte limit is switched off (0).
        sub._pending_bytes_limit = 0  # noqa: SLF001
        inbox: asyncio.Queue[Msg] = sub._pending_queue  # noqa: SLF001
        self._inbox = inbox
        self._acks = ack_batch(self.nc)
        for slot in self._slots:
            slot.task = asyncio.create_task(self._run_slot(slot, inbox))
        beat = asyncio.create_task(self._beat())
        self._puller = asyncio.create_task(self._pull(psub))
        for task in (beat, self._puller):
            task.add_done_callback(self._internal_task_done)
        self.last_activity_at = asyncio.get_running_loop().time()
        self.ready.set()
        try:
            await self.stopping.wait()
            self._puller.cancel()
            for slot in self._slots:  # idle slots stop waiting for deliveries
                if slot.msg is None and slot.task is not None:
                    slot.task.cancel()
            await self._hand_back_unstarted(psub, inbox)
            await self._drain_slots()
        finally:
            tasks = [beat, self._puller, *(s.task for s in self._slots if s.task)]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ----------------------------------------------------------------------------- pulling

    async def _pull(self, psub: JetStreamContext.PullSubscription) -> None:
        """Keep outstanding pull requests equal to the free slots (plus the prefetch), in chunks
        of >= _refill."""
        nc = self.nc
        assert nc is not None
        subject, reply = psub._nms, psub._deliver  # noqa: SLF001
        batch_max = self.settings.fetch_batch
        expires, heartbeat = int(PULL_EXPIRES * _NS), int(PULL_HEARTBEAT * _NS)
        rest = f',"expires":{expires},"idle_heartbeat":{heartbeat}'.encode() + b"}"
        while not self.stopping.is_set():
            free = self._window - self._busy - self._credit
            if free < self._refill:
                self._room.clear()
                await self._room.wait()
                continue
            pause = self._refused_until - asyncio.get_running_loop().time()
            if pause > 0:  # the server refused our last pull (consumer gone, leader moving...)
                await asyncio.sleep(pause)
                continue
            batch = min(free, batch_max)
            request = b'{"batch":' + str(batch).encode() + rest  # JSON, without json.dumps
            try:
                await nc.publish(subject, request, reply=reply)
            except Exception as exc:  # closed or stalled connection: wait for the reconnect
                if nc.is_closed:  # for good: nothing to wait for
                    self._client_closed(nc)
                    return
                log.warning("pull request failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            self._credit += batch

    def _on_status(self, msg: Msg) -> None:
        """A status message ends (or pings) one of our pull requests."""
        headers = msg.headers or {}
        code = headers.get("Status", "")
        self.last_activity_at = asyncio.get_running_loop().time()
        if code == "100":  # idle heartbeat: the request is alive, so the server takes pulls
            self._refused_backoff = 0.0
            return
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None:
            self._credit = max(0, self._credit - int(pending))
        else:
            self._credit = 0
        self._room.set()
        if code in ("404", "408"):  # no messages / expired: the normal end of a pull
            self._refused_backoff = 0.0
            return
        # Refused (409 consumer deleted, leadership change, max waiting...; 503): ask again
        # after a growing pause instead of spinning, and say so once per step.
        description = headers.get("Description", "").split("\n", 1)[0].strip()
        if not description and code == "503":
            description = "no responders (is the consumer there?)"
        # Capped at 1 s: enough to never spin, short enough that a consumer leader election
        # (several refusals in a row for a few seconds) costs at most a second of idleness.
        self._refused_backoff = min(max(0.1, self._refused_backoff * 2), REFUSED_BACKOFF_MAX)
        self._refused_until = asyncio.get_running_loop().time() + self._refused_backoff
        if self._refused_backoff != self._refused_logged:
            self._refused_logged = self._refused_backoff
            log.warning(
                "pull request refused: %s %s; asking again in %gs",
                code,
                description,
                self._refused_backoff,
            )
        if "deleted" in description.lower():
            asyncio.get_running_loop().create_task(self._reprovision())

    async def _reprovision(self) -> None:
        if self.settings.provision and self.js is not None and not self.stopping.is_set():
            try:
                await provision(self.js, self.settings)
            except Exception as exc:
                log.warning("re-provision failed: %s", exc)

    # ----------------------------------------------------------------------------- processing

    async def _run_slot(self, slot: _Slot, inbox: asyncio.Queue[Msg]) -> None:
        """Take jobs from the inbox and run them, one at a time, until the worker stops.

        One idle slot at a time (the *leader*) waits on the inbox; the other idle slots park on
        a future of their own. A delivery therefore wakes one task, and a leader whose jobs do
        not suspend (quick handlers) runs a whole burst of deliveries in one step, as a callback
        subscription would. When a job does suspend, ``_promote`` (scheduled with ``call_soon``,
        so it only runs once this step has yielded) wakes parked slots for what is still queued
        and a new leader, so I/O-bound jobs still run ``CONCURRENCY`` at a time.
        """
        get, get_nowait = inbox.get, inbox.get_nowait
        process = self._process_job
        loop = asyncio.get_running_loop()
        stopping = self.stopping
        parked = self._parked
        room = self._room
        # Telemetry off: _process's steps run inline, one coroutine fewer per job (about 2 µs of
        # the chassis's ~5, measured on a fake inbox). Kept step for step in line with _process.
        inline = process == self._process
        validate, handler, context = self.job_model.model_validate_json, self.handler, self._context
        acks = self._acks
        while not stopping.is_set():
            if inbox.empty():
                if self._leader:  # someone already waits for the next delivery
                    waiter = loop.create_future()
                    parked.append(waiter)
                    await waiter
                    continue
                self._leader = True
                try:
                    msg = await get()
                finally:
                    self._leader = False
            else:
                msg = get_nowait()
            if parked and not self._promoting:  # if this job suspends, others take the rest
                self._promoting = True
                loop.call_soon(self._promote, inbox)
            self._activity += 1
            if not msg.reply:  # a status message, not a job
                self._on_status(msg)
                continue
            if self._credit:
                self._credit -= 1
            if stopping.is_set():  # delivered after the stop: never started
                await self._nak_all([msg])
                return
            self._busy += 1
            slot.msg = msg
            try:
                if not inline:
                    await process(msg, slot, loop)
                    continue
                try:
                    job = validate(msg.data)
                except Exception as exc:  # ValidationError, a recursion limit...: never retryable
                    await self._dead_letter(msg, "invalid", exc)
                    continue
                started = slot.handler_since = slot.progress_at = loop.time()
                try:
                    await handler(job, context(msg))
                except (asyncio.CancelledError, Exception) as exc:
                    slot.handler_since = 0.0
                    await self._handler_failed(msg, slot, exc)
                    continue
                slot.handler_since = 0.0
                nc = self.nc
                if acks is None or nc is None or nc.is_closed:
                    await msg.ack()  # raises on a closed connection: not counted as done
                else:
                    acks.ack(msg.reply)
                self._done(msg, started, loop)
            except Exception as exc:  # settling failed (connection closed mid-ack, ...)
                log.warning(
                    "could not settle a job (%s); JetStream redelivers it after ACK_WAIT",
                    describe(exc),
                )
            finally:
                slot.msg = None
                self._busy -= 1
                # Wake the puller only once a refill's worth of slots is free, not per job.
                if self._window - self._busy - self._credit >= self._refill and not room.is_set():
                    room.set()

    def _promote(self, inbox: asyncio.Queue[Msg]) -> None:
        """Wake a parked slot for each queued delivery, and one to lead if nobody waits."""
        self._promoting = False
        wanted = inbox.qsize() + (0 if self._leader else 1)
        parked = self._parked
        while wanted > 0 and parked:
            waiter = parked.pop()
            if not waiter.done():  # a parked slot cancelled by the stop is skipped
                waiter.set_result(None)
                wanted -= 1

    async def _process(self, msg: Msg, slot: _Slot, loop: asyncio.AbstractEventLoop) -> Outcome:
        """Parse, handle, settle. Returns None on success, else (outcome, the error)."""
        try:
            job = self.job_model.model_validate_json(msg.data)
        except Exception as exc:  # ValidationError, or e.g. a recursion limit: never retryable
            return await self._dead_letter(msg, "invalid", exc), exc
        started = slot.handler_since = slot.progress_at = loop.time()
        try:
            await self.handler(job, self._context(msg))
        except (asyncio.CancelledError, Exception) as exc:
            slot.handler_since = 0.0  # out of the handler: the beat no longer times it
            return await self._handler_failed(msg, slot, exc)
        slot.handler_since = 0.0
        nc = self.nc
        if self._acks is None or nc is None or nc.is_closed:
            await msg.ack()  # raises on a closed connection: the job is not counted as done
        else:  # what msg.ack() sends, batched per loop step (acks.py)
            self._acks.ack(msg.reply)
        self._done(msg, started, loop)
        return None

    async def _handler_failed(self, msg: Msg, slot: _Slot, exc: BaseException) -> Outcome:
        """The handler raised: retry, dead-letter or fail the job, and say which.

        A cancellation is the beat's ``HANDLER_TIMEOUT`` (``slot.timed_out``), a failure like any
        other; any other cancellation is the worker's own (a stop) and propagates.
        """
        if isinstance(exc, asyncio.CancelledError):
            if not slot.timed_out:
                raise exc
            slot.timed_out = False
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            exc = HandlerTimeoutError(f"handler ran longer than {self.settings.handler_timeout:g}s")
        if isinstance(exc, Retry):
            return await self._retry(msg, exc.delay, exc), exc
        if isinstance(exc, Reject):
            return await self._dead_letter(msg, "rejected", exc), exc
        return await self._failed(msg, exc), exc

    def _done(self, msg: Msg, started: float, loop: asyncio.AbstractEventLoop) -> None:
        """A job was acknowledged: count it; every 16th, sample its time (status, the refill)."""
        counters = self.counters
        counters.processed += 1
        if not counters.processed & SAMPLE_MASK:
            took = loop.time() - started
            self.recent.append(took)
            self._adapt_refill(took)
        if self._log_jobs:
            log.debug("job done", extra=_job_fields(msg))

    def _adapt_refill(self, took: float) -> None:
        """Size the refill threshold to the jobs' handling time (a sample every 16th job).

        A freed slot waits for the threshold to be reached and then a round trip for its next
        job. With quick jobs slots free up within microseconds, so waiting costs nothing and a
        large threshold (half the window) keeps pull requests few, which the server needs (its
        cost per request grows with the backlog, as the template's bench measured). With slow
        jobs slots free up one by one, and a freed slot idles for about half the threshold's
        worth of job completions (a threshold of half the window alone caps the share of
        CONCURRENCY / latency near 80 %; 64 % was measured at CONCURRENCY 100 with 10 ms jobs).
        So the threshold shrinks as jobs get slower, to what keeps the request rate (about
        CONCURRENCY / handling time / threshold) under PULL_RATE_BUDGET: 1 for jobs of 40 ms and
        more at CONCURRENCY 100, 2-3 for 10 ms jobs, half the window again for jobs under 1 ms.

        Even a threshold of 1 leaves a freed slot idle for a round trip (a cap near 89 % of the
        limit for 10 ms jobs), so quick jobs also get a prefetch: the refill's worth plus the
        completions during ``PULL_LEAD``, at most CONCURRENCY.
        """
        handling = self._handling
        handling = took if not handling else handling + (took - handling) * 0.25
        self._handling = handling
        concurrency = self.settings.concurrency
        wanted = concurrency / (PULL_RATE_BUDGET * handling) if handling else 0
        refill = self._refill_max if wanted >= self._refill_max else max(1, int(wanted + 0.5))
        prefetch = 0
        if handling < PREFETCH_BELOW:
            lead = concurrency * PULL_LEAD / handling if handling else concurrency
            prefetch = min(concurrency, refill + int(lead + 0.999))
        if refill != self._refill or prefetch != self._prefetch:
            self._refill, self._prefetch = refill, prefetch
            self._window = concurrency + prefetch
            if not self._room.is_set() and self._window - self._busy - self._credit >= refill:
                self._room.set()

    async def _process_traced(
        self, msg: Msg, slot: _Slot, loop: asyncio.AbstractEventLoop
    ) -> Outcome:
        """The same, inside a CONSUMER span that continues the producer's trace."""
        telemetry = self.telemetry
        assert telemetry is not None
        started = loop.time()
        span, token = telemetry.start_consume(msg)
        try:
            result = await self._process(msg, slot, loop)
            if result is not None:
                telemetry.fail(span, result[1], result[0])
        finally:
            telemetry.end_consume(span, token)
        if telemetry.durations is not None:
            telemetry.durations.record(loop.time() - started, result[0] if result else "processed")
        return result

    async def _process_timed(
        self, msg: Msg, slot: _Slot, loop: asyncio.AbstractEventLoop
    ) -> Outcome:
        """The same, timed for ``messaging.process.duration`` (metrics on, tracing off)."""
        assert self.telemetry is not None
        durations = self.telemetry.durations
        started = loop.time()
        result = await self._process(msg, slot, loop)
        if durations is not None:
            durations.record(loop.time() - started, result[0] if result else "processed")
        return result

    async def _process_recorded(
        self, msg: Msg, slot: _Slot, loop: asyncio.AbstractEventLoop
    ) -> Outcome:
        """The same, with the CONSUMER span recorded by ``consumer_spans`` (no SDK per job)."""
        telemetry = self.telemetry
        assert telemetry is not None
        spans = telemetry.consumer_spans
        assert spans is not None
        started = loop.time()
        span = spans.start(msg)
        result: Outcome = None
        try:
            result = await self._process(msg, slot, loop)
        finally:
            spans.end(span, msg, result)
        if telemetry.durations is not None:
            telemetry.durations.record(loop.time() - started, result[0] if result else "processed")
        return result

    async def _failed(self, msg: Msg, exc: BaseException) -> str:
        self.counters.failed += 1
        return await self._retry(msg, None, exc)

    async def _retry(self, msg: Msg, delay: float | None, exc: BaseException) -> str:
        attempt = int(msg.metadata.num_delivered or 1)
        if attempt >= self.settings.max_deliver:
            return await self._dead_letter(msg, "exhausted", exc, attempt)
        if delay is None:
            backoff = self.settings.backoff
            delay = backoff[min(attempt, len(backoff)) - 1]
        log.warning(
            "job failed, retry in %gs (attempt %d of %d): %s: %s",
            delay,
            attempt,
            self.settings.max_deliver,
            type(exc).__name__,
            describe(exc),
            extra=_job_fields(msg),
        )
        await msg.nak(delay=delay)
        self.counters.retried += 1
        return "retried"

    async def _dead_letter(
        self, msg: Msg, reason: str, exc: BaseException, attempt: int | None = None
    ) -> str:
        assert self.js is not None
        deliveries = attempt or int(msg.metadata.num_delivered or 1)
        trace = self.telemetry.current_headers() if self.telemetry is not None else None
        if not await dead_letter(
            self.js,
            self.settings,
            msg,
            reason=reason,
            error=exc,
            deliveries=deliveries,
            trace_headers=trace,
        ):
            await msg.nak(delay=self.settings.backoff[0])
            return "dlq_failed"
        self.counters.dead_lettered += 1
        log.warning(
            "job dead-lettered (%s after %d deliveries): %s: %s",
            reason,
            deliveries,
            type(exc).__name__,
            describe(exc),
            extra=_job_fields(msg),
        )
        return "dead_lettered"

    # ----------------------------------------------------------------------------- the beat

    async def _beat(self) -> None:
        """Progress heartbeats, handler timeouts and pull-request liveness, for all slots."""
        loop = asyncio.get_running_loop()
        progress_every = max(0.5, self.settings.ack_wait / 3)
        timeout = self.settings.handler_timeout
        stall_warning = self.settings.loop_stall_warning
        # A stall shows as a late wake-up, measured against the tick: a tick near the threshold
        # under-measures a block that starts early in it by up to one tick.
        tick = max(0.05, min(1.0, progress_every / 2, timeout / 4, (stall_warning or 4.0) / 4))
        seen = self._activity
        quiet_since = loop.time()
        concurrency = self.settings.concurrency
        nc = self.nc
        assert nc is not None
        while True:
            before = loop.time()
            await asyncio.sleep(tick)
            now = loop.time()
            if nc.is_closed and not self.stopping.is_set():
                self._client_closed(nc)
            if stall_warning and now - before - tick > stall_warning:
                log.warning(
                    "event loop was blocked for %.1fs: a handler is doing blocking work; "
                    "run it with 'await asyncio.to_thread(...)'",
                    now - before - tick,
                )
            # Expecting word from the server: a pull is open, or slots are free to request one.
            # With every slot busy on long jobs nothing is expected, and silence is healthy.
            # Credit already delivered (the prefetch waiting in the inbox) is not expected.
            outstanding = self._credit - self._queued()
            expecting = outstanding > 0 or concurrency - self._busy >= self._refill
            if self._activity != seen or not expecting:
                seen = self._activity
                self.last_activity_at = quiet_since = now
            elif outstanding > 0 and now - quiet_since > 3 * PULL_HEARTBEAT:
                quiet_since = now  # liveness keeps counting from the last real activity
                self._reset_credit("pull request went silent")
            for slot in self._slots:
                since, msg = slot.handler_since, slot.msg
                if not since or msg is None:
                    continue
                if now - since > timeout and not slot.timed_out and slot.task is not None:
                    slot.timed_out = True
                    slot.task.cancel()
                elif now - slot.progress_at >= progress_every:
                    slot.progress_at = now
                    try:
                        await msg.in_progress()
                    except Exception as exc:  # disconnected: the next beat tries again
                        log.debug("in_progress failed: %s", exc)

    # ----------------------------------------------------------------------------- stopping

    async def _nak_all(self, msgs: list[Msg]) -> None:
        if self.lost is not None:  # no connection to hand them back through
            log.info("%d job(s) left to JetStream's redelivery after ACK_WAIT", len(msgs))
            return
        for msg in msgs:
            try:
                await msg.nak()
                self.counters.handed_back += 1
            except Exception as exc:
                log.warning("could not hand back a job (%s); it returns after ack_wait", exc)

    async def _hand_back_unstarted(
        self, psub: JetStreamContext.PullSubscription, inbox: asyncio.Queue[Msg]
    ) -> None:
        """Nak everything delivered but not started, including what is still on the wire.

        UNSUB, then a round trip: once the PONG is back the server has sent all it ever will to
        this inbox, so what the inbox holds then is the complete set to hand back.
        """
        nc, sub = self.nc, psub._sub  # noqa: SLF001
        if nc is not None and sub is not None and nc.is_connected:
            try:
                await nc._send_unsubscribe(sub._id)  # noqa: SLF001 - keep the local queue
                await nc.flush(timeout=2)
            except Exception as exc:
                log.debug("inbox unsubscribe incomplete: %s", exc)
        unstarted = []
        while not inbox.empty():
            msg = inbox.get_nowait()
            if msg.reply:
                unstarted.append(msg)
        if unstarted:
            log.info("handing back %d delivered but unstarted job(s)", len(unstarted))
            await self._nak_all(unstarted)
        try:
            await psub.unsubscribe()  # forget it locally, so the connection drain skips it
        except Exception as exc:
            log.debug("inbox already gone: %s", exc)

    async def _drain_slots(self) -> None:
        """Let running jobs finish within DRAIN_TIMEOUT; then hand the rest back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        if self.lost is not None:
            # Not past the moment JetStream may redeliver a running job to another worker: the
            # last in_progress that reached the server was sent at most one progress interval
            # before the connection went down (see connection_lost).
            down = self._down_since or loop.time()
            lease = self.settings.ack_wait - max(0.5, self.settings.ack_wait / 3)
            deadline = min(deadline, down + lease)
        pending: set[asyncio.Future[Any]] = {
            s.task for s in self._slots if s.task is not None and not s.task.done()
        }
        forced: asyncio.Future[Any] = asyncio.ensure_future(self._forced.wait())
        while pending and not forced.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            _, pending = await asyncio.wait(
                {*pending, forced}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(forced)
        forced.cancel()
        leftovers = [s.msg for s in self._slots if s.msg is not None]
        if not leftovers:
            return
        if self.lost is not None:
            log.warning(
                "cancelling %d running job(s): JetStream may now redeliver them elsewhere",
                len(leftovers),
            )
        else:
            log.warning(
                "drain %s: handing back %d running job(s)",
                "cut short" if self._forced.is_set() else "timed out",
                len(leftovers),
            )
        for slot in self._slots:
            if slot.task is not None and slot.msg is not None:
                slot.task.cancel()
        await self._nak_all([m for m in leftovers if m is not None])
        if self._forced.is_set() and self.lost is None:
            self.exit_code = EXIT_INTERRUPTED


def _job_fields(msg: Msg) -> dict[str, object]:
    """Correlation fields for a log line about one job (trace ids come from the log filter)."""
    meta = msg.metadata
    headers = msg.headers or {}
    return {
        "job_id": headers.get("Job-Id") or headers.get("Nats-Msg-Id"),
        "subject": msg.subject,
        "stream_seq": meta.sequence.stream,
        "attempt": meta.num_delivered,
    }


def _fmt(counters: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in counters.items())
