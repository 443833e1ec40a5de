"""Release lanes and the route: which lane new work lands on, and how it moves.

The route *is* the work stream's subject transform (``<root>.jobs.>`` -> ``<root>.<lane>.>``), so
switching it is one atomic ``update_stream`` on the server and producers never notice. Each
stored message keeps the lane it landed on, so an old lane drains exactly its own backlog.

A small KV bucket keeps the history of switches (when, from what, to what, by whom); the stream
config stays the source of truth for the current lane.
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
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
    ServiceUnavailableError,
)

from ..consume.retrying import retry
from ..errors import RouteRefusedError
from ..names import WORKER_NAME
from ..publish import publish_many
from ..settings import Settings
from .registry import discover
from .topology import ensure_bucket, lane_of, route_transform

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

    @classmethod
    def now(cls, lane: str, previous: str | None, note: str = "") -> RouteChange:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return cls(lane, previous, stamp, f"{user}@{socket.gethostname()}", note)


async def ensure_route_bucket(js: JetStreamContext, settings: Settings) -> bool:
    """Create the route-history bucket if missing; True when it was created."""
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=settings.names.route_bucket,
            history=64,
            storage=StorageType.FILE,
            replicas=settings.stream_replicas,
            description=f"{WORKER_NAME} route history",
        ),
    )


async def record(js: JetStreamContext, settings: Settings, change: RouteChange) -> None:
    kv = await js.key_value(settings.names.route_bucket)
    await kv.put(ROUTE_KEY, json.dumps(asdict(change)).encode())


async def record_first(js: JetStreamContext, settings: Settings, change: RouteChange) -> None:
    """Record the initial route once, even when several instances provision at the same time."""
    kv = await js.key_value(settings.names.route_bucket)
    with contextlib.suppress(KeyWrongLastSequenceError):
        await kv.create(ROUTE_KEY, json.dumps(asdict(change)).encode())


async def history(js: JetStreamContext, settings: Settings) -> list[RouteChange]:
    """Oldest first; empty when nothing was recorded yet."""
    try:
        kv = await js.key_value(settings.names.route_bucket)
    except (BucketNotFoundError, NotFoundError):
        return []
    for _ in range(3):
        try:
            entries = await kv.history(ROUTE_KEY)
            break
        except NoKeysError:
            # nats-py's watcher can report "no keys" when its consumer's first info races the
            # stored entries (seen on a loaded machine); only a missing key makes that true.
            try:
                await kv.get(ROUTE_KEY)
            except (KeyNotFoundError, NotFoundError):
                return []
    else:
        return []
    changes = []
    for entry in entries:
        if entry.value:
            try:
                changes.append(RouteChange(**json.loads(entry.value)))
            except (TypeError, ValueError):
                log.warning(
                    "ignoring an unreadable route-history entry (revision %s)", entry.revision
                )
    return changes


async def current_lane(js: JetStreamContext, settings: Settings) -> str | None:
    return lane_of(await js.stream_info(settings.stream_name), settings)


async def lane_consumer(js: JetStreamContext, settings: Settings, lane: str) -> str | None:
    """The durable that consumes ``lane``, as the server knows it; None when there is none.

    Found by what it consumes (its filter, or the lane in its metadata), not by a computed name,
    so a lane whose instances run with their own ``CONSUMER_NAME`` is found too.
    """
    wanted = settings.names.lane_filter(lane)
    default = settings.names.consumer(lane)
    found: str | None = None
    for ci in await patiently(
        lambda: js.consumers_info(settings.stream_name), "listing the consumers"
    ):
        config = ci.config
        if config.filter_subject == wanted or (config.metadata or {}).get("lane") == lane:
            if ci.name == default:
                return ci.name
            found = found or ci.name
    return found


@dataclass
class SwitchResult:
    """What ``route <lane>`` did."""

    lane: str
    previous: str | None
    changed: bool
    moved: int = 0
    left_in_flight: int = 0


async def switch(
    nc: Client,
    settings: Settings,
    target: str,
    *,
    force: bool = False,
    take_backlog: bool = False,
    note: str = "",
    move_timeout: float = 60.0,
) -> SwitchResult:
    """Route new work to ``target``. Refuses when no instance of that lane is alive."""
    js = nc.jetstream()
    info = await patiently(lambda: js.stream_info(settings.stream_name), "reading the stream")
    previous = lane_of(info, settings)
    if previous == target:
        log.info("route already points at lane %s: nothing to do", target)
        return SwitchResult(target, previous, changed=False)
    if not force:

        def live_in_target(i: dict[str, Any]) -> bool:
            return i.get("lane") == target and i.get("state") in LIVE_STATES

        alive = [
            i for i in await discover(nc, settings, enough=live_in_target) if live_in_target(i)
        ]
        if not alive:
            raise RouteRefusedError(
                f"no live instance of lane {target}: start workers with LANE={target} first "
                "(or pass --force to route anyway; jobs then wait in the stream)"
            )
    if await lane_consumer(js, settings, target) is None and not force:
        raise RouteRefusedError(
            f"lane {target} has no consumer on stream {settings.stream_name}: start a worker "
            f"with LANE={target} (it provisions its consumer) or pass --force"
        )
    config = info.config
    config.subject_transform = route_transform(settings, target)
    await patiently(lambda: js.update_stream(config), "switching the route")  # idempotent
    await record(js, settings, RouteChange.now(target, previous, note))
    log.info("route switched: new work -> lane %s (was %s)", target, previous)
    result = SwitchResult(target, previous, changed=True)
    if take_backlog and previous:
        result.moved, result.left_in_flight = await move_backlog(
            nc, settings, previous, within=move_timeout
        )
    return result


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
                outgoing.append(
                    (settings.names.ingress_for_stored(msg.subject, lane), msg.data, headers)
                )
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


async def rollback_target(js: JetStreamContext, settings: Settings) -> str:
    """The lane before the current one, per the route history."""
    current = await current_lane(js, settings)
    for change in reversed(await history(js, settings)):
        if change.lane == current and change.previous:
            return change.previous
    raise RouteRefusedError(
        f"nothing to roll back to: the route has no earlier lane (it is {current}); see 'route'"
    )
