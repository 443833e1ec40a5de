"""One measurement = one fresh nats-server, one worker subprocess, everything killed after.

Throughput: provision, pre-publish N jobs, start the worker, watch the stream drain, read peak
RSS, SIGTERM and time the exit. Latency: the same worker variant that records handler-start times,
fed at a fixed offered rate; latency = handler start - publisher send time (both wall clock on
this machine; the send time travels in the job id), and at the ack = the time the harness saw the
job's ack (``jobs.AckWatch``) - send time (matched by stream sequence, from the PubAck).

Every run records the load average and core count at its start and end (``procs.load_average``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from . import jobs
from .procs import Load, NatsServer, Worker, cpu_seconds, load_average, proc_status_kb
from .workers import Project, Spec, Topology


class MeasureError(RuntimeError):
    """The measurement could not complete (worker crashed, jobs not acked in time, ...)."""


@dataclass
class Context:
    gen: Project  # provisions the stream for every worker, with the worker's own CLI
    topo: Topology
    log_dir: Path
    sigterm_cap: float = 30.0  # how long a worker may take to exit after SIGTERM
    profile: frozenset[str] = frozenset()  # worker keys to sample with py-spy while they drain


async def _provisioned(ctx: Context, srv: NatsServer, **env: str) -> None:
    out = ctx.gen.run_cli(srv.url, "provision", **env)
    if out.returncode != 0:
        raise MeasureError(f"provision failed ({out.returncode}): {out.stderr.strip()[-500:]}")


def _start(spec: Spec, srv: NatsServer, log: Path) -> Worker:
    return Worker(spec.argv, spec.env(srv.url), spec.cwd, log).start()


def _stop(worker: Worker, result: dict[str, Any], cap: float) -> None:
    """SIGTERM with nothing in flight; time the exit. A worker still running after ``cap``
    seconds is a measured result (recorded as ``sigterm_timed_out``), then killed."""
    exit_s, code = worker.sigterm_and_time(timeout=cap)
    result["sigterm_to_exit_s"] = exit_s
    result["exit_code"] = code
    if exit_s is None:
        result["sigterm_timed_out"] = cap
        worker.kill()


async def throughput(
    ctx: Context,
    spec: Spec,
    n: int,
    run: int,
    tag: str | None = None,
    provision_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    tag = tag or f"{spec.key}-run{run}"
    result: dict[str, Any] = {"worker": spec.key, "run": run, "n": n, "load_start": load_average()}
    with NatsServer(ctx.log_dir / f"{tag}.nats.log") as srv:
        await _provisioned(ctx, srv, **(provision_env or {}))
        nc = await jobs.connect(srv.url)
        worker: Worker | None = None
        spy: subprocess.Popen[bytes] | None = None
        acks = jobs.AckWatch(nc, ctx.topo.stream)  # first ack as an event
        try:
            js = nc.jetstream()
            result["publish_rate"] = round(
                await jobs.publish_jobs(js, ctx.topo.ingress, n, prefix=f"T{run}")
            )
            stored = await jobs.stream_messages(js, ctx.topo.stream)
            if stored != n:
                raise MeasureError(f"stream holds {stored} messages after publishing {n}")
            await acks.start()
            worker = _start(spec, srv, ctx.log_dir / f"{tag}.log")
            pid = worker.pid
            if spec.key in ctx.profile:
                spy = _py_spy(pid, ctx.log_dir / f"{tag}")
                result["profile"] = [str(ctx.log_dir / f"{tag}.speedscope.json")]
            drain = await jobs.watch_drain(
                js,
                ctx.topo.stream,
                n,
                alive=worker.alive,
                within=max(60.0, n / 500),
                cpu=lambda: cpu_seconds(pid),
                server_cpu=lambda: cpu_seconds(srv.pid),
                load=lambda: Load(pid, srv.pid),
            )
            if drain.done_at is None or drain.first_ack_at is None:
                why = "worker exited" if drain.worker_died else "timed out"
                raise MeasureError(f"{why} with {drain.left} of {n} jobs unacked\n{worker.tail()}")
            result["peak_rss_mb"] = _mb(proc_status_kb(pid, "VmHWM"))
            result["rss_mb"] = _mb(proc_status_kb(pid, "VmRSS"))
            _stop(worker, result, ctx.sigterm_cap)
        finally:
            if worker is not None:
                worker.kill()
            if spy is not None:  # py-spy ends with its target; bounded anyway
                try:
                    spy.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(timeout=10)
            with contextlib.suppress(Exception):
                await acks.stop()
            with contextlib.suppress(Exception):
                await nc.close()
    result["load_end"] = load_average()
    span = drain.done_at - drain.first_ack_at
    acked = drain.left_at_first  # jobs acked between the first ack seen and the empty stream
    # start -> first ack: the ack itself, seen on the ack subject (an event); the stream poll
    # (every 2 ms plus a round trip) only if the ack was somehow not seen
    first_ack = acks.first_at if acks.first_at is not None else drain.first_ack_at
    result["first_ack_by"] = "ack event" if acks.first_at is not None else "stream poll"
    result["start_to_first_ack_s"] = first_ack - worker.started_at
    result["first_ack_poll_lag_ms"] = (
        (drain.first_ack_at - acks.first_at) * 1e3 if acks.first_at is not None else None
    )
    result["drain_s"] = span
    result["jobs_per_s"] = acked / span if span > 0 else None
    result["polls"] = drain.polls
    t0 = drain.first_ack_at
    # progress curve, thinned to ~100 points: [seconds since first ack, jobs acked]
    step = max(1, len(drain.series) // 100)
    result["progress"] = [
        [round(t - t0, 4), n - left] for t, left in drain.series[::step] if t >= t0
    ]
    if drain.cpu_at_done is not None and drain.cpu_at_first is not None and acked:
        result["cpu_us_per_job"] = (drain.cpu_at_done - drain.cpu_at_first) / acked * 1e6
        result["worker_cpu_share"] = (drain.cpu_at_done - drain.cpu_at_first) / span
    result["other_cores"] = drain.other_cores
    if drain.server_cpu_at_done is not None and drain.server_cpu_at_first is not None:
        result["server_cpu_share"] = (drain.server_cpu_at_done - drain.server_cpu_at_first) / span
    return result


async def _until_empty(
    js: JetStreamContext, stream: str, alive: Callable[[], bool], within: float
) -> int:
    """Poll (every 50 ms, at most ``within`` s) until the stream is empty; return what is left."""
    left = await jobs.stream_messages(js, stream)
    for _ in range(int(within / 0.05)):
        if left == 0 or not alive():
            break
        await asyncio.sleep(0.05)
        left = await jobs.stream_messages(js, stream)
    return left


def _py_spy(pid: int, stem: Path) -> subprocess.Popen[bytes]:
    """Sample a running worker until it exits (speedscope for people, raw stacks for grep).
    Not for the numbers: a sampled worker runs slower."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    log = open(f"{stem}.py-spy.log", "wb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "speedscope",
             "--output", f"{stem}.speedscope.json"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    finally:
        log.close()
    time.sleep(0.3)  # let it attach before the drain starts in earnest
    return proc


async def _wait_ready(js: JetStreamContext, topo: Topology, worker: Worker, within: float) -> float:
    """Until the worker has a pull request waiting on its consumer (black-box readiness)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not worker.alive():
            raise MeasureError(f"worker exited before it was ready\n{worker.tail()}")
        with contextlib.suppress(Exception):
            info = await js.consumer_info(topo.stream, topo.durable)
            if (info.num_waiting or 0) > 0:
                return time.monotonic() - worker.started_at
        await asyncio.sleep(0.01)
    raise MeasureError(f"worker not pulling after {within:g} s\n{worker.tail()}")


async def paced_publish(
    js: JetStreamContext,
    subject: str,
    rate: float,
    seconds: float,
    prefix: str,
    stop: asyncio.Event | None = None,
    sent_by_seq: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Publish at a fixed offered rate for ``seconds`` (or until ``stop`` is set, if sooner);
    each job id carries its send time (wall clock, ns). ``sent_by_seq``, when given, is filled
    with stream sequence -> send time (from each PubAck), to match acks to sends."""
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    futures = []
    sent: list[int] = []
    t0 = loop.time()
    hard_stop = t0 + 2 * seconds + 10
    i = 0
    while i < total and loop.time() < hard_stop and not (stop and stop.is_set()):
        due = min(total, int((loop.time() - t0) * rate) + 1)
        while i < due:
            sent_ns = time.time_ns()
            job_id = f"{prefix}{i:07d}-{sent_ns}"
            sent.append(sent_ns)
            futures.append(
                await js.publish_async(
                    subject, jobs.payload(job_id), wait_stall=5.0, headers={"Nats-Msg-Id": job_id}
                )
            )
            i += 1
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    elapsed = loop.time() - t0
    acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    failed = sum(1 for a in acks if isinstance(a, BaseException))
    if sent_by_seq is not None:
        for sent_ns, ack in zip(sent, acks, strict=True):
            if not isinstance(ack, BaseException):
                sent_by_seq[ack.seq] = sent_ns
    return {"sent": i, "failed": failed, "offered_rate": i / elapsed if elapsed else None}


async def latency(
    ctx: Context, spec: Spec, rate: float, seconds: float, warmup: float, out_file: Path
) -> tuple[dict[str, Any], list[float]]:
    """Fixed-rate e2e latency, publish -> handler start (recorded by the worker) and publish ->
    ack (seen by the harness on the ack subject). Returns (summary, handler-start samples in ms);
    the at-ack summary is ``summary["at_ack"]``."""
    result: dict[str, Any] = {
        "worker": spec.key,
        "rate": rate,
        "seconds": seconds,
        "load_start": load_average(),
    }
    _remove(out_file)
    sent_by_seq: dict[int, int] = {}
    with NatsServer(ctx.log_dir / f"{spec.key}-latency.nats.log") as srv:
        await _provisioned(ctx, srv)
        nc = await jobs.connect(srv.url)
        worker: Worker | None = None
        acks = jobs.AckWatch(nc, ctx.topo.stream, keep=True)
        try:
            js = nc.jetstream()
            worker = _start(spec, srv, ctx.log_dir / f"{spec.key}-latency.log")
            result["start_to_ready_s"] = await _wait_ready(js, ctx.topo, worker, 30.0)
            await acks.start()
            if warmup > 0:  # first-call costs (imports on first use, caches) are not latency
                await paced_publish(js, ctx.topo.ingress, rate, warmup, "W")
            load = Load(worker.pid, srv.pid)
            pub = await paced_publish(
                js, ctx.topo.ingress, rate, seconds, "L", sent_by_seq=sent_by_seq
            )
            result["other_cores"] = load.other_cores()
            result.update(pub)
            left = await _until_empty(js, ctx.topo.stream, worker.alive, within=60.0)
            if left:
                raise MeasureError(f"{left} jobs still unacked 60 s after publishing ended")
            await asyncio.sleep(0.05)  # the last acks' copies are on their way to the harness
            await acks.stop()
            _stop(worker, result, ctx.sigterm_cap)
        finally:
            if worker is not None:
                worker.kill()
            with contextlib.suppress(Exception):
                await acks.stop()
            with contextlib.suppress(Exception):
                await nc.close()
    result["load_end"] = load_average()
    samples = _latencies(out_file, "L")
    result["handled"] = len(samples)
    result["missing"] = result["sent"] - len(samples)
    result.update(summarize_ms(samples))
    at_ack = [
        (acks.acked[seq] - sent_ns) / 1e6
        for seq, sent_ns in sent_by_seq.items()
        if seq in acks.acked
    ]
    result["at_ack"] = {
        "acked": len(at_ack),
        "not_seen": len(sent_by_seq) - len(at_ack),
        **summarize_ms(at_ack),
    }
    return result, samples


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _latencies(path: Path, prefix: str) -> list[float]:
    """``<id> <handler ns>`` lines -> latency in ms for ids ``<prefix><seq>-<send ns>``.

    A job handled more than once (a redelivery) counts with its first handling."""
    first: dict[str, int] = {}
    if not path.exists():
        raise MeasureError(f"the worker wrote no latency records ({path.name})")
    with open(path, encoding="utf-8") as records:
        for line in records:
            job_id, _, handled = line.strip().partition(" ")
            if job_id.startswith(prefix) and job_id not in first:
                first[job_id] = int(handled)
    return [(t - int(job_id.rsplit("-", 1)[1])) / 1e6 for job_id, t in first.items()]


def summarize_ms(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "max_ms": ordered[-1],
        "mean_ms": statistics.fmean(ordered),
        "min_ms": ordered[0],
        # the distribution, for the plot: [percentile, ms], dense in the tail
        "quantiles": [[q, round(pct(q), 4)] for q in QUANTILES] + [[100.0, ordered[-1]]],
    }


QUANTILES = (
    [float(q) for q in range(90)]
    + [90 + i / 10 for i in range(90)]
    + [99 + i / 100 for i in range(90)]
    + [99.9 + i / 1000 for i in range(100)]
)


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024
