"""I/O-bound jobs: the share of the Little's-law limit the generated worker reaches.

A worker that runs at most ``CONCURRENCY`` jobs at a time, each taking ``L`` seconds of waiting,
can finish at most ``CONCURRENCY / L`` jobs per second (Little's law). For each cell of
CONCURRENCY x L, the harness runs the generated worker with a bench-owned handler that only
``await asyncio.sleep(L)`` (``workers/io_handler.py``, copied over the handler of a bench copy of
the generated project, as ``latency_handler.py`` is) and ``CONCURRENCY`` set, drains a
pre-published backlog exactly like a throughput run (``measure.throughput``), and reports

    share of the limit = measured jobs/s / (CONCURRENCY / L)

with the worker's CPU (cores, µs/job) and the time each slot was busy per job
(CONCURRENCY / jobs/s; L is the ideal). Each cell drains ``max(min_jobs, seconds x limit)`` jobs,
capped at ``max_jobs`` (a cell the CPU cannot keep up with would otherwise take minutes).
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import measure
from .report import BUSY_FRACTION, is_busy
from .workers import Project, Spec


@dataclass
class Plan:
    concurrency: tuple[int, ...] = (10, 100, 1000)
    latency_ms: tuple[float, ...] = (1.0, 10.0, 100.0)
    seconds: float = 3.0  # ideal drain time of a cell at the limit
    min_jobs: int = 200
    max_jobs: int = 15_000
    runs: int = 2

    def jobs(self, concurrency: int, latency_ms: float) -> int:
        limit = concurrency / (latency_ms / 1000)
        return int(min(max(self.min_jobs, self.seconds * limit), self.max_jobs))


def spec(project: Project, cwd: Path, concurrency: int, latency_ms: float) -> Spec:
    """The generated worker (I/O copy) with ``CONCURRENCY`` and the handler's sleep set; every
    other setting is the worker's default. Above 1,000 (the default ``MAX_ACK_PENDING``) the
    consumer's ack-pending limit is raised to match (see :func:`provision_env`)."""
    extra = {"CONCURRENCY": str(concurrency), "BENCH_IO_SLEEP_S": f"{latency_ms / 1000:g}"}
    extra.update(provision_env(concurrency))
    return Spec(
        f"generated-io-c{concurrency}-{latency_ms:g}ms",
        f"generated worker, CONCURRENCY={concurrency}, handler awaits {latency_ms:g} ms",
        project.cli("run"),
        lambda url: project.env(url, **extra),
        cwd,
    )


def provision_env(concurrency: int) -> dict[str, str]:
    return {"MAX_ACK_PENDING": str(concurrency)} if concurrency > 1000 else {}


async def sweep(
    ctx: measure.Context,
    project: Project,
    cwd: Path,
    plan: Plan,
    quiet: Callable[[], Awaitable[dict[str, Any]]],
    log: Callable[[str], None],
    errors: list[str],
    busy_fraction: float = BUSY_FRACTION,
) -> dict[str, Any]:
    """Every cell ``plan.runs`` times (all cells once per round). Returns the JSON section."""
    runs: list[dict[str, Any]] = []
    for run in range(plan.runs):
        for c in plan.concurrency:
            for lat in plan.latency_ms:
                s = spec(project, cwd, c, lat)
                limit = c / (lat / 1000)
                n = plan.jobs(c, lat)
                q = await quiet()
                tag = f"io-c{c}-{lat:g}ms-run{run}"
                try:
                    r = await measure.throughput(
                        ctx, s, n, run, tag=tag, provision_env=provision_env(c)
                    )
                except Exception as exc:  # recorded; the sweep goes on
                    r = {"worker": s.key, "run": run, "n": n, "error": str(exc) or repr(exc)}
                    errors.append(f"io {s.key} run {run}: {r['error'][:300]}")
                r.update(q)
                r.pop("progress", None)
                r.update({"concurrency": c, "latency_ms": lat, "limit_per_s": limit})
                if r.get("jobs_per_s"):
                    r["share"] = r["jobs_per_s"] / limit
                    r["slot_ms_per_job"] = c / r["jobs_per_s"] * 1000
                r["busy"] = is_busy(r, busy_fraction)
                runs.append(r)
                log(line(r))
    return {
        "plan": plan.__dict__,
        "busy_fraction": busy_fraction,
        "runs": runs,
        "cells": summarize(runs, plan),
    }


def summarize(runs: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    cells = []
    for c in plan.concurrency:
        for lat in plan.latency_ms:
            mine = [r for r in runs if r["concurrency"] == c and r["latency_ms"] == lat]
            ok = [r for r in mine if r.get("share") is not None]

            def med(key: str, rows: list[dict[str, Any]] = ok) -> float | None:
                vals = [r[key] for r in rows if r.get(key) is not None]
                return statistics.median(vals) if vals else None

            shares = [r["share"] for r in ok]
            cells.append(
                {
                    "concurrency": c,
                    "latency_ms": lat,
                    "limit_per_s": c / (lat / 1000),
                    "jobs": plan.jobs(c, lat),
                    "runs_ok": len(ok),
                    "runs_failed": len(mine) - len(ok),
                    "share": med("share"),
                    "share_min": min(shares) if shares else None,
                    "share_max": max(shares) if shares else None,
                    "jobs_per_s": med("jobs_per_s"),
                    "slot_ms_per_job": med("slot_ms_per_job"),
                    "worker_cores": med("worker_cpu_share"),
                    "server_cores": med("server_cpu_share"),
                    "cpu_us_per_job": med("cpu_us_per_job"),
                    "other_cores_max": max((r.get("other_cores") or 0.0 for r in ok), default=None),
                    "busy_runs": sum(1 for r in mine if r.get("busy")),
                }
            )
    return cells


def line(r: dict[str, Any]) -> str:
    head = f"  io c={r['concurrency']:<5} {r['latency_ms']:>5g} ms run {r['run']}:"
    if "error" in r:
        return f"{head} FAILED {r['error'][:200]}"
    load = r.get("load_start") or {}
    return (
        f"{head} {r['jobs_per_s']:>9,.0f} jobs/s of {r['limit_per_s']:>9,.0f} = "
        f"{r.get('share', 0):5.0%}  slot {r.get('slot_ms_per_job', 0):7.2f} ms/job  "
        f"worker {r.get('worker_cpu_share') or 0:.2f} cores  "
        f"others {r.get('other_cores') or 0:.2f} cores  load1 {load.get('load1', 0):.2f}"
        f"{'  BUSY' if r.get('busy') else ''}"
    )
