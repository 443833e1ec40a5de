"""One view of the fleet: every worker on the NATS account, its lanes, instances, backlog, rate,
dead letters and recent route changes (``ecosystem`` and ``dashboard``).

Two sources, both plain NATS, so any worker generated from the template sees every other one:

* ``$SRV.INFO`` without a service name: every micro service on the account answers. An instance
  of a worker made from this template carries ``lane``, ``instance``, ``state`` and ``stream`` in
  its metadata (``evolve/registry.py``); other services are listed by name only.
* The stream list: a worker's work stream says ``worker`` in its metadata, with the names needed
  to read it without that worker's settings (``subject_root``, ``job_type``, ``dlq_stream``, its
  buckets: ``evolve/topology.stream_metadata``). A stream provisioned before those keys existed
  is read from its subjects (``<root>.jobs.<type>``) until its worker next provisions it.

Each worker's deployment is then read exactly like ``status`` reads our own
(:func:`.status.collect` with that worker's :class:`~..naming.Names`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StreamInfo
from nats.js.errors import APIError

from ..errors import WorkerError
from ..names import WORKER_NAME
from ..naming import Names
from ..settings import Settings
from .status import collect

DISCOVERY_WINDOW = 0.5  # seconds the micro services have to answer $SRV.INFO
MAX_STREAMS = 10_000  # streams listed at most (a bound on the paging, far above a real fleet)


async def services(nc: Client, window: float = DISCOVERY_WINDOW) -> list[dict[str, Any]]:
    """Every micro service instance that answers ``$SRV.INFO`` within ``window`` seconds."""
    found: list[dict[str, Any]] = []

    async def on_info(msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            info = json.loads(msg.data)
            if isinstance(info, dict):
                found.append(info)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_info)
    try:
        await nc.publish("$SRV.INFO", b"", reply=inbox)
        await nc.flush()
        # Scatter-gather: nobody says how many will answer, so the window bounds the wait.
        await asyncio.sleep(window)
    finally:
        await sub.unsubscribe()
    return found


def names_of_stream(info: StreamInfo) -> Names | None:
    """The names of the worker whose work stream this is; None for any other stream."""
    config = info.config
    meta = config.metadata or {}
    worker = meta.get("worker")
    if not worker or not config.name or config.retention != RetentionPolicy.WORK_QUEUE:
        return None  # not a worker's, or its DLQ (limits retention), or a KV bucket
    root, job_type = meta.get("subject_root"), meta.get("job_type")
    if not (root and job_type):  # provisioned before the metadata said so: its ingress does
        for subject in config.subjects or []:
            tokens = subject.split(".")
            if len(tokens) == 3 and tokens[1] == "jobs" and "*" not in subject:
                root, job_type = tokens[0], tokens[2]
                break
    if not (root and job_type):
        return None
    return Names(
        worker=worker,
        root=root,
        job_type=job_type,
        stream=config.name,
        dlq_stream=meta.get("dlq_stream") or f"{config.name}_DLQ",
        lane="",
        custom_consumer=None,
    )


async def worker_streams(nc: Client) -> list[Names]:
    """Every worker's work stream on the account, by stream name."""
    js = nc.jetstream()
    infos: list[StreamInfo] = []
    while True:  # the server answers a page at a time (256 streams)
        page = await js.streams_info(offset=len(infos))
        infos += page
        if not page or len(infos) >= MAX_STREAMS:
            break
    found = [names_of_stream(info) for info in infos]
    return sorted((n for n in found if n is not None), key=lambda n: (n.worker, n.stream))


def _summary(worker: dict[str, Any]) -> None:
    """Totals a fleet view shows per worker: backlog, rate, live instances."""
    lanes = worker.get("lanes") or []
    worker["backlog"] = sum(int(lane["pending"]) + int(lane["unacked"]) for lane in lanes)
    worker["rate_per_s"] = round(sum(float(lane["rate_per_s"]) for lane in lanes), 1)
    worker["live"] = sum(1 for i in worker.get("instances") or [] if i.get("state") != "stopped")
    dlq = worker.get("dlq")
    worker["dlq_messages"] = dlq["messages"] if dlq else None


async def _one(nc: Client, settings: Settings, names: Names) -> dict[str, Any]:
    head = {"worker": names.worker, "subject_root": names.root, "job_type": names.job_type}
    try:
        report = await collect(nc, settings, names)
    except (APIError, TimeoutError, WorkerError) as exc:  # e.g. not permitted to read it
        return {**head, "stream": names.stream, "error": f"{type(exc).__name__}: {exc}"}
    return {**head, **report}


async def collect_fleet(
    nc: Client, settings: Settings, window: float = DISCOVERY_WINDOW
) -> dict[str, Any]:
    """The fleet report: ``workers`` (one per work stream, plus any worker whose instances answer
    but whose stream is missing) and ``other_services`` (micro services not made from this
    template)."""
    answers, streams = await asyncio.gather(services(nc, window), worker_streams(nc))
    workers = list(await asyncio.gather(*(_one(nc, settings, n) for n in streams)))
    by_stream = {w["stream"]: w for w in workers}
    others: list[dict[str, Any]] = []
    for info in answers:
        meta = info.get("metadata") or {}
        stream = meta.get("stream")
        if not stream or "lane" not in meta:
            others.append(
                {"name": info.get("name"), "version": info.get("version"), "id": info.get("id")}
            )
            continue
        worker = by_stream.get(stream)
        if worker is None:  # running, but its stream is not there (or not ours to list)
            worker = by_stream[stream] = {
                "worker": info.get("name"),
                "stream": stream,
                "provisioned": False,
                "lanes": [],
                "instances": [],
                "dlq": None,
                "route_changes": [],
            }
            workers.append(worker)
        worker.setdefault("services", []).append(
            {
                "instance": meta.get("instance"),
                "lane": meta.get("lane"),
                "state": meta.get("state"),
                "version": info.get("version"),
            }
        )
        seen = {str(i.get("instance")) for i in worker.get("instances") or []}
        if meta.get("instance") not in seen:  # answered, but no heartbeat (yet, or no bucket)
            worker.setdefault("instances", []).append(
                {
                    "instance": meta.get("instance"),
                    "lane": meta.get("lane"),
                    "state": meta.get("state"),
                    "version": info.get("version"),
                    "source": "micro",
                }
            )
    for worker in workers:
        worker["self"] = (
            worker["worker"] == WORKER_NAME and worker["stream"] == settings.stream_name
        )
        _summary(worker)
    workers.sort(key=lambda w: (str(w["worker"]), str(w["stream"])))
    others.sort(key=lambda s: (str(s["name"]), str(s["id"])))
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workers": workers,
        "other_services": others,
    }


def _opt(value: object, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def _change(change: dict[str, Any]) -> str:
    to = change.get("lane")
    if change.get("percent") not in (None, 100):
        to = f"{to} {change['percent']}%"
    stamp = str(change.get("at") or "?").replace("T", " ").rstrip("Z")
    return f"{stamp} {change.get('previous') or '-'} -> {to} ({change.get('by') or '?'})"


def render_fleet(report: dict[str, Any]) -> str:
    """Readable at a glance: one line per worker, then each worker's lanes and changes."""
    workers = report["workers"]
    lines = [
        f"fleet at {report['at']}: {len(workers)} worker(s)",
        "",
        f"{'WORKER':<22} {'STREAM':<20} {'INGRESS':<30} {'NEW WORK':<16} {'LIVE':>4} "
        f"{'BACKLOG':>8} {'RATE/s':>7} {'DLQ':>5}",
    ]
    for w in workers:
        ingress = w.get("ingress") or f"{w.get('subject_root', '?')}.jobs.{w.get('job_type', '?')}"
        new_work = w.get("split") or ("not provisioned" if not w.get("provisioned") else "?")
        name = ("* " if w.get("self") else "") + str(w["worker"])
        lines.append(
            f"{name[:22]:<22} {str(w['stream'])[:20]:<20} {ingress[:30]:<30} "
            f"{str(new_work)[:16]:<16} {w.get('live', 0):>4} {w.get('backlog', 0):>8} "
            f"{w.get('rate_per_s', 0):>7} {_opt(w.get('dlq_messages')):>5}"
        )
    for w in workers:
        lines += ["", f"{w['worker']} ({w['stream']})"]
        if w.get("error"):
            lines.append(f"  cannot read it: {w['error']}")
            continue
        if w.get("lanes"):
            lines.append(
                f"  {'LANE':<8} {'STATE':<9} {'%':>4} {'PENDING':>8} {'IN-FL':>6} "
                f"{'RATE/s':>7} {'LIVE':>5}"
            )
            for lane in w["lanes"]:
                lines.append(
                    f"  {lane['lane']:<8} {lane['state']:<9} {lane['percent']:>4} "
                    f"{lane['pending']:>8} {lane['in_flight']:>6} {lane['rate_per_s']:>7} "
                    f"{lane['instances']:>5}"
                )
        instances = [i for i in w.get("instances") or [] if i.get("state") != "stopped"]
        if instances:
            by_lane: dict[str, list[str]] = {}
            for i in instances:
                by_lane.setdefault(str(i.get("lane")), []).append(str(i.get("state")))
            lines.append(
                "  instances: "
                + "; ".join(
                    f"{lane}: {len(states)} ({', '.join(sorted(set(states)))})"
                    for lane, states in sorted(by_lane.items())
                )
            )
        else:
            lines.append("  instances: none live")
        for change in (w.get("route_changes") or [])[-3:]:
            lines.append(f"  route {_change(change)}")
    others = report.get("other_services") or []
    if others:
        lines += [
            "",
            "other micro services: " + ", ".join(sorted({str(s["name"]) for s in others})),
        ]
    return "\n".join(lines)
