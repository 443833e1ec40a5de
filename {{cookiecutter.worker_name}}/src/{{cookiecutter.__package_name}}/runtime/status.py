"""What an operator watches: the stream, each lane's consumer, and the DLQ."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from .settings import Settings
from .topology import lane_of


async def collect(nc: Client, settings: Settings) -> dict[str, Any]:
    js = nc.jetstream()
    report: dict[str, Any] = {"stream": settings.stream_name, "ingress": settings.ingress_subject}
    try:
        info = await js.stream_info(settings.stream_name)
    except NotFoundError:
        report.update(provisioned=False, current_lane=None, messages=0, lanes=[], dlq=None)
        return report
    current = lane_of(info, settings)
    report.update(provisioned=True, current_lane=current, messages=info.state.messages)
    lanes = []
    for consumer in await js.consumers_info(settings.stream_name):
        cfg = consumer.config
        lane = (cfg.metadata or {}).get("lane") or "?"
        pending, unacked = consumer.num_pending or 0, consumer.num_ack_pending or 0
        if lane == current:
            state = "current"
        elif pending or unacked:
            state = "draining"
        else:
            state = "drained"
        lanes.append(
            {
                "lane": lane,
                "state": state,
                "consumer": consumer.name,
                "filter": cfg.filter_subject,
                "pending": pending,
                "unacked": unacked,
                "redelivered": consumer.num_redelivered or 0,
                "waiting": consumer.num_waiting or 0,
            }
        )
    lanes.sort(key=lambda row: (row["state"] != "current", row["lane"]))
    report["lanes"] = lanes
    try:
        dlq = await js.stream_info(settings.dlq_stream_name)
        report["dlq"] = {"stream": settings.dlq_stream_name, "messages": dlq.state.messages}
    except NotFoundError:
        report["dlq"] = None
    return report


def render(report: dict[str, Any]) -> str:
    """A table, not a dump."""
    if not report.get("provisioned"):
        return f"stream {report['stream']} does not exist yet: run 'provision' or 'run'"
    lines = [
        f"stream {report['stream']}  ingress {report['ingress']}  stored {report['messages']}"
        f"  new work -> lane {report['current_lane'] or '?'}",
        "",
        f"{'LANE':<8} {'STATE':<9} {'CONSUMER':<32} {'PENDING':>8} {'UNACKED':>8} {'REDELIV':>8}",
    ]
    for row in report["lanes"]:
        lines.append(
            f"{row['lane']:<8} {row['state']:<9} {row['consumer']:<32} {row['pending']:>8} "
            f"{row['unacked']:>8} {row['redelivered']:>8}"
        )
    dlq = report.get("dlq")
    lines += ["", f"dlq {dlq['stream']}: {dlq['messages']} message(s)" if dlq else "dlq: missing"]
    return "\n".join(lines)
