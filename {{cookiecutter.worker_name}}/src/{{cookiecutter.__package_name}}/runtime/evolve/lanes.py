"""Release lanes and the route: which lanes new work lands on, and how it moves.

The route is the work stream's subject transform plus each lane consumer's filters, driven by the
route state in KV (see ``routing.py``): ``route v2`` sends all new work to lane v2, ``route v2
--percent 10`` a sticky 10 % of it, by job key. Each stored message keeps the generation and bucket
it landed in, so an old lane drains exactly its own backlog and a ramp step never moves stored
work. The same KV bucket keeps the history of changes (when, from what, to what, by whom).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError, ServiceUnavailableError

from ..consume.retrying import retry
from ..errors import InputError, RouteRefusedError
from ..publish import publish_many
from ..settings import Settings
from .registry import discover
from .routing import (
    RouteState,
    StateChangedError,
    describe_split,
    kv_write,
    lane_filters,
    prune,
    read_state,
    write_state,
)
from .split import Split
from .topology import consumer_filters, route_transform, routes_as

log = logging.getLogger(__name__)
ROUTE_KEY = "route"
MOVED_FROM = "Moved-From-Lane"


@dataclass(frozen=True)
class RouteChange:
    """One entry of the route history."""

    lane: str
    previous: str | None
    at: str
    by: str
    note: str = ""
    percent: int = 100  # of new work to ``lane`` (the rest stays on ``previous``)
    gen: int | None = None  # the route generation this change started
    split: dict[str, object] | None = None  # the whole split from then on (Split.as_dict)

    def share(self, lane: str) -> int:
        """Percent of new work ``lane`` got from this change on."""
        if self.split is not None:
            return Split.from_dict(self.split).share(lane)
        return self.percent if lane == self.lane else 0

    @classmethod
    def now(
        cls,
        lane: str,
        previous: str | None,
        note: str = "",
        *,
        percent: int = 100,
        gen: int | None = None,
        split: Split | None = None,
    ) -> RouteChange:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        by = f"{user}@{socket.gethostname()}"
        return cls(
            lane, previous, stamp, by, note, percent, gen, split.as_dict() if split else None
        )


async def record(js: JetStreamContext, settings: Settings, change: RouteChange) -> None:
    kv = await js.key_value(settings.names.route_bucket)
    await kv_write(lambda: kv.put(ROUTE_KEY, json.dumps(asdict(change)).encode()))


async def record_first(js: JetStreamContext, settings: Settings, change: RouteChange) -> None:
    """Record the initial route once, even when several instances provision at the same time."""
    kv = await js.key_value(settings.names.route_bucket)
    with contextlib.suppress(KeyWrongLastSequenceError):
        await kv_write(lambda: kv.create(ROUTE_KEY, json.dumps(asdict(change)).encode()))


async def history(js: JetStreamContext, settings: Settings) -> list[RouteChange]:
    """Oldest first; empty when nothing was recorded yet.

    Read from the KV bucket's stream by subject, one stored entry after the other: nats-py's
    ``KeyValue.history`` watches through an ordered consumer and, on a loaded machine, returned
    no entries or only some of them (a route step went missing from ``route --json``).
    """
    stream = f"KV_{settings.names.route_bucket}"
    subject = f"$KV.{settings.names.route_bucket}.{ROUTE_KEY}"
    changes: list[RouteChange] = []
    seq = 1
    while True:
        try:
            raw = await js.get_msg(stream, seq=seq, next=True, subject=subject)
        except NotFoundError:  # no more entries (or no bucket yet)
            return changes
        if raw.seq is None:
            return changes
        seq = raw.seq + 1
        if not raw.data:  # a delete or purge marker
            continue
        try:
            changes.append(RouteChange(**json.loads(raw.data)))
        except (TypeError, ValueError):
            log.warning("ignoring an unreadable route-history entry (stream seq %s)", raw.seq)


async def lane_consumer(js: JetStreamContext, settings: Settings, lane: str) -> str | None:
    """The durable that consumes ``lane``, as the server knows it; None when there is none.

    Found by the lane in its metadata, not by a computed name, so a lane whose instances run
    with their own ``CONSUMER_NAME`` is found too.
    """
    return (await lane_consumers(js, settings)).get(lane)


async def lane_consumers(js: JetStreamContext, settings: Settings) -> dict[str, str]:
    """lane -> durable, for every lane consumer of this worker's stream."""
    found: dict[str, str] = {}
    for ci in await patiently(
        lambda: js.consumers_info(settings.stream_name), "listing the consumers"
    ):
        lane = (ci.config.metadata or {}).get("lane")
        if lane and (lane not in found or ci.name == settings.names.consumer(lane)):
            found[lane] = ci.name
    return found


async def sync_consumers(js: JetStreamContext, settings: Settings, state: RouteState) -> None:
    """Give every lane consumer exactly the filters ``state`` assigns its lane.

    A consumer listing can miss consumers while the stream elects a leader, so every lane the
    state gives work is also looked up by name; one that cannot be read stops the step (before
    the transform moves), rather than leaving that lane's new buckets to nobody.
    """
    found = await lane_consumers(js, settings)
    for lane in state.lanes():
        if lane not in found:
            name = settings.names.consumer(lane)
            try:
                await patiently(
                    lambda n=name: js.consumer_info(settings.stream_name, n),  # type: ignore[misc]
                    "reading a consumer",
                )
            except NotFoundError:
                continue  # no consumer yet: its first instance provisions it with the filters
            found[lane] = name
    for lane, durable in found.items():
        await sync_filters(js, settings, durable, lane_filters(settings, state, lane))


async def sync_filters(
    js: JetStreamContext, settings: Settings, durable: str, want: list[str]
) -> bool:
    """Set ``durable``'s filters to ``want``; True when they had to change."""
    ci = await patiently(
        lambda: js.consumer_info(settings.stream_name, durable), "reading a consumer"
    )
    if sorted(consumer_filters(ci.config)) == sorted(want):
        return False
    config = ci.config
    config.filter_subject = None
    config.filter_subjects = want
    await patiently(
        lambda: js.add_consumer(settings.stream_name, config), f"updating the filters of {durable}"
    )
    return True


async def reconcile(js: JetStreamContext, settings: Settings, state: RouteState) -> RouteState:
    """Make the server match ``state``: consumer filters first, then the stream's transform,
    then drop emptied generations (and their filters). Resumes a step that was interrupted."""
    await sync_consumers(js, settings, state)
    info = await patiently(lambda: js.stream_info(settings.stream_name), "reading the stream")
    if not routes_as(settings, info.config.subject_transform, state.gen):
        config = info.config
        config.subject_transform = route_transform(settings, state.gen)
        config.subjects = settings.names.stream_subjects
        await patiently(lambda: js.update_stream(config), "switching the route")
    try:
        pruned = await prune(js, settings, state)
    except StateChangedError:  # someone else stepped or pruned meanwhile: theirs wins
        return state
    if pruned is not state:
        await sync_consumers(js, settings, pruned)
    return pruned


@dataclass
class SwitchResult:
    """What ``route`` did."""

    split: Split
    previous: Split
    changed: bool
    gen: int
    moved: int = 0
    left_in_flight: int = 0

    @property
    def lane(self) -> str:
        return self.split.ramping or self.split.current


def target_split(current: Split, lane: str, percent: int) -> Split:
    """The split after ``route <lane> --percent <percent>`` from ``current``."""
    if percent >= 100:
        return Split(current=lane)
    if lane == current.current:
        if current.ramping:  # give the ramping lane the rest
            return Split(current=lane, ramping=current.ramping, percent=100 - percent)
        raise InputError(
            f"lane {lane} already gets all new work: to ramp another lane, name it "
            f"(route <lane> --percent {100 - percent})"
        )
    return Split(current=current.current, ramping=lane, percent=percent)


async def current_state(js: JetStreamContext, settings: Settings) -> RouteState:
    state = await patiently(lambda: read_state(js, settings), "reading the route")
    if state is None:
        raise RouteRefusedError(
            f"stream {settings.stream_name} has no route yet: start a worker or run 'provision'"
        )
    return state


async def switch(
    nc: Client,
    settings: Settings,
    target: str | None,
    *,
    percent: int = 100,
    rollback: bool = False,
    force: bool = False,
    take_backlog: bool = False,
    note: str = "",
    move_timeout: float = 60.0,
) -> SwitchResult:
    """Route new work by a new split. Refuses a lane that would get work but has no live
    instance (start it first, or ``force``)."""
    js = nc.jetstream()
    state = await current_state(js, settings)
    previous = state.split
    if rollback:
        if state.previous is None:
            raise RouteRefusedError(
                f"nothing to roll back to: the route has had one split since the stream was "
                f"created ({describe_split(previous)}); see 'route'"
            )
        split = state.previous
    else:
        assert target is not None
        split = target_split(previous, target, percent)
    if split == previous:
        log.debug("route already is %s: nothing to do", describe_split(split))
        await reconcile(js, settings, state)  # finish an interrupted step, if any
        await _record_missing(js, settings, state, note)
        return SwitchResult(split, previous, changed=False, gen=state.gen)
    gaining = [lane for lane in split.lanes if split.share(lane) > previous.share(lane)]
    consumers = await lane_consumers(js, settings)
    for lane in gaining:
        if force:
            continue
        await _require_live(nc, settings, lane)
        if lane not in consumers and not await _consumer_exists(js, settings, lane):
            raise RouteRefusedError(
                f"lane {lane} has no consumer on stream {settings.stream_name}: start a worker "
                f"with LANE={lane} (it provisions its consumer) or pass --force"
            )
        if not rollback:
            await require_contract(nc, settings, previous.current, lane)
    while True:
        try:
            staged = await write_state(js, settings, state.step(split))
            break
        except StateChangedError:
            state = await current_state(js, settings)
            if state.split == split:
                return SwitchResult(split, previous, changed=False, gen=state.gen)
    await reconcile(js, settings, staged)
    lane = split.ramping or split.current
    before = previous.ramping if rollback and previous.ramping else previous.current
    await record(
        js,
        settings,
        RouteChange.now(lane, before, note, percent=split.share(lane), gen=staged.gen, split=split),
    )
    log.debug("route: new work %s (was %s)", describe_split(split), describe_split(previous))
    result = SwitchResult(split, previous, changed=True, gen=staged.gen)
    if take_backlog:
        for lane in previous.lanes:
            if not split.share(lane):
                moved, left = await move_backlog(nc, settings, lane, within=move_timeout)
                result.moved += moved
                result.left_in_flight += left
    return result


async def require_contract(nc: Client, settings: Settings, current: str, lane: str) -> None:
    """The schema gate (see ``contract_gate.py``): refuse a lane whose job model breaks the
    current lane's contract, or rejects stored jobs. ``--force`` skips it."""
    from .contract_gate import check

    problems = await check(nc, settings, current, lane)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RouteRefusedError(
            f"{problems[0]}{more}: fix the model (make the field optional, with a default), or "
            "pass --force once the stored jobs and producers match it"
        )


async def _record_missing(
    js: JetStreamContext, settings: Settings, state: RouteState, note: str
) -> None:
    """Record the current generation's change if a step was cut short before its history entry
    (a controller or an operator's command killed between the switch and the record)."""
    if state.gen <= 1 or any(c.gen == state.gen for c in await history(js, settings)):
        return
    split, previous = state.split, state.previous or state.split
    lane = split.ramping or split.current
    before = previous.ramping if previous.ramping and previous.ramping != lane else previous.current
    change = RouteChange.now(
        lane, before, note or "recorded late", percent=split.share(lane), gen=state.gen, split=split
    )
    await record(js, settings, change)


async def _consumer_exists(js: JetStreamContext, settings: Settings, lane: str) -> bool:
    """A lane's durable by its computed name: the listing can miss one during an election."""
    try:
        await patiently(
            lambda: js.consumer_info(settings.stream_name, settings.names.consumer(lane)),
            "reading a consumer",
        )
    except NotFoundError:
        return False
    return True


async def _require_live(nc: Client, settings: Settings, lane: str) -> None:
    def live_in(i: dict[str, Any]) -> bool:
        return i.get("lane") == lane and i.get("state") in LIVE_STATES

    if not [i for i in await discover(nc, settings, enough=live_in) if live_in(i)]:
        raise RouteRefusedError(
            f"no live instance of lane {lane}: start workers with LANE={lane} first "
            "(or pass --force to route anyway; jobs then wait in the stream)"
        )


LIVE_STATES = ("starting", "running", "retiring")
ROUTE_PATIENCE = 20.0  # seconds route retries a stream without a leader (an election)
T = TypeVar("T")


async def patiently(call: Callable[[], Awaitable[T]], what: str) -> T:
    """Retry a JetStream API call through a leader election (503 or timeout), for a while."""

    async def election(exc: Exception) -> bool:
        return isinstance(exc, ServiceUnavailableError | NatsTimeoutError)

    async def note_retry(exc: Exception) -> None:
        log.info("%s: %s; retrying (leader election?)", what, type(exc).__name__)

    return await retry(call, patience=ROUTE_PATIENCE, should_retry=election, between=note_retry)


async def move_backlog(
    nc: Client, settings: Settings, lane: str, *, within: float = 60.0
) -> tuple[int, int]:
    """Move ``lane``'s waiting jobs back through the ingress (so onto the current lane).

    Uses the lane's own durable (a work-queue stream allows no second consumer on it), so a job
    goes either to a worker of that lane or to the mover, never both. Each moved job is
    republished with a dedup id derived from its stream sequence *before* its original is
    acknowledged: a crash in between re-runs into the duplicate window instead of a double.
    Returns (moved, still in flight on that lane's workers).
    """
    js = nc.jetstream()
    durable = await lane_consumer(js, settings, lane)
    if durable is None:
        log.warning("lane %s has no consumer: no backlog to move", lane)
        return 0, 0
    psub = await js.pull_subscribe_bind(durable=durable, stream=settings.stream_name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    moved = 0
    try:
        while loop.time() < deadline:
            try:
                msgs = await psub.fetch(256, timeout=0.5)
            except TimeoutError:
                ci = await js.consumer_info(settings.stream_name, durable)
                if not ci.num_pending and not ci.num_ack_pending:
                    break
                if not ci.num_pending:  # only jobs held by live workers remain
                    return moved, int(ci.num_ack_pending or 0)
                continue
            outgoing = []
            for msg in msgs:
                headers = dict(msg.headers or {})
                job_id = headers.get("Job-Id") or headers.get("Nats-Msg-Id") or "job"
                seq = msg.metadata.sequence.stream
                headers.update(
                    {"Job-Id": job_id, MOVED_FROM: lane, "Nats-Msg-Id": f"{job_id}:moved:{seq}"}
                )
                outgoing.append((settings.names.ingress_for_stored(msg.subject), msg.data, headers))
            await publish_many(js, outgoing)
            for msg in msgs:
                await msg.ack()
            await nc.flush()
            moved += len(msgs)
        ci = await js.consumer_info(settings.stream_name, durable)
        left = int(ci.num_ack_pending or 0) + int(ci.num_pending or 0)
    finally:
        await psub.unsubscribe()
    if moved:
        log.info("moved %d waiting job(s) from lane %s to the current lane", moved, lane)
    return moved, left
