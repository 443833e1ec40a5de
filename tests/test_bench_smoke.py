"""The benchmark harness cannot rot: a quick run in CI, asserting completion, not timings.

``python bench/run.py --quick`` measures every worker (generated, with metrics, with tracing,
raw nats-py, FastStream) on small N, plus latency and a route switch, and writes
``bench/results/raw/quick.json``. Speed belongs to the full run and the README, never to a test.
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
    "generated+tracing",
    "generated+tracing+sink",
    "generated+tracing+sink+10%",
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
    assert set(report["ratios"]) >= {"generated / raw-nats-py", "generated / faststream"}
    route = report["route"]
    assert route["lost"] == 0, route
    assert route["duplicates"] == 0, route
    assert route["old_exit_code"] == 0, route  # the old lane retired on its own
