"""``provision``: everything one lane needs, declared and idempotent. Safe to run any time."""

from __future__ import annotations

from nats.js import JetStreamContext

from ..settings import Settings
from .lanes import RouteChange, ensure_route_bucket, record_first
from .registry import ensure_registry_bucket
from .topology import (
    ProvisionReport,
    dlq_config,
    ensure_consumer,
    ensure_stream,
    lane_of,
    stream_config,
)


async def provision(js: JetStreamContext, settings: Settings) -> ProvisionReport:
    """Work stream, this lane's consumer, DLQ, route history and heartbeat buckets."""
    report = ProvisionReport()
    info = await ensure_stream(js, stream_config(settings, settings.lane), report, keep_route=True)
    report.route = lane_of(info, settings)
    await ensure_stream(js, dlq_config(settings), report, keep_route=False)
    await ensure_consumer(js, settings, report)
    if await ensure_route_bucket(js, settings):
        report.created.append(f"bucket {settings.stream_name}_ROUTE")
    if report.route:
        await record_first(js, settings, RouteChange.now(report.route, None, "stream created"))
    if await ensure_registry_bucket(js, settings):
        report.created.append(f"bucket {settings.names.registry_bucket}")
    return report
