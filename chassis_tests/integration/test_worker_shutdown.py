"""Stopping: SIGTERM drains, a drain timeout or a second signal hands work back, kill -9 loses
nothing (the job returns after ACK_WAIT), and handed-back jobs reach another consumer at once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import pytest
from nats.aio.msg import Msg
from worker_testkit import DURABLE, WorkerEnv, quick_connect

from {{ cookiecutter.__package_name }}.runtime import JobContext
from {{ cookiecutter.__package_name }}.runtime.consume.worker import Worker
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob as Job

pytestmark = pytest.mark.integration


def fetch_now(env: WorkerEnv, batch: int, timeout: float) -> tuple[list[Msg], float]:
    """Pull ``batch`` jobs on the worker's durable with a plain nats-py consumer; ack them.
    Returns the messages and how long the fetch took."""

    async def go() -> tuple[list[Msg], float]:
        nc = await quick_connect(env.url)
        try:
            js = nc.jetstream()
            psub = await js.pull_subscribe_bind(durable=DURABLE, stream=env.stream)
            started = time.monotonic()
            msgs = await psub.fetch(batch, timeout=timeout)
            took = time.monotonic() - started
            for msg in msgs:
                await msg.ack()
            await nc.flush()
            return msgs, took
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.timeout(60)
def test_sigterm_lets_a_running_job_finish(worker_env: WorkerEnv) -> None:
    env = worker_env
    worker = env.spawn(DRAIN_TIMEOUT=20)
    env.publish([{"id": "finishing-1", "work_seconds": 2}])
    env.wait_unacked(1)  # delivered and running
    worker.send_signal(signal.SIGTERM)
    assert worker.wait_exit(20) == 0

    assert worker.done_ids() == Counter({"finishing-1": 1})
    assert worker.done()[0]["attempt"] == 1
    messages = worker.messages()
    draining = [i for i, m in enumerate(messages) if m.startswith("draining (SIGTERM)")]
    done = [i for i, m in enumerate(messages) if m == "job done"]
    stopped = [i for i, m in enumerate(messages) if m.startswith("stopped (SIGTERM)")]
    assert len(draining) == len(done) == len(stopped) == 1, messages
    assert draining[0] < done[0] < stopped[0], "drain, then the job finishes, then stop"
    assert "1 running" in messages[draining[0]]
    assert "processed=1" in messages[stopped[0]]
    assert "handed_back=0" in messages[stopped[0]]
    env.wait_stored(0)  # acked once: gone from the work queue
    info = env.consumer_info()
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)


@pytest.mark.timeout(60)
def test_drain_timeout_hands_running_jobs_to_another_instance(worker_env: WorkerEnv) -> None:
    env = worker_env
    ids = ["handover-1", "handover-2"]
    work = 4.0  # long enough for B to start while A holds both jobs
    a = env.spawn(name="a", CONCURRENCY=2, DRAIN_TIMEOUT=0.5, ACK_WAIT=30)
    env.publish([{"id": i, "work_seconds": work} for i in ids])
    env.wait_unacked(2)  # both running on A
    b = env.spawn(name="b", CONCURRENCY=2, ACK_WAIT=30)

    signalled = time.monotonic()
    a.send_signal(signal.SIGTERM)
    assert a.wait_exit(15) == 0
    assert time.monotonic() - signalled < 5, "DRAIN_TIMEOUT=0.5 bounds the wait"
    assert a.with_msg("drain timed out: handing back 2 running job(s)")
    [stopped] = a.with_msg("stopped (SIGTERM)")
    assert "handed_back=2" in stopped["msg"]
    assert "processed=0" in stopped["msg"]
    assert a.done() == []

    b.wait_done(ids, timeout=20)
    took = time.monotonic() - signalled
    assert took < work + 6, f"handed back at once, not after ACK_WAIT=30 (took {took:.1f}s)"
    assert b.done_ids() == Counter(dict.fromkeys(ids, 1))
    assert {r["attempt"] for r in b.done()} == {2}
    env.wait_stored(0)


@pytest.mark.timeout(60)
def test_delivered_but_unstarted_jobs_are_handed_back_in_process(worker_env: WorkerEnv) -> None:
    """Embedded Worker, CONCURRENCY=4/FETCH_BATCH=4: the first job stops the worker; what was
    delivered but not started is nak'ed, and a plain consumer gets it at once (ACK_WAIT=30)."""
    env = worker_env
    env.provision(ACK_WAIT=30)
    ids = [f"unstarted-{i}" for i in range(4)]
    env.publish([{"id": i} for i in ids])
    settings = env.settings(concurrency=4, fetch_batch=4, ack_wait=30)
    started: list[str] = []

    async def run() -> Worker:
        worker: Worker | None = None

        async def handler(job: Job, ctx: JobContext[Any]) -> None:
            started.append(job.id)
            if len(started) == 1:
                assert worker is not None
                worker.stop("test: stop on the first job")  # synchronously, inside the job

        worker = Worker(settings, Job, handler, install_signal_handlers=False)
        code = await asyncio.wait_for(worker.run(), timeout=30)
        assert code == 0
        return worker

    worker = asyncio.run(run())
    handed_back = worker.counters.handed_back
    assert handed_back >= 1
    assert worker.counters.processed == len(started) == 4 - handed_back
    msgs, took = fetch_now(env, handed_back, timeout=10)
    assert took < 5, f"handed back at once, not after ACK_WAIT=30 (took {took:.1f}s)"
    got = sorted((m.headers or {}).get("Nats-Msg-Id", "") for m in msgs)
    assert got == sorted(set(ids) - set(started))
    assert all(m.metadata.num_delivered == 2 for m in msgs)
    env.wait_stored(0)


@pytest.mark.timeout(60)
def test_jobs_prefetched_for_busy_slots_are_handed_back_at_the_stop(worker_env: WorkerEnv) -> None:
    """CONCURRENCY=4 and quick jobs: once the handling time is known the worker asks for more
    than its free slots (the prefetch). With every slot held by a job, jobs wait in the inbox;
    a stop hands exactly those back (nak), a plain consumer gets them at once (ACK_WAIT=30), and
    the four running jobs still finish. Without the prefetch nothing would wait there."""
    env = worker_env
    env.provision(ACK_WAIT=30)
    env.publish([{"id": f"prefetch-{i}"} for i in range(200)])
    settings = env.settings(concurrency=4, fetch_batch=100, ack_wait=30)
    started: list[str] = []

    async def run() -> tuple[Worker, int]:
        gate = asyncio.Event()

        async def handler(job: Job, ctx: JobContext[Any]) -> None:
            started.append(job.id)
            if len(started) > 100:  # by now the handling time is sampled: the prefetch is on
                await gate.wait()

        worker = Worker(settings, Job, handler, install_signal_handlers=False)
        task = asyncio.create_task(worker.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not (len(started) >= 104 and worker._queued()):  # noqa: SLF001
            assert loop.time() < deadline, f"{len(started)} started, nothing waits in the inbox"
            await asyncio.sleep(0.01)
        waiting = worker._queued()  # noqa: SLF001 - deliveries beyond the 4 busy slots
        worker.stop("test: stop with every slot busy")
        gate.set()
        assert await asyncio.wait_for(task, timeout=30) == 0
        return worker, waiting

    worker, waiting = asyncio.run(run())
    handed_back = worker.counters.handed_back
    assert handed_back >= waiting >= 1
    assert worker.counters.processed == len(started)  # the four running jobs finished
    env.wait_stored(200 - len(started))  # the rest, handed back ones included, is still stored
    msgs, took = fetch_now(env, handed_back, timeout=10)
    assert took < 5, f"handed back at once, not after ACK_WAIT=30 (took {took:.1f}s)"
    assert len(msgs) == handed_back
    assert all(m.metadata.num_delivered == 2 for m in msgs)
    assert not {(m.headers or {}).get("Nats-Msg-Id") for m in msgs} & set(started)


@pytest.mark.timeout(60)
def test_second_sigterm_exits_130_and_hands_running_jobs_back(worker_env: WorkerEnv) -> None:
    env = worker_env
    worker = env.spawn(DRAIN_TIMEOUT=60, ACK_WAIT=30)
    env.publish([{"id": "cut-1", "work_seconds": 60}])
    env.wait_unacked(1)
    worker.send_signal(signal.SIGTERM)
    worker.wait_msg("draining (SIGTERM)")
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait_exit(15) == 130
    assert time.monotonic() - signalled < 5, "the second signal does not wait for the job"
    assert worker.with_msg("second stop request")
    assert worker.with_msg("drain cut short: handing back 1 running job(s)")
    [stopped] = worker.with_msg("stopped (SIGTERM)")
    assert "handed_back=1" in stopped["msg"]
    assert worker.done() == []

    [msg], took = fetch_now(env, 1, timeout=10)
    assert took < 5, f"handed back at once, not after ACK_WAIT=30 (took {took:.1f}s)"
    assert (msg.headers or {}).get("Nats-Msg-Id") == "cut-1"
    assert msg.metadata.num_delivered == 2
    env.wait_stored(0)


@pytest.mark.timeout(60)
def test_kill_9_mid_job_the_job_is_redelivered(worker_env: WorkerEnv) -> None:
    env = worker_env
    a = env.spawn(name="a", ACK_WAIT=2)
    env.publish([{"id": "orphan-1", "work_seconds": 2}])
    env.wait_unacked(1)
    a.kill()  # SIGKILL: no drain, no nak; only ACK_WAIT brings the job back
    assert a.proc is not None
    assert a.proc.returncode == -signal.SIGKILL
    assert a.done() == []

    b = env.spawn(name="b", ACK_WAIT=2)
    b.wait_done(["orphan-1"], timeout=20)
    [done] = b.done()
    assert done["attempt"] == 2
    env.wait_stored(0)
    assert b.stop() == 0
