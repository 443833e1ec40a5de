"""The chaos suite: a real 3-node JetStream cluster, real worker processes, real faults.

Opt-in, because it takes minutes and starts many processes::

    pytest -m chaos tests/chaos            # every scenario, CI-sized (~10 s of load each)
    CHAOS=1 pytest                         # the same, inside a full run
    pytest -m soak tests/chaos             # the long mixed-fault run (CHAOS=soak also selects it)
    CHAOS_DURATION=60 CHAOS_RATE=500 pytest -m chaos tests/chaos   # longer, heavier scenarios

The markers are registered here (not in pyproject.toml) and a plain ``pytest`` deselects chaos
and soak tests. Every scenario prints its accounting; the terminal summary repeats one line per
scenario.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import NatsCluster
from .harness import Accounting, Fleet

_ACCOUNTING = pytest.StashKey[list[Accounting]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: fault injection on a real 3-node cluster (opt-in: -m chaos or CHAOS=1)"
    )
    config.addinivalue_line(
        "markers", "soak: long chaos run, CHAOS_DURATION s (opt-in: -m soak or CHAOS=soak)"
    )
    config.stash[_ACCOUNTING] = []


def _selected(config: pytest.Config, marker: str) -> bool:
    """Run ``marker`` tests only when -m names them, or CHAOS says so."""
    markexpr = str(config.getoption("markexpr", "") or "")
    flag = os.environ.get("CHAOS", "").strip().lower()
    if marker in markexpr:
        return True  # -m decides (also "not chaos", which pytest itself applies)
    if marker == "chaos":
        return flag in ("1", "true", "yes", "soak")
    return flag == "soak"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_chaos, run_soak = _selected(config, "chaos"), _selected(config, "soak")
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if item.get_closest_marker("soak"):
            drop = not run_soak
        else:
            drop = bool(item.get_closest_marker("chaos")) and not run_chaos
        (dropped if drop else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    results = terminalreporter.config.stash.get(_ACCOUNTING, [])
    if not results:
        return
    terminalreporter.section("chaos accounting")
    for result in results:
        terminalreporter.write_line(result.line())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nodes on loopback, healthy, with a meta leader; killed whatever the test did."""
    nodes = NatsCluster(tmp_path / "cluster")
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def fleet(cluster: NatsCluster, tmp_path: Path) -> Iterator[Fleet]:
    """Worker processes on a stream of their own; every one killed at the end."""
    workdir = tmp_path / "workers"
    workdir.mkdir()
    workers = Fleet(cluster, workdir)
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
def record_accounting(request: pytest.FixtureRequest) -> Iterator[list[Accounting]]:
    """Accounting results appended here show up in the terminal summary."""
    mine: list[Accounting] = []
    started = time.time()
    yield mine
    for result in mine:
        if not result.runtime_s:
            result.runtime_s = time.time() - started
        request.config.stash[_ACCOUNTING].append(result)
