"""What an operator watches during a deploy: lanes, their backlog, and the live instances."""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from ..evolve.lanes import history
from ..evolve.registry import heartbeats
from ..evolve.topology import lane_of
from ..settings import Settings


def lane_state(lane: str, current: str | None, ever_current: set[str], backlog: int) -> str:
    """Temporal-style version states: current, draining, drained, inactive (never current)."""
    if lane == current:
        return "current"
    if lane in ever_current:
        return "draining" if backlog else "drained"
    return "inactive"


async def collect(nc: Client, settings: Settings) -> dict[str, Any]:
    js = nc.jetstream()
    report: dict[str, Any] = {"stream": settings.stream_name, "ingress": settings.names.ingress}
    try:
        info = await js.stream_info(settings.stream_name)
    except NotFoundError:
        report.update(
            provisioned=False, current_lane=None, messages=0, lanes=[], dlq=None, instances=[]
        )
        return report
    current = lane_of(info, settings)
    changes = await history(js, settings)
    ever_current = {c.lane for c in changes} | ({current} if current else set())
    beats = await heartbeats(js, settings)
    report.update(provisioned=True, current_lane=current, messages=info.state.messages)
    lanes = []
    for consumer in await js.consumers_info(settings.stream_name):
        cfg = consumer.config
        lane = (cfg.metadata or {}).get("lane") or "?"
        pending, unacked = consumer.num_pending or 0, consumer.num_ack_pending or 0
        live = [b for b in beats if b.get("lane") == lane and b.get("state") != "stopped"]
        lanes.append(
            {
                "lane": lane,
                "state": lane_state(lane, current, ever_current, pending + unacked),
                "consumer": consumer.name,
                "filter": cfg.filter_subject,
                "pending": pending,
                "unacked": unacked,
                "redelivered": consumer.num_redelivered or 0,
                "instances": len(live),
            }
        )
    lanes.sort(key=lambda row: (row["state"] != "current", row["lane"]))
    report["lanes"] = lanes
    report["instances"] = beats
    report["route_changed_at"] = changes[-1].at if changes else None
    try:
        dlq = await js.stream_info(settings.dlq_stream_name)
        report["dlq"] = {"stream": settings.dlq_stream_name, "messages": dlq.state.messages}
    except NotFoundError:
        report["dlq"] = None
    report["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


def render(report: dict[str, Any]) -> str:
    """A table, not a dump."""
    if not report.get("provisioned"):
        return f"stream {report['stream']} does not exist yet: run 'provision' or 'run'"
    lines = [
        f"stream {report['stream']}  ingress {report['ingress']}  stored {report['messages']}"
        f"  new work -> lane {report['current_lane'] or '?'}",
        "",
        f"{'LANE':<8} {'STATE':<9} {'CONSUMER':<30} {'PENDING':>8} {'UNACKED':>8} "
        f"{'REDELIV':>8} {'LIVE':>5}",
    ]
    for row in report["lanes"]:
        lines.append(
            f"{row['lane']:<8} {row['state']:<9} {row['consumer']:<30} {row['pending']:>8} "
            f"{row['unacked']:>8} {row['redelivered']:>8} {row['instances']:>5}"
        )
    instances = report.get("instances") or []
    lines.append("")
    if instances:
        lines.append(
            f"{'INSTANCE':<28} {'LANE':<6} {'VERSION':<9} {'STATE':<9} {'IN-FL':>6} "
            f"{'DONE':>8} {'FAILED':>7} {'DLQ':>5} {'BEAT':>7}"
        )
        for b in instances:
            c = b.get("counters") or {}
            lines.append(
                f"{str(b.get('instance'))[:28]:<28} {b.get('lane', '?'):<6} "
                f"{str(b.get('version'))[:9]:<9} {b.get('state', '?'):<9} "
                f"{b.get('in_flight', 0):>6} {c.get('processed', 0):>8} {c.get('failed', 0):>7} "
                f"{c.get('dead_lettered', 0):>5} {str(b.get('age_s')) + 's':>7}"
            )
    else:
        lines.append("no live instances")
    dlq = report.get("dlq")
    lines += ["", f"dlq {dlq['stream']}: {dlq['messages']} message(s)" if dlq else "dlq: missing"]
    return "\n".join(lines)
