"""What an operator watches during a deploy: the split, each lane's backlog, rate and latency,
and the live instances.

Instances are asked directly (their micro-service ``status`` endpoint) for a fresh snapshot;
the KV heartbeat stands in for one that does not answer in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from ..evolve.lanes import history, lane_consumers
from ..evolve.registry import heartbeats
from ..evolve.routing import describe_split, read_state
from ..settings import Settings

if TYPE_CHECKING:
    from ..naming import Names

ASK_TIMEOUT = 0.5  # seconds an instance has to answer before its heartbeat is used


def lane_state(lane: str, share: int, ramping: bool, ever: set[str], backlog: int) -> str:
    """Temporal-style version states: current, ramping, draining, drained, inactive."""
    if share:
        return "ramping" if ramping else "current"
    if lane in ever or backlog:
        return "draining" if backlog else "drained"
    return "inactive"


async def _fresh(nc: Client, settings: Settings, beat: dict[str, Any]) -> dict[str, Any]:
    if beat.get("state") == "stopped":
        return beat
    with contextlib.suppress(Exception):  # no answer in time: the heartbeat will do
        subject = settings.names.instance_subject(str(beat.get("instance")))
        reply = await nc.request(subject, b"", timeout=ASK_TIMEOUT)
        answer: dict[str, Any] = json.loads(reply.data)
        answer["age_s"] = 0.0
        return answer
    return beat


def _quantile(samples: list[float], q: float) -> float | None:
    if len(samples) < 2:
        return samples[0] if samples else None
    return round(statistics.quantiles(samples, n=100, method="inclusive")[int(q * 100) - 1], 3)


def for_worker(settings: Settings, names: Names) -> Settings:
    """``settings`` seen as the worker ``names`` describes (another worker on the account, found
    by ``ecosystem``): its stream, subjects and buckets, this worker's connection settings."""
    view = settings.model_copy(
        update={
            "subject_root": names.root,
            "job_type": names.job_type,
            "stream_name": names.stream,
            "dlq_stream_name": names.dlq_stream,
            "consumer_name": None,
        }
    )
    view.__dict__["names"] = names  # the cached property's slot: these names, not derived ones
    return view


RECENT_CHANGES = 5  # route changes a report carries (newest last)


async def collect(nc: Client, settings: Settings, names: Names | None = None) -> dict[str, Any]:
    """This worker's deployment, or (``names``) another worker's on the same account."""
    if names is not None:
        settings = for_worker(settings, names)
    js = nc.jetstream()
    report: dict[str, Any] = {"stream": settings.stream_name, "ingress": settings.names.ingress}
    try:
        info = await js.stream_info(settings.stream_name)
    except NotFoundError:
        report.update(
            provisioned=False, current_lane=None, messages=0, lanes=[], dlq=None, instances=[]
        )
        return report
    state = await read_state(js, settings)
    changes = await history(js, settings)
    ever = {c.lane for c in changes}
    beats = await asyncio.gather(*(_fresh(nc, settings, b) for b in await heartbeats(js, settings)))
    split = state.split if state else None
    report.update(
        provisioned=True,
        current_lane=split.current if split else None,
        ramping_lane=split.ramping if split else None,
        split=describe_split(split) if split else None,
        generation=state.gen if state else None,
        messages=info.state.messages,
    )
    lanes = []
    for lane, durable in (await lane_consumers(js, settings)).items():
        consumer = await js.consumer_info(settings.stream_name, durable)
        pending, unacked = consumer.num_pending or 0, consumer.num_ack_pending or 0
        live = [b for b in beats if b.get("lane") == lane and b.get("state") != "stopped"]
        share = split.share(lane) if split else 0
        window = [b.get("window") or {} for b in live]
        seconds = max((float(w.get("seconds", 0)) for w in window), default=0.0)
        succeeded = sum(int(w.get("succeeded", 0)) for w in window)
        samples = sorted(ms for b in live for ms in b.get("recent_ms") or [])
        rate = succeeded / seconds if seconds > 0 else 0.0
        gens = state.generations_of(lane) if state else []
        lanes.append(
            {
                "lane": lane,
                "state": lane_state(
                    lane, share, bool(split and split.ramping == lane), ever, pending + unacked
                ),
                "percent": share,
                "generations": [f"g{g}" for g in gens]
                + (["legacy"] if state and lane in state.legacy else []),
                "consumer": consumer.name,
                "pending": pending,
                "unacked": unacked,
                "in_flight": sum(int(b.get("in_flight", 0)) for b in live),
                "redelivered": consumer.num_redelivered or 0,
                "instances": len(live),
                "window_s": round(seconds, 1),
                "succeeded": succeeded,
                "failed": sum(int(w.get("failed", 0)) for w in window),
                "rate_per_s": round(rate, 1),
                "p50_ms": _quantile(samples, 0.50),
                "p95_ms": _quantile(samples, 0.95),
                "drain_eta_s": round(pending / rate, 1) if rate > 0 and pending else None,
            }
        )
    lanes.sort(key=lambda row: (-row["percent"], row["lane"]))
    report["lanes"] = lanes
    for beat in beats:
        beat.pop("recent_ms", None)
    report["instances"] = beats
    report["route_changed_at"] = changes[-1].at if changes else None
    report["route_changes"] = [asdict(c) for c in changes[-RECENT_CHANGES:]]
    try:
        dlq = await js.stream_info(settings.dlq_stream_name)
        report["dlq"] = {"stream": settings.dlq_stream_name, "messages": dlq.state.messages}
    except NotFoundError:
        report["dlq"] = None
    report["rollout"] = await _rollout(nc, settings)
    report["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


async def _rollout(nc: Client, settings: Settings) -> dict[str, Any] | None:
    """The gated rollout, if any: phase, step, both lanes' figures, verdicts (rollout.py)."""
    from ..evolve.rollout import read, summary

    stored, _ = await read(nc.jetstream(), settings)
    return summary(stored)


def _opt(value: object, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def render(report: dict[str, Any]) -> str:
    """A table, not a dump."""
    if not report.get("provisioned"):
        return f"stream {report['stream']} does not exist yet: run 'provision' or 'run'"
    lines = [
        f"stream {report['stream']}  ingress {report['ingress']}  stored {report['messages']}"
        f"  new work -> {report.get('split') or '?'} (generation {report.get('generation')})",
        "",
        f"{'LANE':<8} {'STATE':<9} {'%':>4} {'GENS':<10} {'PENDING':>8} {'IN-FL':>6} "
        f"{'OK/60s':>7} {'FAIL':>5} {'P50ms':>7} {'P95ms':>7} {'ETA':>7} {'LIVE':>5}",
    ]
    for row in report["lanes"]:
        lines.append(
            f"{row['lane']:<8} {row['state']:<9} {row['percent']:>4} "
            f"{','.join(row['generations'])[:10] or '-':<10} {row['pending']:>8} "
            f"{row['in_flight']:>6} {row['succeeded']:>7} {row['failed']:>5} "
            f"{_opt(row['p50_ms']):>7} {_opt(row['p95_ms']):>7} "
            f"{_opt(row['drain_eta_s'], 's'):>7} {row['instances']:>5}"
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
    rollout = report.get("rollout")
    if rollout:
        from .cli import _render_rollout

        lines += ["", _render_rollout(rollout)]
    return "\n".join(lines)
