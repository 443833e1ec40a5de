"""Gated rollout: steps, gates, automatic rollback, a controller that dies and is resumed.

Real nats-server, real worker processes (``--app demo``), driven only through the worker's CLI
(``rollout``, ``route``, ``status``, ``dlq``, ``provision``). "Bad versions" are the demo app with
its test-only knobs (``runtime/operate/demo.py``): ``DEMO_FAIL_PERCENT`` fails about that share
of jobs on every try, ``DEMO_JOB_VARIANT=required-field`` adds a required field to the model.
Steps last ``INTERVAL`` seconds (short on purpose); every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lanes_support import (
    PACKAGE,
    Deployment,
    LaneWorker,
    LoadPublisher,
    Timeline,
    account,
    all_processed,
    env_number,
    wait_until,
)
from worker_testkit import WorkerEnv

from {{ cookiecutter.__package_name }}.runtime.names import WORKER_NAME

pytestmark = pytest.mark.integration

RATE = env_number("ROLLOUT_LOAD_RATE", 150.0)  # jobs per second
INTERVAL = env_number("ROLLOUT_INTERVAL", 2.0)  # seconds per step
WORK_SECONDS = 0.005
EXIT_REFUSED = 75
EXIT_ROLLED_BACK = 79


@pytest.fixture
def dep(worker_env: WorkerEnv) -> Deployment:
    return Deployment(worker_env)


class Controller:
    """``rollout ...`` as a background process (so a test can kill -9 it)."""

    def __init__(self, dep: Deployment, name: str, *args: str) -> None:
        self.log_path = Path(dep.env.workdir) / f"{name}.log"
        self.out_path = Path(dep.env.workdir) / f"{name}.out"
        with self.log_path.open("wb") as err, self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", PACKAGE, "--app", "demo", "rollout", *args],
                env=dep.env.environ(**dep.overrides()),
                cwd=dep.env.workdir,
                stdout=out,
                stderr=err,
            )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(
                f"controller still running after {timeout:g}s:\n{self.tail()}"
            ) from None

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") + self.out_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def last_error_line(self) -> str:
        lines = [
            line
            for line in self.log_path.read_text().splitlines()
            if line.startswith(f"{WORKER_NAME}: error:")
        ]
        return lines[-1] if lines else ""

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def rollout_state(dep: Deployment) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(dep.cli_ok("rollout", "--status", "--json")) or {}
    return shown


def route_history(dep: Deployment) -> list[dict[str, Any]]:
    shown = json.loads(dep.cli_ok("route", "--json"))
    history: list[dict[str, Any]] = shown["history"]
    return history


def v2_shares(dep: Deployment) -> list[int]:
    """The percentages lane v2 was given, in order, by every route change."""
    return [int(c["percent"]) for c in route_history(dep) if c["lane"] == "v2"]


def dead_letters_of(dep: Deployment, lane: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(dep.cli_ok("dlq", "list", "--json"))
    return [e for e in entries if e.get("lane") == lane]


def smoke_file(dep: Deployment, count: int = 3) -> str:
    path = Path(dep.env.workdir) / "smoke.jsonl"
    path.write_text("".join(json.dumps({"id": f"smoke-{n}"}) + "\n" for n in range(count)))
    return str(path)


def retired(worker: LaneWorker, timeout: float) -> None:
    code = worker.wait(timeout)
    stopped = worker.stopped()
    assert code == 0, f"{worker.name} exited {code}:\n{worker.tail()}"
    assert stopped is not None
    assert str(stopped["msg"]).startswith("stopped (retired:"), stopped


def load(dep: Deployment, rate: float = RATE) -> LoadPublisher:
    return LoadPublisher(
        dep.url, dep.ingress, rate=rate, work_seconds=WORK_SECONDS, keyed=True, max_duration=150
    )


@pytest.mark.timeout(150)
def test_a_good_version_is_promoted_through_every_step_under_load(dep: Deployment) -> None:
    tl = Timeline()
    v1 = dep.start("v1-a", "v1", CONCURRENCY="8")
    dep.wait_registered(v1)  # first: the first instance's lane becomes the current one
    v2 = dep.start("v2-a", "v2", CONCURRENCY="8")
    dep.wait_registered(v2)
    with load(dep) as publisher:
        wait_until(lambda: publisher.count >= RATE, 30, "load running")
        tl.mark("load")
        ctl = Controller(
            dep, "rollout", "v2", "--steps", "10,50,100", "--interval", str(INTERVAL),
            "--min-jobs", "10", "--smoke", smoke_file(dep),
        )  # fmt: skip
        assert ctl.wait(90) == 0, ctl.tail()
        tl.mark("promoted")
        assert ctl.stdout.strip().startswith("promoted lane v2"), ctl.stdout
        publisher.finish_after(INTERVAL)
        publisher.join(publisher.remaining + 30)
    retired(v1, 60)  # routed away while it ran: it drains and retires by itself
    workers = [v1, v2]
    wait_until(all_processed(publisher.published, workers), 60, "every published job processed")
    state = rollout_state(dep)
    verdicts = [(d["verdict"], d.get("percent")) for d in state["decisions"]]
    print(f"\n{publisher.summary()}\n{tl}\n{verdicts}")
    assert state["phase"] == "promoted"
    assert ("Successful", None) in verdicts  # the smoke gate
    for percent in (10, 50):
        assert ("Applied", percent) in verdicts
        assert ("Successful", percent) in verdicts
    assert v2_shares(dep) == [10, 50, 100]
    smoke_done = [r for r in v2.done() if str(r.get("subject")).endswith(".parked.v2")]
    assert len(smoke_done) == 3, smoke_done  # through v2's smoke inbox, before any step
    acc = account(publisher.published, workers)
    print(acc.report())
    assert not publisher.errors
    assert not acc.lost
    assert not acc.duplicates
    v2.send(signal.SIGTERM)
    assert v2.wait(20) == 0


@pytest.mark.timeout(150)
def test_a_version_failing_30_percent_is_rolled_back_and_loses_and_dead_letters_nothing(
    dep: Deployment,
) -> None:
    v1 = dep.start("v1-a", "v1", CONCURRENCY="8")
    dep.wait_registered(v1)
    # BACKOFF=2: a failed job waits on v2 between tries, as with the default backoff, so it
    # would reach the DLQ only after MAX_DELIVER tries: the rollback takes it back first.
    v2 = dep.start("v2-a", "v2", CONCURRENCY="8", DEMO_FAIL_PERCENT="30", BACKOFF="2")
    dep.wait_registered(v2)
    with load(dep) as publisher:
        wait_until(lambda: publisher.count >= RATE, 30, "load running")
        ctl = Controller(
            dep, "rollout", "v2", "--steps", "10,50,100", "--interval", str(INTERVAL),
            "--min-jobs", "10",
        )  # fmt: skip
        code = ctl.wait(90)
        publisher.finish_after(INTERVAL)
        publisher.join(publisher.remaining + 30)
    assert code == EXIT_ROLLED_BACK, ctl.tail()
    assert ctl.last_error_line.startswith(f"{WORKER_NAME}: error: rolled lane v2 back to v1")
    assert "failure rate" in ctl.last_error_line
    retired(v2, 60)  # asked to retire by the rollback
    workers = [v1, v2]
    wait_until(all_processed(publisher.published, workers), 90, "every published job processed")
    state = rollout_state(dep)
    failed = [d for d in state["decisions"] if d["verdict"] == "Failed"]
    print(f"\n{publisher.summary()}\n{failed}\n{state['decisions'][-1]}")
    assert state["phase"] == "rolled_back"
    # Judged at the first step, within two intervals of it, on the figures recorded with it.
    assert failed
    assert failed[0]["percent"] == 10
    assert failed[0]["window_s"] <= 2 * INTERVAL
    assert failed[0]["new"]["failed"] > 0
    assert v2_shares(dep) == [10]
    last = route_history(dep)[-1]
    assert (last["lane"], last["percent"]) == ("v1", 100)
    assert last["note"] == "rollout rollback of v2"
    assert dead_letters_of(dep, "v2") == []
    acc = account(publisher.published, workers)
    print(acc.report())
    assert not publisher.errors
    assert not acc.lost
    assert not acc.duplicates
    v1.send(signal.SIGTERM)
    assert v1.wait(20) == 0


@pytest.mark.timeout(120)
def test_a_version_that_crashes_at_start_fails_the_smoke_gate_and_gets_no_traffic(
    dep: Deployment,
) -> None:
    v1 = dep.start("v1-a", "v1")
    dep.wait_registered(v1)
    dep.cli_ok("provision", LANE="v2")  # v2's consumer exists, as after its first start
    crashing = dep.start("v2-a", "v2", MAX_DELIVER="0")  # a setting it refuses: exit 78
    assert crashing.wait(30) == 78, crashing.tail()
    with load(dep, rate=RATE / 2) as publisher:
        wait_until(lambda: publisher.count >= RATE / 4, 30, "load running")
        ctl = Controller(
            dep, "rollout", "v2", "--interval", str(INTERVAL), "--smoke", smoke_file(dep),
            "--smoke-timeout", "3",
        )  # fmt: skip
        code = ctl.wait(60)
        publisher.finish_after(1)
        publisher.join(publisher.remaining + 30)
    assert code == EXIT_ROLLED_BACK, ctl.tail()
    line = ctl.last_error_line
    assert "smoke: 3 of 3 smoke job(s) not done by lane v2" in line, line
    assert "no live instance of v2" in line, line
    assert v2_shares(dep) == []  # never routed any real work
    wait_until(all_processed(publisher.published, [v1]), 60, "every job processed by v1")
    report = dep.status()
    assert report["messages"] == 0  # the smoke jobs were taken back too
    assert report["rollout"]["phase"] == "rolled_back"
    v1.send(signal.SIGTERM)
    assert v1.wait(20) == 0


@pytest.mark.timeout(90)
def test_a_version_whose_model_adds_a_required_field_is_refused_by_the_schema_gate(
    dep: Deployment,
) -> None:
    v1 = dep.start("v1-a", "v1")
    dep.wait_registered(v1)
    v2 = dep.start("v2-a", "v2", DEMO_JOB_VARIANT="required-field")
    dep.wait_registered(v2)
    for args in (("route", "v2", "--percent", "10"), ("rollout", "v2", "--interval", "1")):
        done = dep.cli(*args)
        assert done.returncode == EXIT_REFUSED, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "lane v2 breaks lane v1's job contract: priority: new required field" in lines[0]
        assert "--force" in lines[0]
    assert v2_shares(dep) == []
    # Its instances publish the contract the gate compared.
    contract = json.loads(dep.cli_ok("route", "--json"))  # the route is untouched
    assert contract["current"] == "v1"
    assert contract["ramping"] is None
    for worker in (v1, v2):
        worker.send(signal.SIGTERM)
        assert worker.wait(20) == 0


@pytest.mark.timeout(150)
def test_a_controller_killed_mid_rollout_is_resumed_without_applying_a_step_twice(
    dep: Deployment,
) -> None:
    v1 = dep.start("v1-a", "v1", CONCURRENCY="8")
    dep.wait_registered(v1)  # first: the first instance's lane becomes the current one
    v2 = dep.start("v2-a", "v2", CONCURRENCY="8")
    dep.wait_registered(v2)
    args = (
        "v2", "--steps", "10,50,100", "--interval", str(INTERVAL * 2), "--min-jobs", "10",
        "--lease", "2",
    )  # fmt: skip
    with load(dep) as publisher:
        wait_until(lambda: publisher.count >= RATE, 30, "load running")
        first = Controller(dep, "rollout-1", *args)
        wait_until(
            lambda: rollout_state(dep).get("percent") == 50,
            60,
            "the rollout at its second step",
            interval=0.3,
        )
        first.kill9()
        second = Controller(dep, "rollout-2", *args)
        assert second.wait(90) == 0, second.tail()
        publisher.finish_after(INTERVAL)
        publisher.join(publisher.remaining + 30)
    retired(v1, 60)
    workers = [v1, v2]
    wait_until(all_processed(publisher.published, workers), 60, "every published job processed")
    state = rollout_state(dep)
    verdicts = [d["verdict"] for d in state["decisions"]]
    print(f"\n{publisher.summary()}\n{verdicts}")
    assert state["phase"] == "promoted"
    assert "Resumed" in verdicts
    assert v2_shares(dep) == [10, 50, 100]  # each step applied exactly once
    assert [d.get("percent") for d in state["decisions"] if d["verdict"] == "Applied"] == [10, 50]
    acc = account(publisher.published, workers)
    print(acc.report())
    assert not acc.lost
    assert not acc.duplicates
    v2.send(signal.SIGTERM)
    assert v2.wait(20) == 0


@pytest.mark.timeout(120)
def test_rollout_abort_rolls_back_by_hand(dep: Deployment) -> None:
    v1 = dep.start("v1-a", "v1")
    dep.wait_registered(v1)
    v2 = dep.start("v2-a", "v2")
    dep.wait_registered(v2)
    ctl = Controller(dep, "rollout", "v2", "--steps", "50,100", "--interval", "600")
    wait_until(lambda: rollout_state(dep).get("percent") == 50, 60, "the first step", interval=0.3)
    done = dep.cli("rollout", "--abort", "--reason", "seen enough")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("aborted: "), done.stdout
    assert ctl.wait(60) == EXIT_ROLLED_BACK, ctl.tail()
    assert "aborted by hand: seen enough" in ctl.last_error_line
    assert json.loads(dep.cli_ok("route", "--json"))["current"] == "v1"
    assert v2_shares(dep) == [50]
    retired(v2, 60)  # asked to retire by the rollback
    again = dep.cli("rollout", "--abort")
    assert again.returncode == 65, again.stderr  # nothing left to abort
    v1.send(signal.SIGTERM)
    assert v1.wait(20) == 0
