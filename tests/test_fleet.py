"""A fleet on one real nats-server: three workers generated with different answers, two of them
sharing a subject root, each installed from its own generated project and driven through its
own CLI.

* A (``order-processor``, root ``shop``) hands each job to B with ``ctx.publish`` (the demo
  app's ``DEMO_FORWARD_TO`` knob), inside the job's trace;
* B (``notification-sender``, root ``shop``, too) is moved blue/green while A's load runs: a v2
  instance starts, ``route v2`` is given through B's CLI, and B's v1 instance drains and retires;
* C (``inventory-sync``, root ``warehouse``) just runs, and is the one whose ``ecosystem --json``
  watches the fleet.

Every job published to A reaches B exactly once (lost 0, duplicates 0, end to end), each of B's
jobs is in the trace of the A job that sent it, and the fleet view shows all three workers and
B's lanes changing state (v1 current, then v2 current with v1 draining or drained).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import Baker
from .fleet_support import (
    Process,
    cli,
    fleet,
    lane_states,
    live_lanes,
    nats_server,
    ok,
    publish_jobs,
    start,
    wait_for,
)
from .test_generated_suite import InstalledProject, install_layered

pytestmark = pytest.mark.slow

A = {"worker_name": "order-processor", "subject_root": "shop", "job_type": "order"}
B = {"worker_name": "notification-sender", "subject_root": "shop", "job_type": "notification"}
C = {
    "worker_name": "inventory-sync",
    "subject_root": "warehouse",
    "job_type": "stock_level",
    "author_name": "Warehouse Team",
    "include_kubernetes": "no",
}
RATE = 80.0  # jobs/s published to A while B moves
AROUND = 100  # jobs published to A before B's move starts, and again after its route changed
CAP = 6000  # the load's bound, far above what the move needs
TRACED = {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"}


def upstream_id(b_job_id: str) -> str:
    """The A job a B job came from: ``ctx.publish`` derives B's ``Nats-Msg-Id`` (its job id in
    the logs) from A's, as ``<A's Nats-Msg-Id>:<B's ingress>:<n>``."""
    return b_job_id.split(":", 1)[0]


@pytest.mark.timeout(600)
def test_a_fleet_moves_one_worker_blue_green_under_load(bake: Baker, tmp_path: Path) -> None:
    a, b, c = (
        install_layered(bake.fresh(**answers), tmp_path / f"venv-{answers['worker_name']}")
        for answers in (A, B, C)
    )
    with nats_server(tmp_path / "store") as url:
        debug = {"LOG_LEVEL": "DEBUG", **TRACED}  # one 'job done' line per job, with its trace
        a1 = start(
            a,
            url,
            tmp_path / "a-v1.log",
            "run",
            env={"LANE": "v1", "DEMO_FORWARD_TO": "notification", "PUBLISHES_TO": "notification"}
            | debug,
            name="A v1",
        )
        b1 = start(b, url, tmp_path / "b-v1.log", "run", env={"LANE": "v1"} | debug, name="B v1")
        c1 = start(c, url, tmp_path / "c-v1.log", "run", env={"LANE": "v1"}, name="C v1")
        processes: list[Process] = [a1, b1, c1]
        b2: Process | None = None
        seen: list[dict[str, str]] = []  # B's lane states, as C's fleet view showed them
        try:
            first = wait_for(lambda: everyone_live(fleet(c, url)), 90, "three live workers")
            seen.append(lane_states(first, B["worker_name"]))
            assert seen[0] == {"v1": "current"}, seen[0]

            load = Load(url, f"{A['subject_root']}.jobs.{A['job_type']}")
            load.start()
            wait_for(lambda: load.sent >= AROUND, 60, f"{AROUND} jobs published before the move")

            b2 = start(
                b, url, tmp_path / "b-v2.log", "run", env={"LANE": "v2"} | debug, name="B v2"
            )
            processes.append(b2)
            wait_for(
                lambda: "v2" in live_lanes(watch(c, url, seen), B["worker_name"]),
                60,
                "B's v2 instance live",
            )
            ok(cli(b, url, "route", "v2"))  # through B's own CLI
            routed_at = load.sent

            def moved() -> bool:
                states = lane_states(watch(c, url, seen), B["worker_name"])
                return states.get("v2") == "current" and states.get("v1") in (
                    "draining",
                    "drained",
                )

            wait_for(moved, 60, "B's v2 current and v1 draining")
            wait_for(lambda: load.sent >= routed_at + AROUND, 60, f"{AROUND} jobs after the route")
            load.stop.set()
            load.join(60)
            assert load.error is None, load.error
            assert not load.is_alive()
            total = load.sent
            assert total < CAP, "the load ran out before the move was done"

            def all_handled() -> bool:
                watch(c, url, seen)
                return len(a1.done()) >= total and len(b1.done()) + len(b2.done()) >= total

            wait_for(all_handled, 120, f"{total} jobs handled by A and by B")
            wait_for(lambda: not b1.alive(), 60, "B's v1 instance to retire once drained")
            final = watch(c, url, seen)
            from_a = fleet(a, url)  # any worker sees the same fleet
        finally:
            codes = {p.name: p.stop() for p in processes}
        assert codes == {name: 0 for name in codes}, codes  # B v1 retired with 0, others drained

    # the fleet view: every worker, and B's lane states changing
    assert {w["worker"] for w in final["workers"]} == {
        A["worker_name"],
        B["worker_name"],
        C["worker_name"],
    }
    assert {w["stream"] for w in from_a["workers"]} == {w["stream"] for w in final["workers"]}
    assert [w["worker"] for w in from_a["workers"] if w["self"]] == [A["worker_name"]]
    roots = {w["worker"]: w["subject_root"] for w in final["workers"]}
    assert roots[A["worker_name"]] == roots[B["worker_name"]] == "shop"
    final_states = lane_states(final, B["worker_name"])
    assert final_states["v2"] == "current"
    assert final_states.get("v1") in (None, "drained")
    assert {"v1": "current"} in seen
    assert any(s.get("v2") == "current" and s.get("v1") in ("draining", "drained") for s in seen)
    assert seen.index({"v1": "current"}) < max(
        i for i, s in enumerate(seen) if s.get("v2") == "current"
    )
    b_final = next(w for w in final["workers"] if w["worker"] == B["worker_name"])
    moves = [(ch["previous"], ch["lane"]) for ch in b_final["route_changes"]]
    assert ("v1", "v2") in moves, moves

    # lost 0 and duplicates 0, end to end: each job published to A is handled once by A and
    # reaches B exactly once, on either of B's lanes
    published = set(load.acked)
    a_done = Counter(str(r["job_id"]) for r in a1.done())
    b_records = b1.done() + (b2.done() if b2 else [])
    b_done = Counter(upstream_id(str(r["job_id"])) for r in b_records)
    report = (
        f"published {len(published)}, A handled {sum(a_done.values())}, B handled "
        f"{sum(b_done.values())} (v1 {len(b1.done())}, v2 {len(b2.done()) if b2 else 0})"
    )
    print(report)
    assert set(a_done) == published, report
    assert set(b_done) == published, f"lost {sorted(published - set(b_done))[:5]}; {report}"
    assert not {k: n for k, n in a_done.items() if n > 1}, report
    assert not {k: n for k, n in b_done.items() if n > 1}, f"duplicates; {report}"
    assert b1.done(), f"B's v1 handled nothing before the move; {report}"
    assert b2 is not None
    assert b2.done(), f"B's v2 handled nothing after the move; {report}"

    # one trace spans A and B: each B job runs in the trace of the A job that published it
    a_trace = {str(r["job_id"]): r.get("trace_id") for r in a1.done()}
    b_trace = {upstream_id(str(r["job_id"])): r.get("trace_id") for r in b_records}
    assert all(a_trace.values()), "A's job lines carry no trace_id: is tracing on?"
    mismatched = [job for job in published if a_trace[job] != b_trace.get(job)]
    assert not mismatched, f"{len(mismatched)} B job(s) outside their A job's trace, e.g. " + str(
        [(job, a_trace[job], b_trace.get(job)) for job in mismatched[:3]]
    )


def everyone_live(report: dict[str, Any]) -> dict[str, Any] | None:
    """The report, once A, B and C each have a live v1 instance and B's v1 is current."""
    for worker in (A, B, C):
        if live_lanes(report, worker["worker_name"]) != {"v1"}:
            return None
    return report if lane_states(report, B["worker_name"]).get("v1") == "current" else None


def watch(project: InstalledProject, url: str, seen: list[dict[str, str]]) -> dict[str, Any]:
    """One fleet view from ``project``; B's lane states are appended to ``seen``."""
    report = fleet(project, url)
    seen.append(lane_states(report, B["worker_name"]))
    return report


class Load(threading.Thread):
    """A producer publishing jobs to A at ``RATE`` in the background, until :attr:`stop` is set
    (or ``CAP`` jobs)."""

    def __init__(self, url: str, subject: str) -> None:
        super().__init__(daemon=True)
        self.url, self.subject = url, subject
        self.acked: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    @property
    def sent(self) -> int:
        return len(self.acked)

    def run(self) -> None:
        try:
            asyncio.run(self._publish())
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    async def _publish(self) -> None:
        jobs = ({"id": f"fleet{n:04d}"} for n in range(CAP) if not self.stop.is_set())
        await publish_jobs(self.url, self.subject, jobs, RATE, acked=self.acked)
