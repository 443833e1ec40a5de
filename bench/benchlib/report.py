"""Summaries, ratios, targets; results as markdown, JSON and a PNG."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        "generated / raw-nats-py": r("generated", "raw-nats-py"),
        "generated / faststream": r("generated", "faststream"),
        "generated+metrics / generated": r("generated+metrics", "generated"),
        "generated+tracing / generated": r("generated+tracing", "generated"),
        "generated+tracing+sink / generated": r("generated+tracing+sink", "generated"),
        "generated+tracing+sink+10% / generated": r("generated+tracing+sink+10%", "generated"),
        "raw-nats-py / faststream": r("raw-nats-py", "faststream"),
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
    rows: list[tuple[str, float | None, Callable[[float], bool], str]] = [
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
        ("generated e2e p99 < 20 ms at the offered rate", p99, lambda v: v < 20.0, "{:.2f} ms"),
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
        "(median) | worker / server CPU share | other processes, cores (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, w in res["workers"].items():
        if w["status"] != "ok":
            lines.append(f"| {key} | {w['status']}: {w.get('note', '')} |||||||||")
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
            f"{_s(s['other_cores'], 'max', '{:.2f}')} |"
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
            "| worker | jobs | offered/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for key, v in lat.items():
            if "error" in v or "skipped" in v:
                lines.append(f"| {key} | {v.get('error') or v.get('skipped')} ||||||||")
                continue
            lines.append(
                f"| {key} | {v.get('handled', 0):,} | {_f(v.get('offered_rate'), '{:,.0f}')} | "
                f"{_f(v.get('p50_ms'), '{:.2f}')} | {_f(v.get('p90_ms'), '{:.2f}')} | "
                f"{_f(v.get('p99_ms'), '{:.2f}')} | {_f(v.get('p999_ms'), '{:.2f}')} | "
                f"{_f(v.get('max_ms'), '{:.2f}')} | "
                f"{'missing ' + str(v['missing']) if v.get('missing') else ''} |"
            )
        lines += [
            "",
            "The generated worker runs a bench copy whose handler.py records the handler-start "
            "time (see bench/workers/latency_handler.py); the chassis is unchanged.",
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
    colors = ["#1f77b4", "#9467bd", "#2ca02c", "#d62728", "#8c564b"]
    bars = ax1.bar(keys, med, yerr=[lo, hi], capsize=6, color=colors[: len(keys)])
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
    color_of = dict(zip(res["workers"], colors, strict=False))
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
    if curves:
        ax2.axhline(20.0, color="grey", linestyle="--", linewidth=1, label="p99 target 20 ms")
        ax2.axvline(2.0, color="grey", linestyle=":", linewidth=1)
        ax2.set_xticks([0, 1, 2, 3, 4], ["p0", "p90", "p99", "p99.9", "p99.99+"])
        ax2.set_yscale("log")
        ax2.set_xlabel("percentile")
        ax2.set_ylabel("publish → handler start (ms, log)")
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
