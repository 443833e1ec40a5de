"""Starved workers retire: notice the route moved away, finish this lane's backlog, exit 0.

Route changes are *pushed*: the server publishes a stream-updated advisory when ``route``
rewrites the transform, so an instance reacts at once without polling; a slow fallback check
(``ROUTE_CHECK_INTERVAL``) covers an advisory missed during a disconnect. Only while retiring
does the instance look at its consumer once a second, to see the backlog reach zero.

An instance retires only when its lane got new work *while the instance ran* and then lost all
of it: it saw that live, or the route history shows a change after the generation the instance
started in (a paused or partitioned instance missed it live). An instance started into a lane
that gets no new work waits for the route instead, however long: that is how an operator rolls
back ("start v1 again, then ``route --rollback``"), and how a new version waits for its first
ramp step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..settings import Settings
from .lanes import history
from .routing import describe_split, read_state
from .stranded import rescue_stranded

log = logging.getLogger(__name__)
_RETIRING_CHECK = 1.0


class Retirable(Protocol):
    retiring: bool

    @property
    def in_flight(self) -> int: ...

    def stop(self, reason: str = ...) -> None: ...


class LaneWatcher:
    def __init__(self, nc: Client, settings: Settings, worker: Retirable) -> None:
        self.nc = nc
        self.settings = settings
        self.worker = worker
        self.share: int | None = None  # percent of new work this lane gets, as last read
        self.route = "?"  # the split, for the log
        self.was_current = False  # its lane got new work while this instance ran
        self.start_gen = 0  # the route generation this instance started in
        self._suspects: dict[int, float] = {}  # stream seq -> first seen behind the ack floor
        self._changed = asyncio.Event()
        self._idle_since: float | None = None
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        """Re-check soon (after a reconnect, an advisory may have been missed)."""
        self._changed.set()

    async def start(self) -> None:
        subject = self.settings.names.stream_updated_advisory
        self._sub = await self.nc.subscribe(subject, cb=self._on_advisory)
        state = await read_state(self.nc.jetstream(), self.settings)
        self.start_gen = state.gen if state else 0
        await self._read_route()
        if not self.share:
            log.info(
                "lane %s gets no new work (route: %s): waiting for the route",
                self.settings.lane,
                self.route,
            )
        await self._check()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_advisory(self, msg: Msg) -> None:
        self._changed.set()

    async def _loop(self) -> None:
        while True:
            wait = _RETIRING_CHECK if self.worker.retiring else self.settings.route_check_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
            self._changed.clear()
            try:
                await self._check()
            except Exception as exc:  # disconnected: the next round tries again
                log.debug("route check failed: %s", exc)

    async def _read_route(self) -> None:
        state = await read_state(self.nc.jetstream(), self.settings)
        share = state.split.share(self.settings.lane) if state else 0
        route = describe_split(state.split) if state else "none"
        if self.share is not None and route != self.route:
            log.info("route seen: new work %s (this instance: lane %s)", route, self.settings.lane)
        self.share, self.route = share, route
        if share:
            self.was_current = True

    async def _check(self) -> None:
        js = self.nc.jetstream()
        lane = self.settings.lane
        await self._read_route()
        try:  # a job this lane's consumer skipped would otherwise wait forever
            await rescue_stranded(js, self.settings, self.settings.names.durable, self._suspects)
        except Exception as exc:  # an election or an outage: the next check tries again
            log.debug("stranded-job sweep failed: %s", exc)
        if self.share:
            self._idle_since = None
            if self.worker.retiring:
                log.info("lane %s gets new work again: back to running", lane)
                self.worker.retiring = False
            return
        if not self.was_current and self.settings.auto_retire:
            # Paused or partitioned while its lane got work and lost it again? The history knows.
            self.was_current = any(
                (change.gen or 0) > self.start_gen and change.share(lane)
                for change in await history(js, self.settings)
            )
        if not (self.was_current and self.settings.auto_retire):
            return
        if not self.worker.retiring:
            log.info(
                "retiring: lane %s gets no new work (route: %s); finishing its backlog",
                lane,
                self.route,
            )
            self.worker.retiring = True
        info = await js.consumer_info(self.settings.stream_name, self.settings.names.durable)
        idle = not info.num_pending and not info.num_ack_pending and not self.worker.in_flight
        now = asyncio.get_running_loop().time()
        if not idle:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
            log.info(
                "lane %s drained; retiring in %gs unless it gets new work again",
                lane,
                self.settings.retire_grace,
            )
        if self._idle_since is not None and now - self._idle_since >= self.settings.retire_grace:
            self.worker.stop(f"retired: lane {lane} drained, new work goes {self.route}")
