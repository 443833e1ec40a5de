"""``provision``: everything one lane needs, declared and idempotent. Safe to run any time."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ..settings import Settings
from .lanes import RouteChange, reconcile, record_first
from .registry import ensure_registry_bucket
from .routing import (
    RouteState,
    StateChangedError,
    describe_split,
    ensure_state_bucket,
    initial_state,
    lane_filters,
    read_state,
    write_state,
)
from .topology import (
    ProvisionReport,
    consumer_filters,
    dlq_config,
    ensure_consumer,
    ensure_stream,
    routes_as,
    stream_config,
)

STABLE_TRIES = 5  # re-reads of the route state while a route step runs at the same time


async def provision(js: JetStreamContext, settings: Settings) -> ProvisionReport:
    """Route state, work stream, DLQ, this lane's consumer, and the heartbeat bucket.

    The first instance of a worker creates the route state (or derives it from a stream made by
    the layout before route generations, which it then upgrades in place). This lane's consumer
    gets the filters the state assigns it; if a route step changes the state meanwhile, the
    filters are recomputed until they match the latest state.
    """
    report = ProvisionReport()
    if await ensure_state_bucket(js, settings):
        report.created.append(f"bucket {settings.names.route_bucket}")
    state, created = await _state(js, settings)
    info = await ensure_stream(js, stream_config(settings, state.gen), report, keep_route=True)
    await ensure_stream(js, dlq_config(settings), report, keep_route=False)
    for _ in range(STABLE_TRIES):
        want = lane_filters(settings, state, settings.lane)
        want += await _newer_filters(js, settings, state)
        await ensure_consumer(js, settings, report, want)
        latest = await read_state(js, settings)
        if latest is None or latest.revision == state.revision:
            break
        state = latest
    if state.legacy or not routes_as(settings, info.config.subject_transform, state.gen):
        state = await reconcile(js, settings, state)  # upgrade, or finish an interrupted step
        if created:
            report.updated.append(f"stream {settings.stream_name} (route generations)")
    if created:
        await record_first(
            js,
            settings,
            RouteChange.now(state.split.current, None, "stream created", gen=1, split=state.split),
        )
    report.route = f"{describe_split(state.split)} (generation {state.gen})"
    if await ensure_registry_bucket(js, settings):
        report.created.append(f"bucket {settings.names.registry_bucket}")
    return report


async def _newer_filters(js: JetStreamContext, settings: Settings, state: RouteState) -> list[str]:
    """Filters this lane's consumer already has for generations newer than ``state``.

    A route step may have added them after we read the state; removing them, even for a
    moment, would strand jobs (a consumer does not go back for messages it has passed).
    """
    try:
        info = await js.consumer_info(settings.stream_name, settings.names.durable)
    except NotFoundError:
        return []
    return [
        f
        for f in consumer_filters(info.config)
        if (settings.names.gen_of_filter(f) or 0) > state.gen
    ]


async def _state(js: JetStreamContext, settings: Settings) -> tuple[RouteState, bool]:
    """The route state, created on first use; True when this call created it."""
    state = await read_state(js, settings)
    if state is not None:
        return state, False
    try:
        existing = await js.stream_info(settings.stream_name)
    except NotFoundError:
        existing = None
    try:
        return await write_state(js, settings, initial_state(settings, existing)), True
    except StateChangedError:  # another instance created it first
        state = await read_state(js, settings)
        assert state is not None
        return state, False
