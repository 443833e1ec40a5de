"""Route switch under load: ``<worker> route v2`` while jobs arrive at a fixed rate.

Two instances of the bench copy (recording handler) run on one fresh server: lane v1 (current)
and ``LANE=v2`` (waiting for the route). The publisher offers ``rate`` jobs/s; after ``before``
seconds the harness runs the route command (as a subprocess, so publishing never pauses) and keeps
publishing for ``after`` seconds. Every job id carries its send time, every handler start is
recorded per lane, so the switch instant is visible in the data:

* switch instant S = send time of the first job that landed on lane v2;
* route command -> switch applied = S - command start (includes the CLI's own start-up);
* switch -> first v2 handling = first handler start on v2 - S;
* retiring-lane drain = last handler start on v1 - S (its backlog at the switch was worked off);
* v1 retired = v1 process exit - S (the worker's own retirement; includes ``RETIRE_GRACE``);
* misrouted = jobs sent after S that still landed on v1 (0 expected), lost/duplicated jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from . import jobs
from .measure import (
    Context,
    MeasureError,
    _provisioned,
    _remove,
    _until_empty,
    _wait_ready,
    paced_publish,
)
from .procs import NatsServer, Worker
from .workers import Project, Topology

_REFUSED = 75  # the route command's "no live instance of the target lane" exit code


def _records(path: Path) -> dict[str, int]:
    """job id -> first handler start (ns) from a ``<id> <ns>`` file."""
    seen: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            job_id, _, t = line.partition(" ")
            if job_id.startswith("R") and job_id not in seen:
                seen[job_id] = int(t)
    return seen


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _sent_ns(job_id: str) -> int:
    return int(job_id.rsplit("-", 1)[1])


async def _route(project: Project, url: str, lane: str, log: Path) -> tuple[int, int, int, str]:
    """Run the route command without blocking the loop; retry while the target is not seen yet.
    Returns (first attempt start ns, end ns, exit code, output)."""
    started = time.time_ns()
    code, text = -1, ""
    for _ in range(10):
        proc = await asyncio.create_subprocess_exec(
            *project.cli("route", lane),
            env=project.env(url),
            cwd=project.root.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise MeasureError("route command did not finish within 60 s") from None
        code, text = proc.returncode or 0, out.decode(errors="replace")
        _append(log, f"exit {code}\n{text}\n")
        if code != _REFUSED:
            break
        await asyncio.sleep(0.5)
    return started, time.time_ns(), code, text.strip()


async def route_switch(
    ctx: Context,
    project: Project,
    rate: float,
    before: float,
    after: float,
    target: str = "v2",
    retire_grace: float | None = None,
) -> dict[str, Any]:
    """``before`` s of traffic, then ``route``; traffic goes on until ``after`` s past the
    command's exit. ``retire_grace`` sets the workers' RETIRE_GRACE (default: theirs)."""
    topo = ctx.topo
    v2_topo = Topology(
        topo.stream,
        topo.ingress,
        topo.durable.removesuffix(topo.lane) + target,
        target,
        topo.lane_filter.replace(f".{topo.lane}.", f".{target}."),
    )
    files = {lane: ctx.log_dir / f"route-{lane}.txt" for lane in (topo.lane, target)}
    for f in files.values():
        _remove(f)
    result: dict[str, Any] = {"rate": rate, "before_s": before, "after_s": after, "target": target}
    grace = {} if retire_grace is None else {"RETIRE_GRACE": f"{retire_grace:g}"}
    result["retire_grace"] = retire_grace if retire_grace is not None else "worker default"
    with NatsServer(ctx.log_dir / "route.nats.log") as srv:
        await _provisioned(ctx, srv)
        nc = await jobs.connect(srv.url)
        old: Worker | None = None
        new: Worker | None = None
        old_exit: asyncio.Future[float | None] | None = None
        old_exit_ns: int | None = None
        try:
            js = nc.jetstream()
            old = Worker(
                project.cli("run"),
                project.env(srv.url, BENCH_LATENCY_OUT=str(files[topo.lane]), **grace),
                project.root.parent,
                ctx.log_dir / f"route-{topo.lane}.log",
            ).start()
            # v1 retires by itself, possibly before the harness looks: watch for its exit from
            # the start (a pidfd in a thread: the exit instant itself, not when it was noticed)
            old_exit = asyncio.ensure_future(asyncio.to_thread(old.wait_exit, 600.0))
            new = Worker(
                project.cli("run"),
                project.env(srv.url, LANE=target, BENCH_LATENCY_OUT=str(files[target]), **grace),
                project.root.parent,
                ctx.log_dir / f"route-{target}.log",
            ).start()
            await _wait_ready(js, topo, old, 30.0)
            await _wait_ready(js, v2_topo, new, 30.0)
            stop = asyncio.Event()
            publisher = asyncio.create_task(
                paced_publish(js, topo.ingress, rate, before + 120 + after, "R", stop)
            )
            try:
                await asyncio.sleep(before)
                cmd_start, cmd_end, code, output = await _route(
                    project, srv.url, target, ctx.log_dir / "route-command.log"
                )
                result["route_exit_code"] = code
                if code != 0:
                    raise MeasureError(f"route {target} failed ({code}): {output[-400:]}")
                result["route_command_s"] = (cmd_end - cmd_start) / 1e9
                await asyncio.sleep(after)
                stop.set()
                result.update(await asyncio.wait_for(publisher, 60))
            finally:
                publisher.cancel()
                with contextlib.suppress(BaseException):
                    await publisher
            await _until_empty(js, topo.stream, lambda: True, within=60.0)
            # The old lane retires by itself (after RETIRE_GRACE); bounded wait for its exit.
            try:
                exited_at = await asyncio.wait_for(asyncio.shield(old_exit), 45.0)
            except TimeoutError:
                exited_at = None
            if exited_at is not None:
                old_exit_ns = time.time_ns() - int((time.monotonic() - exited_at) * 1e9)
                result["old_exit_code"] = old.proc.returncode if old.proc else None
            else:
                _, result["old_exit_code"] = old.sigterm_and_time(ctx.sigterm_cap)
            _, result["new_exit_code"] = new.sigterm_and_time(ctx.sigterm_cap)
        finally:
            for w in (old, new):
                if w is not None:
                    w.kill()
            if old_exit is not None:  # the watcher ends with the process
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(old_exit, 15.0)
            with contextlib.suppress(Exception):
                await nc.close()
    on_old, on_new = _records(files[topo.lane]), _records(files[target])
    if not on_new:
        raise MeasureError(f"no job landed on lane {target} after the route switch")
    first_new_id = min(on_new, key=_sent_ns)
    switch_ns = _sent_ns(first_new_id)
    late_old = [j for j in on_old if _sent_ns(j) > switch_ns]
    last_old_sent = max((_sent_ns(j) for j in on_old if _sent_ns(j) < switch_ns), default=None)
    result.update(
        {
            "handled_old_lane": len(on_old),
            "handled_new_lane": len(on_new),
            "duplicates": len(on_old.keys() & on_new.keys()),
            "lost": result.get("sent", 0) - len(on_old.keys() | on_new.keys()),
            "misrouted_after_switch": len(late_old),
            "cmd_to_switch_s": (switch_ns - cmd_start) / 1e9,
            # no job is sent in this gap: the two neighbours of the switch instant
            "switch_gap_ms": (switch_ns - last_old_sent) / 1e6 if last_old_sent else None,
            "switch_to_first_new_ms": (min(on_new.values()) - switch_ns) / 1e6,
            "old_lane_drain_ms": (max(on_old.values()) - switch_ns) / 1e6 if on_old else None,
            "old_lane_retired_s": (old_exit_ns - switch_ns) / 1e9 if old_exit_ns else None,
        }
    )
    return result
