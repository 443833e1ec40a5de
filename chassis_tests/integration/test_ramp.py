"""Ramping a new version by percentage: sticky by job key, new work only, rollback always works.

Real nats-server, real worker processes, driven only through the worker's CLI (``route``,
``status``); keyed and unkeyed producers publish to the ingress the whole time.

Load knobs for a longer run on demand (defaults fit CI on 2 cores)::

    LANES_LOAD_RATE=1000 RAMP_STEP_SECONDS=10 pytest tests/chassis/integration/test_ramp.py -s
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import nats
import pytest
from lanes_support import (
    Deployment,
    LaneWorker,
    LoadPublisher,
    Timeline,
    account,
    all_processed,
    env_number,
    lane_row,
    wait_until,
)
from worker_testkit import WorkerEnv

from {{ cookiecutter.__package_name }}.runtime.evolve.split import Split, bucket_of

pytestmark = pytest.mark.integration

RATE = env_number("LANES_LOAD_RATE", 300.0)  # jobs per second
STEP_SECONDS = env_number("RAMP_STEP_SECONDS", 2.0)  # load at each ramp step
WORK_SECONDS = env_number("LANES_WORK_SECONDS", 0.005)
TIMEOUT = 240 + 12 * STEP_SECONDS


@pytest.fixture
def dep(worker_env: WorkerEnv) -> Deployment:
    return Deployment(worker_env)


def route_json(dep: Deployment) -> dict[str, object]:
    shown: dict[str, object] = json.loads(dep.cli_ok("route", "--json"))
    return shown


def lane_for(splits: dict[int, Split], subject: str, root: str) -> str:
    """The lane a stored subject's generation and bucket route it to."""
    tokens = subject.split(".")
    gen = int(tokens[2].removeprefix("g"))
    keyed = len(tokens) == 9
    bucket = int(tokens[4]) if keyed else int(tokens[5]) + 10 * int(tokens[6])
    if keyed:  # the server's partition must be the published formula's
        assert bucket == bucket_of(f"{root}.jobs.{tokens[7]}.{tokens[8]}"), subject
    return splits[gen].lane_of_bucket(bucket)


def retired(worker: LaneWorker, timeout: float) -> None:
    code = worker.wait(timeout)
    stopped = worker.stopped()
    assert code == 0, f"{worker.name} exited {code}:\n{worker.tail()}"
    assert stopped is not None
    assert str(stopped["msg"]).startswith("stopped (retired:"), stopped


@pytest.mark.timeout(TIMEOUT)
def test_a_live_ramp_loses_nothing_and_routes_every_job_by_its_split(dep: Deployment) -> None:
    """0 -> 1 -> 10 -> 50 -> 100 % under load, 2 instances per lane, keyed and unkeyed jobs."""
    tl = Timeline()
    v1 = [dep.start(n, "v1", CONCURRENCY="8") for n in ("v1-a", "v1-b")]
    dep.wait_registered(*v1)
    v2 = [dep.start(n, "v2", CONCURRENCY="8") for n in ("v2-a", "v2-b")]
    dep.wait_registered(*v2)
    splits: dict[int, Split] = {1: Split(current="v1")}
    keyed = LoadPublisher(
        dep.url, dep.ingress, rate=RATE * 0.8, work_seconds=WORK_SECONDS, keyed=True,
        prefix="k", max_duration=TIMEOUT,
    )  # fmt: skip
    unkeyed = LoadPublisher(
        dep.url, dep.ingress, rate=RATE * 0.2, work_seconds=WORK_SECONDS, prefix="u",
        max_duration=TIMEOUT,
    )  # fmt: skip
    with keyed, unkeyed:
        for percent in (1, 10, 50, 100):
            before = keyed.count
            wait_until(
                lambda b=before: keyed.count >= b + RATE * 0.8 * STEP_SECONDS,  # type: ignore[misc]
                60,
                "load at this step",
            )
            args = ("route", "v2") if percent == 100 else ("route", "v2", "--percent", str(percent))
            done = dep.cli(*args)
            assert done.returncode == 0, done.stdout + done.stderr
            assert done.stdout.count("\n") == 1, done.stdout  # one line, once
            assert done.stderr == "", done.stderr  # no log lines from a one-shot command
            shown = route_json(dep)
            gen = int(str(shown["generation"]))
            splits[gen] = (
                Split(current="v2")
                if percent == 100
                else Split(current="v1", ramping="v2", percent=percent)
            )
            tl.mark(f"route v2 {percent}% (generation {gen})")
        keyed.finish_after(STEP_SECONDS)
        unkeyed.finish_after(STEP_SECONDS)
        keyed.join(keyed.remaining + 30)
        unkeyed.join(unkeyed.remaining + 30)
    for worker in v1:  # the old lane retires by itself once its backlog is done
        retired(worker, 90)
    tl.mark("v1 x2 retired")
    published = {**keyed.published, **unkeyed.published}
    workers = [*v1, *v2]
    wait_until(all_processed(published, workers), 60, "every published job processed")
    for worker in v2:
        worker.send(signal.SIGTERM)
        assert worker.wait(20) == 0, worker.tail()
    print(f"\n{keyed.summary()}\n{unkeyed.summary()}\n{tl}")
    acc = account(published, workers)
    print(acc.report())
    assert not keyed.errors
    assert not unkeyed.errors
    assert not acc.lost
    assert not acc.duplicates
    assert not acc.unexpected
    wrong = [
        (w.lane, r.get("subject"))
        for w in workers
        for r in w.done()
        if lane_for(splits, str(r.get("subject")), dep.subject_root) != w.lane
    ]
    assert not wrong, f"jobs handled on a lane they were not routed to: {wrong[:5]}"
    on_v2_at = {
        lane_for(splits, str(r.get("subject")), dep.subject_root) for w in v2 for r in w.done()
    }
    assert on_v2_at == {"v2"}


async def _publish_keys(url: str, subject: str, keys: list[str]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for start in range(0, len(keys), 500):
        await asyncio.gather(
            *(js.publish(f"{subject}.{k}", b"{}") for k in keys[start : start + 500])
        )
    await nc.close()


@pytest.mark.timeout(120)
def test_ten_thousand_keys_split_by_the_percentage_and_stay_put(dep: Deployment) -> None:
    """The server's own count: each lane consumer's pending jobs after 10k distinct keys."""
    dep.cli_ok("provision", LANE="v1")  # the first lane provisioned gets all new work
    dep.cli_ok("provision", LANE="v2")
    keys = [uuid.uuid4().hex for _ in range(10_000)]
    held = {"v1": 0, "v2": 0}
    for percent in (10, 50):
        dep.cli_ok("route", "v2", "--percent", str(percent), "--force")
        asyncio.run(_publish_keys(dep.url, dep.ingress, keys))
        rows = {lane: lane_row(dep.status(), lane) or {} for lane in held}
        assert rows["v2"]["percent"] == percent
        added = {lane: rows[lane]["pending"] - held[lane] for lane in held}
        held = {lane: rows[lane]["pending"] for lane in held}
        share = 100 * added["v2"] / (added["v1"] + added["v2"])
        print(f"{percent}%: v2 got {share:.2f}% of {sum(added.values())} new jobs")
        assert abs(share - percent) <= 2
        # the next round adds the same keys again: only the new split moves new work
        dep.cli_ok("route", "v1", "--force")
    explained = dep.cli_ok("route", "explain", keys[0], "--json")
    assert json.loads(explained)["lane"] == "v1"


@pytest.mark.timeout(TIMEOUT)
def test_the_runbook_rollback_order_works_with_a_short_grace(dep: Deployment) -> None:
    """RETIRE_GRACE=2: v1 retires after `route v2`; the operator starts v1 again, and then
    `route --rollback --take-backlog` works: the restarted v1 waits for the route."""
    grace = {"RETIRE_GRACE": "2"}
    v1 = dep.start("v1-a", "v1", **grace)
    dep.wait_registered(v1)
    v2 = dep.start("v2-a", "v2", CONCURRENCY="2", **grace)
    dep.wait_registered(v2)
    load = LoadPublisher(
        dep.url, dep.ingress, rate=RATE / 3, work_seconds=0.02, keyed=True, max_duration=TIMEOUT
    )
    with load:
        wait_until(lambda: load.count >= RATE / 3, 60, "load")
        done = dep.route("v2")
        assert done.returncode == 0, done.stderr
        retired(v1, 60)  # routed away while it ran: it retires as before
        again = dep.start("v1-b", "v1", **grace)
        dep.wait_registered(again)
        waiting = wait_until(
            lambda: again.find("lane v1 gets no new work"), 30, "v1-b decides to wait"
        )
        assert "waiting for the route" in str(waiting["msg"])
        back = dep.route("--rollback", "--take-backlog")
        assert back.returncode == 0, back.stdout + back.stderr
        assert "new work -> v1 100%" in back.stdout
        load.finish_after(2)
        load.join(load.remaining + 30)
    retired(v2, 90)  # v2 was routed away while it ran
    workers = [v1, again, v2]
    wait_until(all_processed(load.published, workers), 60, "every published job processed")
    assert again.alive, again.tail()
    again.send(signal.SIGTERM)
    assert again.wait(20) == 0
    acc = account(load.published, workers)
    print(acc.report())
    assert not acc.lost
    assert not acc.duplicates
