"""Benchmark the generated worker against the lean nats-py loop (the floor), nats-py's fetch()
loop and FastStream. One command:

    python bench/run.py            # full: N=50,000, 3 runs, 20 s latency, route switch
    python bench/run.py --quick    # CI smoke: small N, one run, < 90 s, asserts no timings
    python bench/run.py --io       # I/O-bound jobs: share of CONCURRENCY / latency (~2-4 min)

Black-box: every worker is a subprocess on its own fresh loopback nats-server; progress is read
from the stream (acked jobs leave a work-queue stream). Results: bench/results/latest.{md,json,png}
and bench/results/io.{md,json,png} (``--io``); ``--quick`` writes bench/results/raw/quick.* (and
``--io --quick`` raw/io-quick.*), so a smoke run never overwrites the committed results.
Exit code 0 when every measurement completed; target misses are reported, never asserted.
See bench/README.md for the method and what limits each number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import iobound, jobs, measure, report, route, workers
from benchlib.jobs import PAYLOAD_BYTES
from benchlib.procs import (
    NatsServer,
    Sidecar,
    free_port,
    load_average,
    nats_server_version,
    wait_quiet,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="jobs per throughput run (50,000)")
    p.add_argument("--runs", type=int, default=None, help="runs per worker (3)")
    p.add_argument("--quick", action="store_true", help="CI smoke test: N=1,000, 1 run, short")
    p.add_argument("--rate", type=float, default=2000.0, help="latency: offered jobs/s (2,000)")
    p.add_argument("--duration", type=float, default=None, help="latency: seconds (20)")
    p.add_argument("--warmup", type=float, default=None, help="latency: warm-up seconds (1)")
    p.add_argument("--workers", default="", help="comma-separated subset of worker keys")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--no-route", action="store_true")
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each measurement wait until other processes use fewer cores than this (0.3)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="longest wait for a quiet machine per measurement, s (60; --quick: 0 = no wait)",
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma-separated worker keys to sample with py-spy during throughput runs\n"
        "(speedscope files land next to the logs; profiled runs are slower: use for diagnosis)",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only re-render the .md and .png next to an existing results JSON",
    )
    p.add_argument(
        "--lean-credit",
        type=int,
        default=100,
        help="the lean loop's pull window (100 = the generated worker's default window)",
    )
    p.add_argument(
        "--busy-load",
        type=float,
        default=report.BUSY_FRACTION,
        help="flag a run BUSY when the 1-min load average at its start exceeds this x cores (0.5)",
    )
    p.add_argument(
        "--io",
        action="store_true",
        help="only the I/O-bound sweep: share of CONCURRENCY / handler latency reached\n"
        "(results: bench/results/io.*; with --quick: a small sweep in raw/io-quick.*)",
    )
    p.add_argument("--io-concurrency", default=None, help="I/O sweep: CONCURRENCY values "
                   "(10,100,1000; --quick: 10,100)")  # fmt: skip
    p.add_argument("--io-latency-ms", default=None, help="I/O sweep: handler latencies, ms "
                   "(1,10,100; --quick: 1,10)")  # fmt: skip
    p.add_argument("--io-seconds", type=float, default=None,
                   help="I/O sweep: jobs per cell = this x limit (3; --quick: 0.3)")  # fmt: skip
    p.add_argument("--io-max-jobs", type=int, default=None,
                   help="I/O sweep: most jobs per cell (15,000; --quick: 1,000)")  # fmt: skip
    p.add_argument("--io-runs", type=int, default=None, help="I/O sweep: runs per cell (2)")
    p.add_argument("--template", type=Path, default=REPO, help="template checkout (this repo)")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    args = p.parse_args(argv)
    quick = args.quick
    args.n = args.n or (1_000 if quick else 50_000)
    args.runs = args.runs or (1 if quick else 3)
    args.duration = args.duration or (1.0 if quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 1.0)
    # --quick measures latency for the generated worker only (the other recording paths are the
    # same harness code); a full run measures every worker.
    args.latency_workers = {"generated"} if quick else None
    args.route_before, args.route_after = (0.5, 0.5) if quick else (3.0, 3.0)
    args.retire_grace = 0.5 if quick else None  # None: the worker's default RETIRE_GRACE
    args.sigterm_cap = 3.0 if quick else 30.0
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if quick else (5.0 if args.io else 60.0)
    args.out = args.out or (BENCH / "results" / "raw" if quick else BENCH / "results")
    args.stem = ("io-quick" if quick else "io") if args.io else ("quick" if quick else "latest")

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x)

    def floats(text: str) -> tuple[float, ...]:
        return tuple(float(x) for x in text.split(",") if x)

    if args.io:
        args.io_plan = iobound.Plan(
            concurrency=ints(args.io_concurrency or ("10,100" if quick else "10,100,1000")),
            latency_ms=floats(args.io_latency_ms or ("1,10" if quick else "1,10,100")),
            seconds=args.io_seconds or (0.3 if quick else 3.0),
            min_jobs=100 if quick else 200,
            max_jobs=args.io_max_jobs or (1_000 if quick else 15_000),
            runs=args.io_runs or (1 if quick else 2),
        )
    elif quick:  # the smoke run drains one small I/O-bound cell, so that path cannot rot
        args.io_plan = iobound.Plan(
            concurrency=(10,), latency_ms=(10.0,), seconds=0.2, min_jobs=200, max_jobs=200, runs=1
        )
    else:  # the full run leaves the I/O sweep to --io
        args.io_plan = None
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return out.stdout.strip()


def meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "nats_py": version("nats-py"),
        "nats_server": nats_server_version(),
        "faststream": version("faststream"),
        "uvloop": version("uvloop"),
        "template_commit": git("rev-parse", "--short", "HEAD"),
        "template_dirty": bool(
            git(
                "status",
                "--porcelain",
                "--",
                "{{cookiecutter.worker_name}}",
                "hooks",
                "cookiecutter.json",
            )
        ),
    }


async def main(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    args.session_load = load_average()  # before the harness starts anything
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = BENCH / "results" / "raw" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    build = BENCH / ".build"
    log(f"bench: logs in {log_dir.relative_to(REPO)}")

    # The worker under test, rendered from the template as checked out, plus a bench copy of it
    # whose handler records handler-start times (latency and route runs only).
    gen = workers.generate(args.template, build / "gen")
    lat = workers.bench_copy(gen, build / "lat")
    io_project = workers.io_copy(gen, build / "io")
    installed = workers.install(gen, build / "installed-pyproject.toml")
    log(f"bench: generated {gen.root.relative_to(REPO)} ({installed})")
    fields = workers.job_fields(gen)  # send only the fields the generated Job still declares
    jobs.use_fields(fields)
    log(f"bench: job fields {', '.join(fields) if fields else '(unknown: sending all)'}")
    cwd = build / "cwd"  # workers run in an empty directory: no stray .env
    cwd.mkdir(exist_ok=True)

    with NatsServer() as srv:  # learn the names the worker provisions, from its own CLI
        out = gen.run_cli(srv.url, "provision")
        if out.returncode != 0:
            log(f"bench: provision failed: {out.stderr.strip()}")
            return 1
        topo = workers.read_topology(gen, srv.url)
    log(f"bench: stream {topo.stream}, ingress {topo.ingress}, consumer {topo.durable}")
    ctx = measure.Context(
        gen,
        topo,
        log_dir,
        sigterm_cap=args.sigterm_cap,
        profile=frozenset(k for k in args.profile.split(",") if k),
    )

    sink_port = free_port()  # a do-nothing OTLP collector for the "tracing, collector up" variant
    sink_argv = [sys.executable, str(workers.WORKERS_DIR / "otlp_sink.py"), str(sink_port)]
    if args.io:
        return await _run_io(args, ctx, io_project, cwd, t_start)
    with Sidecar(sink_argv, log_dir / "otlp-sink.log"):
        return await _run(args, ctx, gen, lat, io_project, topo, cwd, log_dir, t_start, sink_port)


async def _run_io(
    args: argparse.Namespace,
    ctx: measure.Context,
    io_project: workers.Project,
    cwd: Path,
    t_start: float,
) -> int:
    """``--io``: only the I/O-bound sweep, written to its own results files."""
    errors: list[str] = []
    results: dict[str, Any] = {"meta": meta(args), "errors": errors}
    results["config"] = _config(args, ctx.topo)
    results["load_session_start"] = args.session_load
    results["io"] = await iobound.sweep(
        ctx, io_project, cwd, args.io_plan, lambda: _quiet(args), log, errors, args.busy_load
    )
    results["meta"]["wall_s"] = time.monotonic() - t_start
    report.write_io(results, args.out, args.stem)
    log("")
    log((args.out / f"{args.stem}.md").read_text())
    log(f"bench: wrote {args.out / args.stem}.{{md,json,png}} in {results['meta']['wall_s']:.0f} s")
    return 1 if errors else 0


def _config(args: argparse.Namespace, topo: workers.Topology) -> dict[str, Any]:
    return {
        "n": args.n,
        "runs": args.runs,
        "quick": args.quick,
        "payload_bytes": PAYLOAD_BYTES,
        "rate": args.rate,
        "duration": args.duration,
        "warmup": args.warmup,
        "sigterm_cap_s": args.sigterm_cap,
        "quiet_cores": args.quiet_cores,
        "quiet_wait_s": args.quiet_wait,
        "busy_fraction": args.busy_load,
        "lean_credit": args.lean_credit,
        "topology": topo.__dict__,
    }


async def _run(
    args: argparse.Namespace,
    ctx: measure.Context,
    gen: workers.Project,
    lat: workers.Project,
    io_project: workers.Project,
    topo: workers.Topology,
    cwd: Path,
    log_dir: Path,
    t_start: float,
    sink_port: int,
) -> int:
    sink = f"http://127.0.0.1:{sink_port}"
    wanted = {w for w in args.workers.split(",") if w}
    all_specs = [
        s
        for s in workers.specs(gen, lat, topo, cwd, otlp_sink=sink, lean_credit=args.lean_credit)
        if not wanted or s.key in wanted
    ]
    errors: list[str] = []
    results: dict[str, Any] = {"meta": meta(args), "errors": errors}
    results["config"] = _config(args, topo)
    results["load_session_start"] = args.session_load
    wk: dict[str, Any] = {}
    for s in all_specs:
        wk[s.key] = {"label": s.label, "status": "skipped" if s.skip else "ok", "runs": []}
        if s.skip:
            wk[s.key]["note"] = s.skip
            log(f"bench: {s.key}: {s.skip}")
    runnable = [s for s in all_specs if not s.skip]

    # ---- throughput: rounds, each worker once per round, rotating the order.
    for run in range(args.runs):
        order = runnable[run % len(runnable) :] + runnable[: run % len(runnable)]
        for s in order:
            quiet = await _quiet(args)
            try:
                r = await measure.throughput(ctx, s, args.n, run)
            except Exception as exc:
                r = {"worker": s.key, "run": run, "error": _err(exc)}
                errors.append(f"throughput {s.key} run {run}: {_err(exc)}")
            r.update(quiet)
            r["busy"] = report.is_busy(r, args.busy_load)
            wk[s.key]["runs"].append(r)
            log(_line(r))
    for w in wk.values():
        if w["status"] == "ok":
            w["summary"] = report.summarize(w["runs"])
            if not w["summary"]["runs_ok"]:
                w["status"], w["note"] = "failed", "no run completed"
    results["workers"] = wk
    summaries = {k: w.get("summary") or {} for k, w in wk.items()}
    results["ratios"] = report.ratios(summaries)

    # ---- e2e latency at a fixed offered rate, recording variants.
    latency: dict[str, Any] = {}
    if args.no_latency:
        latency["skipped"] = "skipped: --no-latency"
    else:
        lat_dir = log_dir / "latency"
        lat_dir.mkdir(exist_ok=True)
        for s in workers.specs(
            gen, lat, topo, cwd, latency_dir=lat_dir, otlp_sink=sink, lean_credit=args.lean_credit
        ):
            if (wanted and s.key not in wanted) or (
                args.latency_workers is not None and s.key not in args.latency_workers
            ):
                continue
            if s.skip:
                latency[s.key] = {"skipped": s.skip}
                continue
            quiet = await _quiet(args)
            try:
                summary, _samples = await measure.latency(
                    ctx, s, args.rate, args.duration, args.warmup, lat_dir / f"{s.key}.txt"
                )
                latency[s.key] = {**summary, **quiet}
                latency[s.key]["busy"] = report.is_busy(summary, args.busy_load)
                log(_latency_line(s.key, latency[s.key]))
            except Exception as exc:
                latency[s.key] = {"error": _err(exc)}
                errors.append(f"latency {s.key}: {_err(exc)}")
                log(f"  latency {s.key}: FAILED {_err(exc)}")
    results["latency"] = latency

    # ---- route switch under load (needs the route command).
    if args.no_route:
        results["route"] = {"skipped": "skipped: --no-route"}
    elif not gen.has_command("route"):
        results["route"] = {"skipped": "skipped: route command not available yet"}
    else:
        quiet = await _quiet(args)
        try:
            results["route"] = await route.route_switch(
                ctx, lat, args.rate, args.route_before, args.route_after,
                retire_grace=args.retire_grace,
            )  # fmt: skip
            r = results["route"]
            r.update(quiet)
            log(
                f"  route v2: command {r['route_command_s']:.2f} s, S→first v2 "
                f"{r['switch_to_first_new_ms']:.1f} ms, v1 drained {r['old_lane_drain_ms']:.1f} ms"
                f", v1 retired {r['old_lane_retired_s']} s, lost {r['lost']}, dup {r['duplicates']}"
            )
        except Exception as exc:
            results["route"] = {"error": _err(exc)}
            errors.append(f"route: {_err(exc)}")
    log(f"  route: {results['route'].get('skipped') or results['route'].get('error') or 'ok'}")

    # ---- the smoke run's single I/O-bound cell (the full sweep is --io).
    if args.io_plan is not None and (not wanted or "generated" in wanted):
        results["io"] = await iobound.sweep(
            ctx, io_project, cwd, args.io_plan, lambda: _quiet(args), log, errors, args.busy_load
        )

    results["targets"] = report.targets(summaries, results["ratios"], latency)
    results["meta"]["wall_s"] = time.monotonic() - t_start
    report.write(results, args.out, args.stem)
    log("")
    log((args.out / f"{args.stem}.md").read_text())
    log(f"bench: wrote {args.out / args.stem}.{{md,json,png}} in {results['meta']['wall_s']:.0f} s")
    return 1 if errors else 0


async def _quiet(args: argparse.Namespace) -> dict[str, float]:
    """Wait for a quiet machine (bounded); say how long and how loud it was."""
    if args.quiet_wait <= 0:
        return {}
    waited, cores = await wait_quiet(args.quiet_cores, args.quiet_wait)
    if cores >= args.quiet_cores:
        log(f"  (machine still busy after {waited:.0f} s: {cores:.2f} cores used by others)")
    return {"quiet_wait_s": round(waited, 1), "background_cores_before": round(cores, 2)}


def _err(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, measure.MeasureError):
        text = f"{type(exc).__name__}: {text} | {traceback.format_exc(limit=3).splitlines()[-3:]}"
    return text


def _latency_line(key: str, v: dict[str, Any]) -> str:
    a = v.get("at_ack") or {}
    return (
        f"  latency {key:<22} p50 {v.get('p50_ms', 0):6.2f} ms  p99 {v.get('p99_ms', 0):6.2f} ms"
        f"  max {v.get('max_ms', 0):6.1f} ms  | at ack p50 {a.get('p50_ms', 0):6.2f} ms  "
        f"p99 {a.get('p99_ms', 0):6.2f} ms  ({v.get('handled')} jobs at "
        f"{v.get('offered_rate', 0):,.0f}/s){_load_tag(v)}"
    )


def _load_tag(r: dict[str, Any]) -> str:
    load = r.get("load_start") or {}
    if not load:
        return ""
    return f"  load1 {load['load1']:.2f}/{load['cores']}{' BUSY' if r.get('busy') else ''}"


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"  {r['worker']:<22} run {r['run']}: FAILED {r['error']}"
    return (
        f"  {r['worker']:<22} run {r['run']}: {r['jobs_per_s']:>9,.0f} jobs/s  "
        f"rss {r['peak_rss_mb']:5.1f} MB  first ack {r['start_to_first_ack_s']:.3f} s  "
        + (
            f"sigterm {r['sigterm_to_exit_s']:.3f} s (exit {r['exit_code']})  "
            if r.get("sigterm_to_exit_s") is not None
            else f"sigterm: still running after {r.get('sigterm_timed_out')} s, killed  "
        )
        + f"cpu {r.get('cpu_us_per_job', 0):5.1f} µs/job  "
        + f"others {r.get('other_cores') or 0:.2f} cores"
        + _load_tag(r)
    )


def render(path: Path) -> int:
    results = json.loads(path.read_text())
    if "workers" in results:
        report.write(results, path.parent, path.stem)
    else:  # an --io results file
        report.write_io(results, path.parent, path.stem)
    log(f"bench: re-rendered {path.with_suffix('.md')} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.render:
        sys.exit(render(arguments.render))
    try:
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(main(arguments)))
    sys.exit(uvloop.run(main(arguments)))
