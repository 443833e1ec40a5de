"""Summaries, ratios, targets; results as markdown, JSON and a PNG."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUSY_FRACTION = 0.5  # a run whose 1-min load average at its start exceeds this x cores is BUSY

METRICS = (
    "jobs_per_s",
    "peak_rss_mb",
    "start_to_first_ack_s",
    "sigterm_to_exit_s",
    "cpu_us_per_job",
    "worker_cpu_share",
    "server_cpu_share",
    "publish_rate",
    "other_cores",
)


def is_busy(run: dict[str, Any], fraction: float = BUSY_FRACTION) -> bool:
    """Taken on a busy machine: 1-min load average at the run's start > ``fraction`` x cores."""
    load = run.get("load_start") or {}
    return bool(load) and load["load1"] > fraction * load["cores"]


def _load(run: dict[str, Any]) -> str:
    a, b = run.get("load_start") or {}, run.get("load_end") or {}
    if not a:
        return "-"
    end = f" → {b['load1']:.2f}" if b else ""
    return f"{a['load1']:.2f}{end} / {a['cores']}{' **BUSY**' if run.get('busy') else ''}"


def spread(values: list[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"runs_ok": len(ok), "runs_failed": len(runs) - len(ok)}
    for metric in METRICS:
        out[metric] = spread([r.get(metric) for r in ok])
    # A worker still running at the SIGTERM cap counts with the cap: a lower bound, flagged.
    out["busy_runs"] = sum(1 for r in runs if r.get("busy"))
    timeouts = sum(1 for r in ok if r.get("sigterm_timed_out"))
    out["sigterm_timeouts"] = timeouts
    if timeouts:
        out["sigterm_to_exit_s"] = spread(
            [r.get("sigterm_to_exit_s") or r.get("sigterm_timed_out") for r in ok]
        )
    return out


def _median(summary: dict[str, Any], key: str, metric: str = "jobs_per_s") -> float | None:
    s = (summary.get(key) or {}).get(metric)
    return s["median"] if s else None


def ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    def r(a: str, b: str) -> float | None:
        x, y = _median(summary, a), _median(summary, b)
        return x / y if x is not None and y else None

    return {
        "generated / lean-nats-py": r("generated", "lean-nats-py"),
        "generated / lean-nats-py-2x": r("generated", "lean-nats-py-2x"),
        "generated / raw-nats-py": r("generated", "raw-nats-py"),
        "generated / faststream": r("generated", "faststream"),
        "generated+metrics / generated": r("generated+metrics", "generated"),
        "generated+asyncio / generated": r("generated+asyncio", "generated"),
        "generated+tracing / generated": r("generated+tracing", "generated"),
        "generated+tracing+sink / generated": r("generated+tracing+sink", "generated"),
        "generated+tracing+sink+10% / generated": r("generated+tracing+sink+10%", "generated"),
        "raw-nats-py / faststream": r("raw-nats-py", "faststream"),
        "lean-nats-py / raw-nats-py": r("lean-nats-py", "raw-nats-py"),
    }


def targets(
    summary: dict[str, Any], rat: dict[str, float | None], lat: dict[str, Any]
) -> list[dict[str, Any]]:
    """The issue's targets, checked (reported, never asserted)."""
    gen = summary.get("generated") or {}

    def stat(metric: str, which: str) -> float | None:
        s = gen.get(metric)
        return s[which] if s else None

    p99 = (lat.get("generated") or {}).get("p99_ms")
    p99_ack = ((lat.get("generated") or {}).get("at_ack") or {}).get("p99_ms")
    rows: list[tuple[str, float | None, Callable[[float], bool], str]] = [
        ("generated ≥ 90% of the lean nats-py floor (median jobs/s)",
         rat["generated / lean-nats-py"], lambda v: v >= 0.90, "{:.0%}"),
        ("generated ≥ 90% of the lean floor at the same window (credit 2x; median jobs/s)",
         rat["generated / lean-nats-py-2x"], lambda v: v >= 0.90, "{:.0%}"),
        ("generated ≥ 85% of raw nats-py (median jobs/s)", rat["generated / raw-nats-py"],
         lambda v: v >= 0.85, "{:.0%}"),
        ("generated ≥ 3x FastStream (median jobs/s)", rat["generated / faststream"],
         lambda v: v >= 3.0, "{:.2f}x"),
        ("tracing on ≥ 60% of tracing off (median jobs/s), OTLP to a closed port",
         rat["generated+tracing / generated"], lambda v: v >= 0.60, "{:.0%}"),
        ("tracing on ≥ 60% of tracing off (median jobs/s), live collector",
         rat["generated+tracing+sink / generated"], lambda v: v >= 0.60, "{:.0%}"),
        ("tracing on, 10% sampled ≥ 60% of tracing off (median jobs/s), live collector",
         rat["generated+tracing+sink+10% / generated"], lambda v: v >= 0.60, "{:.0%}"),
        ("generated peak RSS ≤ 40 MB (worst run)", stat("peak_rss_mb", "max"),
         lambda v: v <= 40.0, "{:.1f} MB"),
        ("generated start → first ack < 0.5 s (median)", stat("start_to_first_ack_s", "median"),
         lambda v: v < 0.5, "{:.3f} s"),
        ("generated SIGTERM → exit < 0.2 s, nothing in flight (median)",
         stat("sigterm_to_exit_s", "median"), lambda v: v < 0.2, "{:.3f} s"),
        ("generated e2e p99 < 20 ms at the offered rate (at handler start)", p99,
         lambda v: v < 20.0, "{:.2f} ms"),
        ("generated e2e p99 < 20 ms at the offered rate (at ack)", p99_ack,
         lambda v: v < 20.0, "{:.2f} ms"),
    ]  # fmt: skip
    out = []
    for name, value, check, fmt in rows:
        out.append(
            {
                "target": name,
                "value": value,
                "shown": fmt.format(value) if value is not None else "n/a",
                "met": None if value is None else bool(check(value)),
            }
        )
    return out


# ----------------------------------------------------------------------------- markdown


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _s(s: dict[str, float] | None, which: str, fmt: str) -> str:
    return "-" if not s else fmt.format(s[which])


def markdown(res: dict[str, Any]) -> str:
    meta, cfg = res["meta"], res["config"]
    lines = [
        "# Worker benchmark results",
        "",
        f"{meta['date']} · `{meta['command']}` · {meta['cpus']} CPUs · Python {meta['python']} · "
        f"nats-py {meta['nats_py']} · {meta['nats_server']} · FastStream {meta['faststream']} · "
        f"template {meta['template_commit']}{' (dirty)' if meta['template_dirty'] else ''} · "
        f"wall time {meta['wall_s']:.0f} s",
        "",
    ]
    lines += _session_load(res)
    if cfg["quick"]:
        lines += ["**Quick smoke run: numbers are not meaningful.**", ""]
    loads = [
        r.get("other_cores") or 0.0 for w in res["workers"].values() for r in w.get("runs", [])
    ] + [
        v.get("other_cores") or 0.0 for v in res.get("latency", {}).values() if isinstance(v, dict)
    ]
    if loads and max(loads) >= 0.3:
        lines += [
            f"**Shared machine: other processes kept up to {max(loads):.1f} of "
            f'{meta["cpus"]} cores busy during these measurements** (column "other '
            'processes"). Throughput is then a lower bound; worker CPU µs/job is the steadier '
            "number.",
            "",
        ]
    lines += [
        f"## Throughput: {cfg['n']:,} pre-published {cfg['payload_bytes']}-byte jobs, "
        f"{cfg['runs']} run(s) per worker",
        "",
        "Each run: fresh nats-server, stream provisioned by the generated worker's CLI, jobs "
        "published, worker started, stream polled until empty, SIGTERM. See bench/README.md.",
        "",
        "| worker | jobs/s min | jobs/s median | jobs/s max | peak RSS MB (max) | "
        "start → first ack s (median) | SIGTERM → exit s (median / max) | worker CPU µs/job "
        "(median) | worker / server CPU share | other processes, cores (max) | BUSY runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, w in res["workers"].items():
        if w["status"] != "ok":
            lines.append(f"| {key} | {w['status']}: {w.get('note', '')} ||||||||||")
            continue
        s = w["summary"]
        lines.append(
            f"| {key} | {_s(s['jobs_per_s'], 'min', '{:,.0f}')} | "
            f"**{_s(s['jobs_per_s'], 'median', '{:,.0f}')}** | "
            f"{_s(s['jobs_per_s'], 'max', '{:,.0f}')} | {_s(s['peak_rss_mb'], 'max', '{:.1f}')} | "
            f"{_s(s['start_to_first_ack_s'], 'median', '{:.3f}')} | "
            f"{'≥ ' if s.get('sigterm_timeouts') else ''}"
            f"{_s(s['sigterm_to_exit_s'], 'median', '{:.3f}')} / "
            f"{_s(s['sigterm_to_exit_s'], 'max', '{:.3f}')}"
            f"{' (cap hit, killed)' if s.get('sigterm_timeouts') else ''} | "
            f"{_s(s['cpu_us_per_job'], 'median', '{:.1f}')} | "
            f"{_s(s['worker_cpu_share'], 'median', '{:.0%}')} / "
            f"{_s(s['server_cpu_share'], 'median', '{:.0%}')} | "
            f"{_s(s['other_cores'], 'max', '{:.2f}')} | "
            f"{_busy_cell(s.get('busy_runs'), len(w['runs']))} |"
        )
    lines += [
        "",
        "start → first ack: from the spawn to the first ack, seen as it happens on the ack "
        "subject (`$JS.ACK.>`). SIGTERM → exit: timed by a pidfd (an event, well under 1 ms).",
        "",
        "### Every run: machine load",
        "",
        f"Load = 1-min load average at the run's start → at its end / cores (the kernel updates "
        f"it every 5 s; it counts the harness's own processes too). **BUSY**: load at the start "
        f"> {res['config'].get('busy_fraction', BUSY_FRACTION):g} x cores.",
        "",
        "| worker | run | jobs/s | load1 start → end / cores | other processes, cores |",
        "|---|---:|---:|---|---:|",
    ]
    for key, w in res["workers"].items():
        for r in w.get("runs", []):
            lines.append(
                f"| {key} | {r['run']} | "
                f"{'failed' if 'error' in r else _f(r.get('jobs_per_s'), '{:,.0f}')} | "
                f"{_load(r)} | {_f(r.get('other_cores'), '{:.2f}')} |"
            )
    lines += ["", "Workers:", ""]
    lines += [f"- **{k}**: {w['label']}" for k, w in res["workers"].items()]
    lines += ["", "## Ratios (median vs median, same run)", "", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {_f(v, '{:.2f}')} |" for k, v in res["ratios"].items()]

    lat = res.get("latency", {})
    lines += [
        "",
        f"## End-to-end latency: publish → handler start, {cfg['rate']:,.0f} jobs/s offered for "
        f"{cfg['duration']:g} s (after {cfg['warmup']:g} s warm-up)",
        "",
    ]
    if lat.get("skipped"):
        lines.append(str(lat["skipped"]))
    else:
        lines += [
            "| worker | jobs | offered/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | "
            "at ack: p50 / p99 / max ms | load1 start → end / cores | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for key, v in lat.items():
            if "error" in v or "skipped" in v:
                lines.append(f"| {key} | {v.get('error') or v.get('skipped')} ||||||||||")
                continue
            a = v.get("at_ack") or {}
            notes = [f"missing {v['missing']}"] if v.get("missing") else []
            if a.get("not_seen"):
                notes.append(f"{a['not_seen']} acks not seen")
            lines.append(
                f"| {key} | {v.get('handled', 0):,} | {_f(v.get('offered_rate'), '{:,.0f}')} | "
                f"{_f(v.get('p50_ms'), '{:.2f}')} | {_f(v.get('p90_ms'), '{:.2f}')} | "
                f"{_f(v.get('p99_ms'), '{:.2f}')} | {_f(v.get('p999_ms'), '{:.2f}')} | "
                f"{_f(v.get('max_ms'), '{:.2f}')} | "
                f"{_f(a.get('p50_ms'), '{:.2f}')} / {_f(a.get('p99_ms'), '{:.2f}')} / "
                f"{_f(a.get('max_ms'), '{:.2f}')} | {_load(v)} | {', '.join(notes)} |"
            )
        lines += [
            "",
            "Handler start: the worker records it (the generated worker runs a bench copy whose "
            "handler.py records the handler-start time, see bench/workers/latency_handler.py; the "
            "chassis is unchanged). At ack: the harness sees each ack on the ack subject "
            "(`$JS.ACK.>`, a core subscription) and matches it to the send time by stream "
            "sequence (from the PubAck); it includes the ack's trip to the harness.",
        ]

    route = res.get("route", {})
    lines += ["", "## Route switch and retiring lane", ""]
    if "skipped" in route or "error" in route:
        lines.append(str(route.get("skipped") or f"failed: {route['error']}"))
    else:
        lines += [
            f"`route v2` while {route['rate']:,.0f} jobs/s arrive (lane v1 worker and LANE=v2 "
            "worker running). S = send time of the first job that landed on lane v2.",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| route command wall time (incl. CLI start) | {_f(route.get('route_command_s'), '{:.3f} s')} |",  # noqa: E501
            f"| route command start → switch S | {_f(route.get('cmd_to_switch_s'), '{:.3f} s')} |",
            f"| S → first job handled on v2 | {_f(route.get('switch_to_first_new_ms'), '{:.1f} ms')} |",  # noqa: E501
            f"| publisher gap around S (no job sent; the precision of S) | {_f(route.get('switch_gap_ms'), '{:.1f} ms')} |",  # noqa: E501
            f"| retiring lane v1: last job handled, relative to S (≤ 0: nothing left to drain) | {_f(route.get('old_lane_drain_ms'), '{:.1f} ms')} |",  # noqa: E501
            f"| retiring lane v1: worker exited by itself, after S (includes RETIRE_GRACE) | {_f(route.get('old_lane_retired_s'), '{:.2f} s')} |",  # noqa: E501
            f"| jobs on v1 / v2 · lost · duplicated · landed on v1 after S | "
            f"{route.get('handled_old_lane')} / {route.get('handled_new_lane')} · "
            f"{route.get('lost')} · {route.get('duplicates')} · "
            f"{route.get('misrouted_after_switch')} |",
        ]

    if res.get("io"):
        lines += ["", io_markdown(res, title=False).rstrip()]
    lines += ["", "## Targets (reported, not asserted)", "", "| target | measured | met |",
              "|---|---:|:---:|"]  # fmt: skip
    for t in res["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['shown']} | {met} |")
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    json_name = res["plot"].rsplit(".", 1)[0] + ".json"
    lines += ["", f"Plot: `{res['plot']}`. Per-run numbers: `{json_name}`.", ""]
    return "\n".join(lines)


def _session_load(res: dict[str, Any]) -> list[str]:
    load = res.get("load_session_start")
    if not load:
        return []
    return [
        f"Load average before the harness started anything: {load['load1']:.2f} / "
        f"{load['load5']:.2f} / {load['load15']:.2f} (1 / 5 / 15 min) on {load['cores']} cores.",
        "",
    ]


def _busy_cell(busy: int | None, runs: int) -> str:
    return f"**BUSY {busy}/{runs}**" if busy else "-"


# ----------------------------------------------------------------------------- plot


def plot(res: dict[str, Any], path: Path) -> None:
    """Throughput bars (median, min/max whiskers); latency by percentile (from the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    keys = [k for k, w in res["workers"].items() if w["status"] == "ok"]
    med = [res["workers"][k]["summary"]["jobs_per_s"]["median"] for k in keys]
    lo = [
        m - res["workers"][k]["summary"]["jobs_per_s"]["min"]
        for k, m in zip(keys, med, strict=True)
    ]
    hi = [
        res["workers"][k]["summary"]["jobs_per_s"]["max"] - m
        for k, m in zip(keys, med, strict=True)
    ]
    colors = ["#1f77b4", "#9467bd", "#2ca02c", "#17becf", "#bcbd22", "#ff7f0e", "#d62728",
              "#8c564b", "#7f7f7f", "#e377c2", "#aec7e8"]  # fmt: skip
    color_of = dict(zip(res["workers"], colors, strict=False))
    bars = ax1.bar(keys, med, yerr=[lo, hi], capsize=6, color=[color_of.get(k) for k in keys])
    for bar, m, h in zip(bars, med, hi, strict=True):
        ax1.annotate(f"{m:,.0f}", (bar.get_x() + bar.get_width() / 2, m + h), ha="center",
                     va="bottom", xytext=(0, 4), textcoords="offset points")  # fmt: skip
    if med:
        ax1.set_ylim(0, max(m + h for m, h in zip(med, hi, strict=True)) * 1.12)
    cfg = res["config"]
    ax1.set_title(f"Throughput, {cfg['n']:,} jobs, median with min/max of {cfg['runs']} run(s)")
    ax1.set_ylabel("jobs/s")
    ax1.tick_params(axis="x", labelrotation=20)
    for label in ax1.get_xticklabels():
        label.set_horizontalalignment("right")
    curves = {
        k: v["quantiles"]
        for k, v in res.get("latency", {}).items()
        if isinstance(v, dict) and v.get("quantiles")
    }
    for key, q in curves.items():
        st = res["latency"][key]
        # x: "nines" (0 -> p0, 1 -> p90, 2 -> p99, 3 -> p99.9), so the tail gets the room
        x = [-np.log10(max(1 - p / 100, 1e-4)) for p, _ in q]
        ax2.plot(x, [ms for _, ms in q], color=color_of.get(key), linewidth=1.5,
                 label=f"{key}: p50 {st['p50_ms']:.2f}, p99 {st['p99_ms']:.2f}, "
                       f"max {st['max_ms']:.1f} ms")  # fmt: skip
        qa = (st.get("at_ack") or {}).get("quantiles")
        if qa:
            xa = [-np.log10(max(1 - p / 100, 1e-4)) for p, _ in qa]
            ax2.plot(xa, [ms for _, ms in qa], color=color_of.get(key), linewidth=1.2,
                     linestyle="--", label=f"{key} at ack: p50 {st['at_ack']['p50_ms']:.2f}, "
                     f"p99 {st['at_ack']['p99_ms']:.2f} ms")  # fmt: skip
    if curves:
        ax2.axhline(20.0, color="grey", linestyle="--", linewidth=1, label="p99 target 20 ms")
        ax2.axvline(2.0, color="grey", linestyle=":", linewidth=1)
        ax2.set_xticks([0, 1, 2, 3, 4], ["p0", "p90", "p99", "p99.9", "p99.99+"])
        ax2.set_yscale("log")
        ax2.set_xlabel("percentile")
        ax2.set_ylabel("publish → handler start (solid) / ack (dashed), ms, log")
        ax2.legend(fontsize=8, loc="upper left")
    ax2.set_title(f"E2E latency at {cfg['rate']:,.0f} jobs/s offered, {cfg['duration']:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_PAIR = re.compile(r"\[\s+([-\d.e]+),\s+([-\d.e]+)\s+\]")


def dumps(res: dict[str, Any]) -> str:
    """Indented JSON, with [x, y] pairs (quantiles, drain curves) kept on one line."""
    return _PAIR.sub(r"[\1, \2]", json.dumps(res, indent=2, default=str)) + "\n"


def write(res: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    res["plot"] = png.name
    plot(res, png)
    (out_dir / f"{stem}.json").write_text(dumps(res))
    (out_dir / f"{stem}.md").write_text(markdown(res))


# ----------------------------------------------------------------------------- I/O-bound sweep


def io_markdown(res: dict[str, Any], title: bool = True) -> str:
    """The I/O sweep: share of the Little's-law limit by CONCURRENCY x handler latency."""
    io = res["io"]
    cells, plan = io["cells"], io["plan"]
    lats = list(plan["latency_ms"])
    lines: list[str] = []
    if title:
        meta = res["meta"]
        lines += [
            "# I/O-bound jobs: share of the concurrency limit",
            "",
            f"{meta['date']} · `{meta['command']}` · {meta['cpus']} CPUs · Python "
            f"{meta['python']} · nats-py {meta['nats_py']} · {meta['nats_server']} · template "
            f"{meta['template_commit']}{' (dirty)' if meta['template_dirty'] else ''} · wall time "
            f"{meta['wall_s']:.0f} s",
            "",
        ]
        lines += _session_load(res)
        if res["config"].get("quick"):
            lines += ["**Quick smoke run: numbers are not meaningful.**", ""]
    lines += [
        "## I/O-bound jobs: share of the Little's-law limit (CONCURRENCY / handler latency)",
        "",
        "The generated worker (defaults, `CONCURRENCY` set) with a bench handler that only "
        "`await asyncio.sleep(latency)` (bench/workers/io_handler.py), draining a pre-published "
        f"backlog of max({plan['min_jobs']}, {plan['seconds']:g} s x limit) jobs, capped at "
        f"{plan['max_jobs']:,}; median of {plan['runs']} run(s). Share = jobs/s ÷ "
        "(CONCURRENCY / latency).",
        "",
        "| CONCURRENCY | " + " | ".join(f"{lat:g} ms" for lat in lats) + " |",
        "|---:|" + "---:|" * len(lats),
    ]
    for c in plan["concurrency"]:
        row = []
        for lat in lats:
            cell = next(x for x in cells if x["concurrency"] == c and x["latency_ms"] == lat)
            row.append(
                "failed"
                if cell["share"] is None
                else f"**{cell['share']:.0%}** ({cell['jobs_per_s']:,.0f}/s)"
                + (" BUSY" if cell["busy_runs"] else "")
            )
        lines.append(f"| {c:,} | " + " | ".join(row) + " |")
    lines += [
        "",
        "| CONCURRENCY | latency | limit jobs/s | jobs | jobs/s (median) | share min / median / "
        "max | slot busy per job | worker cores | server cores | worker CPU µs/job | one-core "
        "bound jobs/s | other cores (max) | BUSY runs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in cells:
        lines.append(
            f"| {x['concurrency']:,} | {x['latency_ms']:g} ms | {x['limit_per_s']:,.0f} | "
            f"{x['jobs']:,} | {_f(x['jobs_per_s'], '{:,.0f}')} | "
            f"{_f(x['share_min'], '{:.0%}')} / {_f(x['share'], '{:.0%}')} / "
            f"{_f(x['share_max'], '{:.0%}')} | {_f(x['slot_ms_per_job'], '{:.2f} ms')} | "
            f"{_f(x['worker_cores'], '{:.2f}')} | {_f(x['server_cores'], '{:.2f}')} | "
            f"{_f(x['cpu_us_per_job'], '{:.1f}')} | "
            f"{_f(1e6 / x['cpu_us_per_job'] if x['cpu_us_per_job'] else None, '{:,.0f}')} | "
            f"{_f(x['other_cores_max'], '{:.2f}')} | "
            f"{_busy_cell(x['busy_runs'], x['runs_ok'] + x['runs_failed'])} |"
        )
    lines += [
        "",
        "Slot busy per job = CONCURRENCY ÷ jobs/s: how long each job held a slot, on average "
        "(the handler's latency is the ideal). Worker cores = worker CPU time ÷ drain time. "
        "One-core bound = 1 s ÷ worker CPU µs/job: the most one event loop could do at that "
        "cost per job; where the limit is above it, the CPU, not the concurrency, is the cap. "
        "BUSY: 1-min load average at the run's start > "
        f"{io.get('busy_fraction', BUSY_FRACTION):g} x cores (per-run loads in the JSON).",
        "",
    ]
    return "\n".join(lines)


def io_plot(res: dict[str, Any], path: Path) -> None:
    """Share of the limit vs CONCURRENCY, one line per handler latency; worker cores alongside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    io = res["io"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    conc = list(io["plan"]["concurrency"])
    for lat in io["plan"]["latency_ms"]:
        cells = [
            next(x for x in io["cells"] if x["concurrency"] == c and x["latency_ms"] == lat)
            for c in conc
        ]
        pts = [(c, x) for c, x in zip(conc, cells, strict=True) if x["share"] is not None]
        if not pts:
            continue
        xs = [c for c, _ in pts]
        line = ax1.plot(xs, [x["share"] * 100 for _, x in pts], marker="o", label=f"{lat:g} ms")
        color = line[0].get_color()
        low = [x["share_min"] * 100 for _, x in pts]
        ax1.fill_between(xs, low, [x["share_max"] * 100 for _, x in pts], color=color, alpha=0.15)
        for c, x in pts:
            ax1.annotate(f"{x['share']:.0%}", (c, x["share"] * 100), xytext=(4, 4),
                         textcoords="offset points", fontsize=8, color=color)  # fmt: skip
        ax2.plot(xs, [x["worker_cores"] or 0 for _, x in pts], marker="o", color=color,
                 label=f"{lat:g} ms")  # fmt: skip
    ax1.axhline(90, color="grey", linestyle="--", linewidth=1, label="90%")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(conc, [f"{c:,}" for c in conc])
        ax.set_xlabel("CONCURRENCY")
        ax.legend(title="handler latency", fontsize=8)
    ax1.set_ylim(0, 110)
    ax1.set_ylabel("jobs/s as % of CONCURRENCY / latency")
    ax1.set_title("Share of the Little's-law limit (median, min-max band)")
    ax2.set_ylabel("worker CPU, cores")
    ax2.set_title("Worker CPU while draining")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_io(res: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    res["plot"] = png.name
    io_plot(res, png)
    (out_dir / f"{stem}.json").write_text(dumps(res))
    (out_dir / f"{stem}.md").write_text(
        io_markdown(res) + f"\nPlot: `{png.name}`. Per-run numbers: `{stem}.json`.\n"
    )
