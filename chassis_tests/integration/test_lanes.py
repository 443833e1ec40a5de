"""Evolution without downtime: version lanes, the route switch, retirement, rollback, registry.

Real nats-server, real worker processes (``python -m <package> run``), driven only through the
worker's own CLI (``route``, ``status``, ``publish``); a producer publishes to the ingress the
whole time. Every wait is a poll with a deadline; worker processes are killed however a test ends.

Load knobs for a longer run on demand (defaults fit CI on 2 cores)::

    LANES_LOAD_RATE=1000 LANES_LOAD_SECONDS=60 pytest tests/integration/test_lanes.py -s
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from lanes_support import (
    EXIT_REFUSED,
    Deployment,
    LaneWorker,
    LoadPublisher,
    Timeline,
    account,
    all_processed,
    discover,
    env_number,
    instance_row,
    lane_row,
    lane_states,
    other_deployment,
    processed_by,
    wait_until,
)
from worker_testkit import WorkerEnv

from {{ cookiecutter.__package_name }}.runtime.names import JOB_TYPE

pytestmark = pytest.mark.integration

RATE = env_number("LANES_LOAD_RATE", 300.0)  # jobs per second
LOAD_SECONDS = env_number("LANES_LOAD_SECONDS", 8.0)  # blue/green run
ROLLBACK_SECONDS = env_number("LANES_ROLLBACK_SECONDS", 6.0)  # each rollback run
WORK_SECONDS = env_number("LANES_WORK_SECONDS", 0.02)  # handler time per job
LOAD_TIMEOUT = 120 + 4 * max(LOAD_SECONDS, ROLLBACK_SECONDS)  # pytest-timeout for the load tests


def slots(share: float, instances: int = 1) -> str:
    """CONCURRENCY for ``instances`` workers that together handle ``share`` of the load rate."""
    return str(max(1, round(RATE * WORK_SECONDS * share / instances)))


@pytest.fixture
def dep(worker_env: WorkerEnv) -> Deployment:
    """This test's installation: the conftest's server and unique names; ``worker_env`` kills
    every worker process started through it and deletes the streams, however the test ends."""
    return Deployment(worker_env)


def retired(worker: LaneWorker, timeout: float) -> str:
    """Wait for ``worker`` to retire on its own: exit 0 with a ``stopped (retired: ...)`` line."""
    code = worker.wait(timeout)
    stopped = worker.stopped()
    assert code == 0, f"{worker.name} exited {code}:\n{worker.tail()}"
    assert stopped is not None, f"{worker.name} has no 'stopped' line:\n{worker.tail()}"
    message = str(stopped["msg"])
    assert message.startswith("stopped (retired:"), f"{worker.name}: {message}"
    return message


def terminate(worker: LaneWorker, timeout: float = 20.0) -> None:
    """SIGTERM and expect a clean drain (exit 0)."""
    worker.send(signal.SIGTERM)
    code = worker.wait(timeout)
    assert code == 0, f"{worker.name} exited {code} on SIGTERM:\n{worker.tail()}"


def no_job_after_stop(worker: LaneWorker) -> None:
    records = worker.records()
    stop = next(i for i, r in enumerate(records) if str(r.get("msg", "")).startswith("stopped ("))
    late = [r for r in records[stop:] if r.get("msg") == "job done"]
    assert not late, f"{worker.name} finished jobs after it stopped: {late[:3]}"


def route_history(dep: Deployment) -> tuple[str | None, list[tuple[str | None, str]]]:
    """``route --json``: the current lane and the (from, to) pairs, oldest first."""
    shown = json.loads(dep.cli_ok("route", "--json"))
    return shown["current"], [(c["previous"], c["lane"]) for c in shown["history"]]


# --------------------------------------------------------------------------------- 1


@pytest.mark.timeout(LOAD_TIMEOUT)
def test_blue_green_under_load(dep: Deployment) -> None:
    """v1 x2 under steady load; v2 starts, `route v2`; v1 drains its backlog and retires.

    Every published job is processed exactly once, and every job that reached the server after
    `route` returned was processed by v2.
    """
    # v1 handles 2/3 of the load rate (2 slots each by default), so it has a backlog to drain
    # after the switch; v2 has room to spare.
    tl = Timeline()
    v1 = [dep.start(n, "v1", CONCURRENCY=slots(2 / 3, 2)) for n in ("v1-a", "v1-b")]
    dep.wait_registered(*v1)
    tl.mark("v1 x2 registered")
    load = LoadPublisher(
        dep.url, dep.ingress, rate=RATE, work_seconds=WORK_SECONDS, max_duration=LOAD_TIMEOUT
    )
    with load:
        tl.mark("load started")
        wait_until(lambda: load.count >= RATE * LOAD_SECONDS * 0.25, 60, "a quarter of the load")
        v2 = dep.start("v2-a", "v2", CONCURRENCY=slots(4))
        dep.wait_registered(v2)
        tl.mark("v2 registered")
        assert lane_states(dep.status()) == {"v1": "current", "v2": "inactive"}
        switched = dep.route("v2")
        switched_at = tl.mark("route v2 returned")
        # the rest of the planned load, and at least a quarter of it on v2 however slow the CI
        load.finish_after(max(LOAD_SECONDS * 0.25, LOAD_SECONDS - (switched_at - load.started_at)))
        assert switched.returncode == 0, switched.stderr
        assert "new work -> v2 100% (was v1 100%" in switched.stdout
        at_switch = dep.status()
        load.join(load.remaining + 30)
        tl.mark("load done")
    workers = [*v1, v2]
    print(f"\n{load.summary()}")
    v1_backlog = lane_row(at_switch, "v1")
    print(f"v1 at the switch: {v1_backlog}")
    assert not load.errors, load.errors[:5]
    assert load.duplicates == 0

    for worker in v1:  # on their own: nobody signals them
        print(f"{worker.name}: {retired(worker, timeout=60)}")
        no_job_after_stop(worker)
    tl.mark("v1 x2 retired")
    wait_until(all_processed(load.published, workers), 60, "every published job processed")
    tl.mark("all processed")
    assert v2.alive, f"v2 must keep running:\n{v2.tail()}"
    terminate(v2)
    print(tl)

    acc = account(load.published, workers)
    print(acc.report())
    assert acc.published > 0
    assert not acc.lost
    assert not acc.duplicates
    assert not acc.unexpected
    after = load.ids_started_after(switched_at)
    lanes = processed_by(workers)
    on_v1 = sorted(i for i in after if lanes.get(i) != "v2")
    print(f"jobs published after the switch: {len(after)}, processed by v1: {len(on_v1)}")
    assert after, "no job was published after the switch"
    assert not on_v1, f"jobs that reached the server after `route v2` ran on v1: {on_v1[:5]}"
    assert all(acc.per_instance[w.name] > 0 for w in workers), acc.per_instance
    for worker in workers:  # each job-done line names its instance's lane and the stored subject
        for record in worker.done():
            assert record.get("lane") == worker.lane
            assert str(record.get("subject", "")).startswith(f"{dep.subject_root}.{JOB_TYPE}.g")
    report = dep.status()
    assert lane_states(report) == {"v1": "drained", "v2": "current"}
    assert route_history(dep) == ("v2", [(None, "v1"), ("v1", "v2")])


# --------------------------------------------------------------------------------- 2


@pytest.mark.timeout(LOAD_TIMEOUT)
@pytest.mark.parametrize("how", ["rollback", "take-backlog"])
def test_rollback_under_load(dep: Deployment, how: str) -> None:
    """Under load: v1 -> v2, then back to v1, with or without moving v2's waiting jobs.

    * ``rollback``: `route --rollback`; v2 finishes the jobs that landed on it, then retires.
    * ``take-backlog``: v2 runs with CONCURRENCY=1, so jobs pile up on its lane; `route v1
      --take-backlog` moves them back through the ingress, and v1 processes them.

    The v1 instances must be alive for the way back (route refuses a lane without live
    instances): they run with RETIRE_GRACE=600, so while v2 is current they drain and wait in
    state "retiring" (still live) instead of exiting, and become current again on the rollback.
    """
    tl = Timeline()
    v1 = [dep.start(n, "v1", CONCURRENCY=slots(4, 2), RETIRE_GRACE="600") for n in ("v1-a", "v1-b")]
    dep.wait_registered(*v1)  # first: the first instance to provision sets the initial route
    tl.mark("v1 x2 registered")
    # v2 falls behind the load: at 2/3 of the rate, or far behind (one slot) to leave jobs to move
    v2 = dep.start("v2-a", "v2", CONCURRENCY="1" if how == "take-backlog" else slots(2 / 3))
    load = LoadPublisher(
        dep.url, dep.ingress, rate=RATE, work_seconds=WORK_SECONDS, max_duration=LOAD_TIMEOUT
    )
    with load:
        dep.wait_registered(v2)
        tl.mark("v2 registered")
        wait_until(lambda: load.count >= RATE * ROLLBACK_SECONDS / 4, 60, "load on v1")
        assert dep.route("v2").returncode == 0
        on_v2_from = tl.mark("route v2 returned")
        count = load.count
        wait_until(lambda: load.count >= count + RATE * ROLLBACK_SECONDS / 4, 60, "load on v2")
        dep.wait_registered(*v1, state="retiring")

        def v2_backlog() -> int:  # v2's few slots fall behind the load: jobs wait on its lane
            row = lane_row(dep.status(), "v2")
            pending = int(row["pending"]) if row is not None else 0
            return pending if pending >= RATE / 4 else 0

        backlog = wait_until(v2_backlog, 30, "a backlog on lane v2", interval=0.2)
        on_v2_until = tl.mark(f"rolling back ({backlog} waiting on v2)")
        if how == "take-backlog":
            back = dep.route("v1", "--take-backlog", "--json")
            assert back.returncode == 0, back.stderr
            result = json.loads(back.stdout)
            split, previous = result["split"], result["previous"]
            assert (split["current"], previous["current"], result["changed"]) == ("v1", "v2", True)
            moved = int(result["moved"])
            print(f"\nmoved {moved} waiting job(s); {result['left_in_flight']} left in flight")
            assert moved > 0
        else:
            back = dep.route("--rollback")
            assert back.returncode == 0, back.stderr
            assert "new work -> v1 100% (was v2 100%" in back.stdout
            moved = 0
        back_at = tl.mark("back on v1")
        load.finish_after(ROLLBACK_SECONDS / 4)
        load.join(load.remaining + 30)
        tl.mark("load done")
    workers = [*v1, v2]
    print(f"\n{load.summary()}")
    assert not load.errors, load.errors[:5]
    assert load.duplicates == 0

    print(f"{v2.name}: {retired(v2, timeout=60)}")
    no_job_after_stop(v2)
    tl.mark("v2 retired")
    wait_until(all_processed(load.published, workers), 60, "every published job processed")
    tl.mark("all processed")
    assert all(w.alive for w in v1), "v1 is current again and must keep running"
    for worker in v1:
        assert worker.find("lane v1 gets new work again") is not None, worker.tail()
        terminate(worker)
    print(tl)

    acc = account(load.published, workers)
    print(acc.report())
    assert not acc.lost
    assert not acc.duplicates
    assert not acc.unexpected
    lanes = processed_by(workers)
    landed_on_v2 = load.ids_within(on_v2_from, on_v2_until)
    assert landed_on_v2
    moved_to_v1 = sorted(i for i in landed_on_v2 if lanes[i] == "v1")
    print(f"landed on v2: {len(landed_on_v2)}, of which processed by v1: {len(moved_to_v1)}")
    if how == "take-backlog":
        assert 0 < len(moved_to_v1) <= moved
    else:
        assert not moved_to_v1, "without --take-backlog v2 drains its own backlog"
    late = sorted(i for i in load.ids_started_after(back_at) if lanes[i] != "v1")
    assert not late, f"jobs published after the way back ran on v2: {late[:5]}"
    assert route_history(dep) == ("v1", [(None, "v1"), ("v1", "v2"), ("v2", "v1")])
    states = lane_states(dep.status())
    assert states == {"v1": "current", "v2": "drained"}


# --------------------------------------------------------------------------------- 3, 4


def test_current_lane_never_retires_when_idle(dep: Deployment) -> None:
    """An idle instance of the current lane has nothing in flight for many grace periods, and
    still must not retire: retirement needs the route to have moved away."""
    v1 = dep.start("v1", "v1", RETIRE_GRACE="0.5")
    dep.wait_registered(v1)
    watch_until = time.monotonic() + 3.0  # six grace periods
    rounds = 0
    while time.monotonic() < watch_until:
        rounds += 1
        report = dep.status()
        assert v1.alive, f"idle current-lane worker exited:\n{v1.tail()}"
        row = instance_row(report, v1.name)
        assert row is not None
        assert row["state"] == "running", row
        assert lane_states(report) == {"v1": "current"}
        time.sleep(0.3)
    assert rounds >= 3
    assert v1.find("retiring") is None, v1.tail()
    terminate(v1)
    stopped = v1.stopped()
    assert stopped is not None
    assert "retired" not in str(stopped["msg"])


def test_never_current_lane_does_not_retire(dep: Deployment) -> None:
    """v2 deployed ahead of any switch waits for the route: running, lane state inactive."""
    provisioned = dep.cli_ok("provision", LANE="v1")
    assert "route: new work -> v1 100%" in provisioned
    v2 = dep.start("v2", "v2", RETIRE_GRACE="0.5")
    dep.wait_registered(v2)
    watch_until = time.monotonic() + 3.0
    rounds = 0
    while time.monotonic() < watch_until:
        rounds += 1
        report = dep.status()
        assert v2.alive, f"a never-current lane retired:\n{v2.tail()}"
        row = instance_row(report, v2.name)
        assert row is not None
        assert row["state"] == "running", row
        assert lane_states(report) == {"v1": "current", "v2": "inactive"}
        time.sleep(0.3)
    assert rounds >= 3
    assert v2.find("retiring") is None, v2.tail()
    assert v2.find("lane v2 gets no new work") is not None, v2.tail()
    terminate(v2)


# --------------------------------------------------------------------------------- 5


def test_registry_and_route_guards(dep: Deployment) -> None:
    """Who is alive: status and micro discovery; and what `route` refuses or accepts."""
    ttl = 3.0  # wide enough to read a final heartbeat through the CLI before it expires
    dep.extra_env["INSTANCE_TTL"] = str(ttl)
    a, b, c = (dep.start(n, "v1") for n in ("v1-a", "v1-b", "v1-c"))
    report = dep.wait_registered(a, b, c)
    v1_row = lane_row(report, "v1")
    assert v1_row is not None
    assert (v1_row["state"], v1_row["instances"]) == ("current", 3)
    for w in (a, b, c):
        row = instance_row(report, w.name)
        assert row is not None
        assert (row["lane"], row["pid"]) == ("v1", w.pid)
    found = discover(dep.url)
    assert {n: found[n]["lane"] for n in (a.name, b.name, c.name) if n in found} == {
        a.name: "v1",
        b.name: "v1",
        c.name: "v1",
    }

    # kill -9: gone from discovery at once, from status once its heartbeat expires
    a.proc.send_signal(signal.SIGKILL)
    a.wait(5)
    killed_at = time.monotonic()
    wait_until(lambda: a.name not in discover(dep.url), 2.0, "killed instance out of $SRV.INFO")
    wait_until(
        lambda: instance_row(dep.status(), a.name) is None,
        ttl + 3.0,
        "killed instance out of status",
        interval=0.2,
    )
    gone_after = time.monotonic() - killed_at
    print(f"\nkill -9: out of status after {gone_after:.1f}s (INSTANCE_TTL {ttl:g}s)")

    # SIGTERM: a final "stopped" heartbeat, no longer discoverable, not counted as live
    terminate(b)
    report = dep.status()
    row = instance_row(report, b.name)
    assert row is not None, "the final heartbeat should outlive the process by INSTANCE_TTL"
    assert row["state"] == "stopped", row
    assert b.name not in discover(dep.url)
    v1_row = lane_row(report, "v1")
    assert v1_row is not None
    assert v1_row["instances"] == 1

    # route guards
    refused = dep.route("v2")
    assert refused.returncode == EXIT_REFUSED, refused.stdout + refused.stderr
    assert "no live instance of lane v2" in refused.stderr
    assert route_history(dep) == ("v1", [(None, "v1")])
    same = dep.route("v1")
    assert same.returncode == 0, same.stderr
    assert "nothing changed" in same.stdout
    assert route_history(dep) == ("v1", [(None, "v1")])
    forced = dep.route("v2", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "new work -> v2 100% (was v1 100%" in forced.stdout
    again = dep.route("v2", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["changed"] is False
    table = dep.cli_ok("route")
    assert table.splitlines()[0].startswith("new work -> v2 100% (generation ")
    assert any(line.split()[1:3] == ["v1", "v2"] for line in table.splitlines()[1:] if line.strip())
    assert route_history(dep) == ("v2", [(None, "v1"), ("v1", "v2")])
    # the forced switch routed v1 away, and v1 is idle: the last v1 instance retires
    print(f"{c.name}: {retired(c, timeout=15)}")


# --------------------------------------------------------------------------------- 6


def test_lane_states_step_by_step(dep: Deployment) -> None:
    """current/inactive -> (route with a v1 backlog) draining -> drained, as `status` shows it."""
    v1 = dep.start("v1", "v1", CONCURRENCY="1")
    dep.wait_registered(v1)
    v2 = dep.start("v2", "v2")
    report = dep.wait_registered(v2)
    assert report["current_lane"] == "v1"
    assert lane_states(report) == {"v1": "current", "v2": "inactive"}

    ids = [f"backlog-{dep.tag}-{n}" for n in range(30)]  # 4.5 s of work for one slot
    published = dep.cli_ok("publish", json.dumps([{"id": i, "work_seconds": 0.15} for i in ids]))
    assert "published 30 job(s)" in published
    routed = dep.route("v2")
    assert routed.returncode == 0, routed.stderr

    report = dep.status()
    assert report["current_lane"] == "v2"
    assert lane_states(report) == {"v1": "draining", "v2": "current"}
    v1_row = lane_row(report, "v1")
    assert v1_row is not None
    assert v1_row["pending"] + v1_row["unacked"] > 0, v1_row
    dep.wait_registered(v1, state="retiring", timeout=5)

    def drained() -> bool:
        return lane_states(dep.status()).get("v1") == "drained"

    wait_until(drained, 15, "lane v1 drained", interval=0.2)
    print(f"\n{v1.name}: {retired(v1, timeout=15)}")
    report = dep.status()
    assert lane_states(report) == {"v1": "drained", "v2": "current"}
    v1_row = lane_row(report, "v1")
    assert v1_row is not None
    assert (v1_row["pending"], v1_row["unacked"], v1_row["instances"]) == (0, 0, 0)
    acc = account(ids, [v1, v2])
    print(acc.report())
    assert acc.per_instance == {v1.name: 30, v2.name: 0}
    assert not acc.lost
    assert not acc.duplicates
    terminate(v2)


# --------------------------------------------------------------------------------- chassis bugs
# Regressions: route liveness is per stream; an instance that did not see its lane become
# current (paused, partitioned) still learns it from the route history.


def test_route_liveness_is_per_stream(dep: Deployment, tmp_path: Path) -> None:
    """`route v2` must refuse when *this* stream has no live v2 instance, even if another
    deployment of the same worker (another STREAM_NAME/SUBJECT_ROOT on the same NATS account,
    e.g. staging next to production) has one: its workers do not consume this stream."""
    with other_deployment(dep.url, tmp_path / "other") as other:
        elsewhere = other.start("v2", "v2")
        other.wait_registered(elsewhere)
        dep.cli_ok("provision", LANE="v1")
        dep.cli_ok("provision", LANE="v2")  # the v2 consumer exists; no v2 worker runs here
        refused = dep.route("v2")
        assert route_history(dep)[0] == "v1", "the route moved to a lane nobody consumes here"
        assert refused.returncode == EXIT_REFUSED, refused.stdout + refused.stderr


def test_paused_instance_still_retires_after_its_lane_was_current(dep: Deployment) -> None:
    """An instance that was paused (GC, SIGSTOP, a partition) while its lane became current and
    was routed away again must retire like its siblings once it resumes: its lane *was* current
    (the route history says so, and a restarted instance would retire)."""
    v1 = dep.start("v1", "v1", RETIRE_GRACE="30")  # stays live for the way back
    dep.wait_registered(v1)
    v2a, v2b = dep.start("v2-a", "v2"), dep.start("v2-b", "v2")
    dep.wait_registered(v2a, v2b)
    v2b.send(signal.SIGSTOP)
    try:
        assert dep.route("v2").returncode == 0
        assert dep.route("--rollback").returncode == 0
    finally:
        v2b.send(signal.SIGCONT)
    print(f"\n{v2a.name}: {retired(v2a, timeout=10)}")
    print(f"{v2b.name}: {retired(v2b, timeout=5)}")
    terminate(v1)
