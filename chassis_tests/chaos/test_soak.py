"""The soak run: every fault in turn, for CHAOS_DURATION seconds (default 60) of steady load.

    pytest -m soak tests/chaos                       # 60 s at 250 jobs/s
    CHAOS_DURATION=600 CHAOS_RATE=500 pytest -m soak tests/chaos

Faults cycle: kill -9 the stream leader's node (and restart it), kill -9 a worker (and start a
replacement), SIGSTOP a node (partition) then SIGCONT, SIGTERM a worker (drain, replacement).
The accounting at the end is the same as in every chaos scenario.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest

from .cluster import NatsCluster
from .harness import (
    Accounting,
    Fleet,
    Knobs,
    LoadPublisher,
    WorkerProc,
    assert_accounting,
    finish,
    knobs,
    leaders,
    start_workers,
)

K: Knobs = knobs(default_duration=60.0)
pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(K.timeout),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def test_soak_mixed_faults(
    cluster: NatsCluster, fleet: Fleet, record_accounting: list[Accounting]
) -> None:
    started = time.time()
    workers: list[WorkerProc] = start_workers(fleet, 3)
    replacements = itertools.count(1)

    def replace(victim: WorkerProc) -> None:
        workers.remove(victim)
        workers.append(fleet.start(f"v1-r{next(replacements)}"))

    def kill_leader_node() -> None:
        node = leaders(cluster, fleet)["stream"]
        if node == "?":
            return
        cluster.kill(node)
        time.sleep(8)
        cluster.restart(node)

    def kill_worker() -> None:
        victim = workers[0]
        fleet.kill9(victim)
        replace(victim)
        time.sleep(4)

    def partition_node() -> None:
        node = cluster.nodes[next(replacements) % len(cluster.nodes)].name
        cluster.pause(node)
        try:
            time.sleep(8)
        finally:
            cluster.resume(node)
        time.sleep(2)

    def rolling_one() -> None:
        victim = workers[0]
        fleet.terminate(victim)
        replace(victim)
        time.sleep(3)

    faults: list[Callable[[], None]] = [kill_leader_node, kill_worker, partition_node, rolling_one]
    done: list[str] = []
    with LoadPublisher(cluster.urls, fleet.ingress, rate=K.rate, duration=K.duration) as pub:
        t0 = time.time()
        for fault in itertools.cycle(faults):
            if time.time() > t0 + K.duration - 12:
                break
            fault()
            done.append(fault.__name__)
        result = finish(
            f"soak {K.duration:g}s, mixed faults",
            pub,
            fleet,
            record_accounting,
            started,
            settle=120,
            facts={"faults": len(done), "fault kinds": sorted(set(done))},
        )
    assert_accounting(result, pub, duplicates="explained")
