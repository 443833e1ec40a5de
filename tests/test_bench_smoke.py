"""The benchmark harness cannot rot: a quick run in CI, asserting completion, not timings.

``python bench/run.py --quick`` measures every worker (generated, on asyncio, with metrics, with
tracing, the lean nats-py floor at two windows, raw nats-py, FastStream) on small N, plus latency
(at handler start and at ack), a route switch and one small I/O-bound cell, and writes
``bench/results/raw/quick.json``.
Speed belongs to the full run and the README, never to a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = {
    "generated",
    "generated+metrics",
    "generated+asyncio",
    "generated+tracing",
    "generated+tracing+sink",
    "generated+tracing+sink+10%",
    "lean-nats-py",
    "lean-nats-py-2x",
    "raw-nats-py",
    "faststream",
}

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_quick_benchmark_completes() -> None:
    result_file = ROOT / "bench" / "results" / "raw" / "quick.json"
    result_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    run = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--quiet-wait", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    output = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, output
    report = json.loads(result_file.read_text("utf-8"))
    assert report["errors"] == [], output
    assert set(report["workers"]) == WORKERS, report["workers"].keys()
    assert set(report["ratios"]) >= {
        "generated / lean-nats-py",
        "generated / raw-nats-py",
        "generated / faststream",
    }
    assert report["ratios"]["generated / lean-nats-py"] is not None  # the floor ran and acked
    for key, worker in report["workers"].items():
        for run in worker["runs"]:  # the machine's load is recorded next to every run
            assert {"load_start", "load_end"} <= run.keys(), (key, run)
    at_ack = report["latency"]["generated"]["at_ack"]  # latency at the ack, seen from outside
    assert at_ack["acked"] > 0, at_ack
    io_cells = report["io"]["cells"]  # the I/O-bound path (share of CONCURRENCY / latency)
    assert io_cells, report["io"]
    assert all(cell["runs_ok"] == 1 and cell["share"] for cell in io_cells), io_cells
    route = report["route"]
    assert route["lost"] == 0, route
    assert route["duplicates"] == 0, route
    assert route["old_exit_code"] == 0, route  # the old lane retired on its own


@pytest.mark.timeout(120)
def test_cli_start_benchmark_completes(tmp_path: Path) -> None:
    """``bench/cli_start.py --quick``: --help, --version and route (time to the server's first
    JetStream API request) are measured and written; no timing is asserted."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    run = subprocess.run(
        [sys.executable, "bench/cli_start.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    output = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, output
    report = json.loads((tmp_path / "cli.json").read_text("utf-8"))
    measured = report["measurements"]
    assert {"help", "version", "route"} <= measured.keys(), output
    for key in ("help", "version", "route"):
        assert measured[key]["wall_ms"] is not None, (key, measured[key])
    assert measured["route"]["to_server_ms"] is not None, measured["route"]
    assert {"load_start", "load_end"} <= report.keys()
