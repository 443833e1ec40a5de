"""How fast the generated worker's CLI starts (issue 11, "Fast CLI start"). One command:

    python bench/cli_start.py              # 15 runs of each command (~15-30 s)
    python bench/cli_start.py --quick      # smoke: 3 runs of each, results in bench/results/raw/

Measured from outside, black-box, for ``python -m bench_worker ...`` (this interpreter, the one
bench/run.py uses), the worker generated from the template as checked out:

* ``--help`` and ``--version``: spawn to exit (wall time);
* ``route`` (no arguments: it reads the route from the server): spawn to the moment the server
  receives the command's first JetStream API request, seen by a monitoring connection subscribed
  to ``$JS.API.>`` (core NATS: it gets a copy of every request), and spawn to exit.

Results: bench/results/cli.{md,json} (``--out`` elsewhere; ``--quick``: bench/results/raw/
cli.*). Exit code 0 when every run completed (exit 0, request seen); targets are reported,
never asserted. See bench/README.md, "CLI start".
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import jobs, report, workers
from benchlib.procs import (
    Load,
    NatsServer,
    Worker,
    load_average,
    nats_server_version,
    wait_quiet,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EXIT_CAP_S = 30.0  # a CLI run still going after this is killed and counted as failed
SEEN_GRACE_S = 1.0  # after the exit, how long the monitor may still take to report the request

# key -> (CLI arguments, metric whose median has a target, target in ms). "floor" is no CLI
# command: ``python -c pass``, the interpreter alone, for scale (no target).
COMMANDS: dict[str, tuple[tuple[str, ...], str | None, float | None]] = {
    "help": (("--help",), "wall_ms", 150.0),
    "version": (("--version",), "wall_ms", 150.0),
    "route": (("route",), "to_server_ms", 300.0),
    "floor": (("-c", "pass"), None, None),
}


def argv(project: workers.Project, key: str) -> list[str]:
    args = COMMANDS[key][0]
    return [workers.PY, *args] if key == "floor" else project.cli(*args)


def shown(key: str) -> str:
    args = " ".join(COMMANDS[key][0])
    return f"python {args}" if key == "floor" else f"python -m {workers.PACKAGE} {args}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=None, help="timed runs per command (15; --quick 3)")
    p.add_argument("--quick", action="store_true", help="smoke: 3 runs each, no quiet wait")
    p.add_argument("--out", type=Path, default=None, help="results directory (bench/results)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="longest wait, once, for other processes to use < --quiet-cores cores, s (10; "
        "--quick: 0 = no wait)",
    )
    p.add_argument("--quiet-cores", type=float, default=0.3)
    p.add_argument(
        "--busy-load",
        type=float,
        default=report.BUSY_FRACTION,
        help="flag BUSY when the 1-min load average at the start exceeds this x cores (0.5)",
    )
    p.add_argument("--template", type=Path, default=REPO, help="template checkout (this repo)")
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 15)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 10.0
    args.out = args.out or (BENCH / "results" / "raw" if args.quick else BENCH / "results")
    args.stem = "cli"
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def stats(values: list[float]) -> dict[str, float] | None:
    """min / median / p90 (nearest rank) / max, in the unit given."""
    if not values:
        return None
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    return {
        "n": len(ordered),
        "min": round(ordered[0], 1),
        "median": round(statistics.median(ordered), 1),
        "p90": round(p90, 1),
        "max": round(ordered[-1], 1),
    }


class ApiMonitor:
    """Arrival time (``time.monotonic()``, this process) of the first ``$JS.API`` request whose
    reply subject is in the worker's private inbox, after :meth:`arm`."""

    def __init__(self, inbox_prefix: str) -> None:
        self.prefix = inbox_prefix
        self.armed = False
        self.seen_at: float | None = None
        self.subject = ""
        self.seen = asyncio.Event()

    def arm(self) -> None:
        self.armed, self.seen_at, self.subject = True, None, ""
        self.seen.clear()

    async def on_msg(self, msg: Any) -> None:
        now = time.monotonic()
        if self.armed and self.seen_at is None and (msg.reply or "").startswith(self.prefix):
            self.seen_at, self.subject, self.armed = now, msg.subject, False
            self.seen.set()


async def one_run(
    project: workers.Project,
    key: str,
    url: str,
    cwd: Path,
    log_path: Path,
    monitor: ApiMonitor | None,
) -> dict[str, Any]:
    """Spawn one CLI command and time it. The exit is timed by ``Worker.wait_exit`` (a pidfd
    event) in a thread, so the event loop stays free to receive the monitor's copy."""
    worker = Worker(argv(project, key), project.env(url), cwd, log_path)
    if monitor is not None:
        monitor.arm()
    worker.start()  # started_at = time.monotonic() right before subprocess.Popen
    exited_at = await asyncio.to_thread(worker.wait_exit, EXIT_CAP_S)
    result: dict[str, Any] = {}
    if exited_at is None:
        worker.kill()
        return {"error": f"still running after {EXIT_CAP_S:g} s, killed"}
    result["wall_ms"] = round((exited_at - worker.started_at) * 1000, 2)
    code = worker.proc.returncode if worker.proc else None
    if code != 0:
        result["error"] = f"exit {code}: {worker.tail(3)}"
    if monitor is not None:
        try:
            await asyncio.wait_for(monitor.seen.wait(), SEEN_GRACE_S)
        except TimeoutError:
            result["error"] = result.get("error") or "no JetStream API request seen"
        monitor.armed = False
        if monitor.seen_at is not None:
            result["to_server_ms"] = round((monitor.seen_at - worker.started_at) * 1000, 2)
            result["first_request"] = monitor.subject
    return result


async def main(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    load_start = load_average()  # before the harness starts anything
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = BENCH / "results" / "raw" / f"cli-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    build = BENCH / ".build"
    # Its own copy (not bench/.build/gen), so it can run next to bench/run.py; the shared stamp
    # records which copy is installed -e (both have the same pyproject, so the same metadata).
    gen = workers.generate(args.template, build / "cli")
    installed = workers.install(gen, build / "installed-pyproject.toml")
    log(f"cli: generated {gen.root.relative_to(REPO)} ({installed}); logs in {log_dir}")
    cwd = build / "cwd"  # an empty directory: no stray .env
    cwd.mkdir(exist_ok=True)

    quiet: dict[str, float] = {}
    if args.quiet_wait > 0:
        waited, cores = await wait_quiet(args.quiet_cores, args.quiet_wait)
        quiet = {"quiet_wait_s": round(waited, 1), "background_cores_before": round(cores, 2)}
        if cores >= args.quiet_cores:
            log(f"cli: machine still busy after {waited:.0f} s: {cores:.2f} cores used by others")

    errors: list[str] = []
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in COMMANDS}
    cold: dict[str, dict[str, Any]] = {}
    with NatsServer(log_dir / "nats-server.log") as srv:
        out = gen.run_cli(srv.url, "provision")  # route reads the stream and the route KV
        if out.returncode != 0:
            log(f"cli: provision failed: {out.stderr.strip()[-500:]}")
            return 1
        monitor = ApiMonitor(f"_INBOX.{workers.WORKER_NAME}.")
        nc = await jobs.connect(srv.url)
        try:
            await nc.subscribe("$JS.API.>", cb=monitor.on_msg)
            await nc.flush()
            load_run_start = load_average()
            cpu = Load(srv.pid)
            children0 = _children_cpu()
            # One untimed round first: the fresh copy has no bytecode cache yet. Then rounds of
            # help, version, route, so noise from neighbours spreads over all three alike.
            for rnd in range(-1, args.runs):
                for key in COMMANDS:
                    name = "cold" if rnd < 0 else str(rnd)
                    r = await one_run(
                        gen,
                        key,
                        srv.url,
                        cwd,
                        log_dir / f"{key}-{name}.log",
                        monitor if key == "route" else None,
                    )
                    if rnd < 0:
                        cold[key] = r
                    else:
                        r["run"] = rnd
                        runs[key].append(r)
                    if "error" in r:
                        errors.append(f"{key} run {name}: {r['error']}")
                log(
                    f"  round {'cold' if rnd < 0 else rnd}: "
                    + "  ".join(
                        _cell(k, (cold if rnd < 0 else {k: runs[k][-1]})[k]) for k in COMMANDS
                    )
                )
            span = time.monotonic() - cpu.t0
            children = _children_cpu() - children0
            other_cores = max(0.0, cpu.other_cores() - children / span) if span > 0 else 0.0
        finally:
            await nc.close()
    load_end = load_average()

    results: dict[str, Any] = {
        "meta": _meta(args, time.monotonic() - t_start),
        "config": {
            "runs": args.runs,
            "quick": args.quick,
            "busy_fraction": args.busy_load,
            "exit_cap_s": EXIT_CAP_S,
            **quiet,
        },
        "errors": errors,
        "load_start": load_start,
        "load_runs_start": load_run_start,
        "load_end": load_end,
        "other_cores": round(other_cores, 2),
        "cold": cold,
        "measurements": {},
    }
    results["busy"] = report.is_busy(results, args.busy_load)
    for key, (_args, metric, target) in COMMANDS.items():
        ok = [r for r in runs[key] if "error" not in r]
        m: dict[str, Any] = {
            "command": shown(key),
            "runs_ok": len(ok),
            "runs_failed": len(runs[key]) - len(ok),
            "wall_ms": stats([r["wall_ms"] for r in ok]),
            "target": {"metric": metric, "median_below_ms": target} if metric else None,
            "runs": runs[key],
        }
        if key == "route":
            m["to_server_ms"] = stats([r["to_server_ms"] for r in ok if "to_server_ms" in r])
            subjects = sorted({r["first_request"] for r in ok if r.get("first_request")})
            m["first_request_subjects"] = subjects
        if metric and target:
            median = (m.get(metric) or {}).get("median")
            m["target"]["median_ms"] = median
            m["target"]["met"] = None if median is None else median < target
        results["measurements"][key] = m

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(report.dumps(results))
    (args.out / f"{args.stem}.md").write_text(markdown(results))
    log("")
    log((args.out / f"{args.stem}.md").read_text())
    log(f"cli: wrote {args.out / args.stem}.{{md,json}} in {results['meta']['wall_s']:.0f} s")
    return 1 if errors else 0


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children (the CLI runs), so far."""
    t = os.times()
    return t.children_user + t.children_system


def _cell(key: str, r: dict[str, Any]) -> str:
    if "error" in r and "wall_ms" not in r:
        return f"{key} FAILED"
    seen = f" (server {r['to_server_ms']:.0f})" if "to_server_ms" in r else ""
    return f"{key} {r['wall_ms']:.0f} ms{seen}{' FAILED' if 'error' in r else ''}"


def _git(*cmd: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True)
    return out.stdout.strip()


def _meta(args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python bench/cli_start.py", *map(shlex.quote, sys.argv[1:])]),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "interpreter": sys.executable,
        "nats_py": version("nats-py"),
        "nats_server": nats_server_version(),
        "template_commit": _git("rev-parse", "--short", "HEAD"),
        "template_dirty": bool(
            _git(
                "status",
                "--porcelain",
                "--",
                "{{cookiecutter.worker_name}}",
                "hooks",
                "cookiecutter.json",
            )
        ),
        "wall_s": round(wall_s, 1),
    }


def _ms(s: dict[str, float] | None, which: str) -> str:
    return "-" if not s else f"{s[which]:.0f}"


def markdown(res: dict[str, Any]) -> str:
    meta, cfg = res["meta"], res["config"]
    a, b = res["load_start"], res["load_end"]
    lines = [
        "# CLI start-up",
        "",
        f"{meta['date']} · `{meta['command']}` · {meta['cpus']} CPUs · Python {meta['python']} · "
        f"nats-py {meta['nats_py']} · {meta['nats_server']} · template "
        f"{meta['template_commit']}{' (dirty)' if meta['template_dirty'] else ''} · wall time "
        f"{meta['wall_s']:.0f} s",
        "",
        f"Load average (1 / 5 / 15 min) on {a['cores']} cores: {a['load1']:.2f} / "
        f"{a['load5']:.2f} / {a['load15']:.2f} at the start, {b['load1']:.2f} / {b['load5']:.2f}"
        f" / {b['load15']:.2f} at the end; other processes kept {res['other_cores']:.2f} cores "
        "busy on average while the runs went on."
        + (
            f" **BUSY** (1-min load at the start > {cfg['busy_fraction']:g} x cores): treat the "
            "numbers as upper bounds."
            if res["busy"]
            else ""
        ),
        "",
    ]
    if cfg["quick"]:
        lines += ["**Quick smoke run: numbers are not meaningful.**", ""]
    lines += [
        f"`python -m {workers.PACKAGE} ...` of the generated worker, "
        f"{cfg['runs']} timed runs each (after one untimed cold round), milliseconds from the "
        "spawn.",
        "",
        "| command | measured | runs ok | min | median | p90 | max | target (median) | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("help", "wall_ms", "spawn → exit"),
        ("version", "wall_ms", "spawn → exit"),
        ("route", "to_server_ms", "spawn → first JetStream API request at the server"),
        ("route", "wall_ms", "spawn → exit"),
        ("floor", "wall_ms", "spawn → exit: the interpreter alone, for scale"),
    ]
    for key, metric, what in rows:
        m = res["measurements"][key]
        s = m.get(metric)
        tgt = m["target"] or {}
        if tgt.get("metric") == metric:
            verdict = {True: "met", False: "**missed**", None: "-"}[tgt["met"]]
            target = f"< {tgt['median_below_ms']:.0f} ms"
        else:
            verdict, target = "", ""
        lines.append(
            f"| `{m['command']}` | {what} | {m['runs_ok']}/"
            f"{m['runs_ok'] + m['runs_failed']} | {_ms(s, 'min')} | {_ms(s, 'median')} | "
            f"{_ms(s, 'p90')} | {_ms(s, 'max')} | {target} | {verdict} |"
        )
    cold = res.get("cold") or {}
    if cold:
        parts = [
            f"{k} {v['wall_ms']:.0f} ms"
            + (f" (server {v['to_server_ms']:.0f} ms)" if "to_server_ms" in v else "")
            for k, v in cold.items()
            if "wall_ms" in v
        ]
        lines += [
            "",
            f"Cold round (fresh copy, no bytecode cache yet; not counted): {', '.join(parts)}.",
        ]
    subjects = res["measurements"]["route"].get("first_request_subjects") or []
    if subjects:
        lines += ["", f"`route`'s first request: {', '.join(f'`{s}`' for s in subjects)}."]
    if res["errors"]:
        lines += ["", "Errors:", *[f"* {e}" for e in res["errors"]]]
    lines += [
        "",
        'Method: bench/README.md, "CLI start". The time to the server is seen from a monitoring '
        "connection (a core subscription to `$JS.API.>`), so it includes the copy's trip to the "
        "harness (well under a millisecond on loopback).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = parse_args()
    try:
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(main(arguments)))
    sys.exit(uvloop.run(main(arguments)))
