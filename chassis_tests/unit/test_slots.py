"""The slots and the pull window, without NATS: the real ``Worker`` on an in-memory inbox.

* A burst of quick jobs is run by one slot in one step (one task wake-up, not one per job),
  as a callback subscription would run it.
* Jobs that wait run ``CONCURRENCY`` at a time, never more: a job that suspends hands what is
  still queued to parked slots.
* The refill threshold (how many slots must be free before a pull request goes out) is half the
  window for quick jobs and shrinks as the measured handling time grows, down to one slot.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from nats.aio.msg import Msg

from {{ cookiecutter.__package_name }}.runtime.consume.context import JobContext
from {{ cookiecutter.__package_name }}.runtime.consume.worker import Worker
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob as Job
from {{ cookiecutter.__package_name }}.runtime.settings import load_settings


class AckedMsg(Msg):
    """A delivery whose ack is counted instead of sent."""

    acked = 0

    async def ack(self) -> None:
        AckedMsg.acked += 1


def delivery(n: int) -> AckedMsg:
    return AckedMsg(
        _client=cast(Any, None),
        subject="root.v1.job",
        reply=f"$JS.ACK.STREAM.consumer.1.{n}.{n}.1700000000000000000.0",
        data=b'{"id": "job-%d"}' % n,
        headers=None,
    )


def make(handler: Any, **settings: Any) -> Worker:
    return Worker(
        load_settings(_env_file=None, **settings), Job, handler, install_signal_handlers=False
    )


async def until(condition: Any, steps: int = 10_000) -> None:
    """Let the loop run until ``condition()`` holds (bounded in loop steps, not in time)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def run_slots(worker: Worker, inbox: asyncio.Queue[Msg]) -> list[asyncio.Task[None]]:
    tasks = []
    for slot in worker._slots:  # noqa: SLF001 - the real slots, minus NATS
        slot.task = asyncio.create_task(worker._run_slot(slot, inbox))  # noqa: SLF001
        tasks.append(slot.task)
    concurrency = worker.settings.concurrency
    # Idle: one slot leads (waits on the inbox), the others are parked.
    await until(lambda: worker._leader and len(worker._parked) == concurrency - 1)  # noqa: SLF001
    return tasks


async def stop(worker: Worker, tasks: list[asyncio.Task[None]]) -> None:
    worker.stopping.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_a_burst_of_quick_jobs_runs_in_one_step_of_one_slot() -> None:
    ran_in: list[asyncio.Task[Any] | None] = []

    async def handler(job: Job, ctx: JobContext[Any]) -> None:
        ran_in.append(asyncio.current_task())

    async def go() -> None:
        AckedMsg.acked = 0
        worker = make(handler, concurrency=8)
        inbox: asyncio.Queue[Msg] = asyncio.Queue()
        tasks = await run_slots(worker, inbox)
        for n in range(1, 21):  # what one read of the socket delivers
            inbox.put_nowait(delivery(n))
        await until(lambda: worker.counters.processed == 20)
        assert AckedMsg.acked == 20
        assert len(set(ran_in)) == 1, "quick jobs of one burst woke more than one slot"
        await until(lambda: worker._leader)  # noqa: SLF001 - idle again, waiting on the inbox
        assert worker.in_flight == 0
        await stop(worker, tasks)

    asyncio.run(go())


def test_jobs_that_wait_run_concurrency_at_once_and_never_more() -> None:
    inside = 0
    most = 0

    async def go() -> None:
        AckedMsg.acked = 0
        release = asyncio.Event()

        async def handler(job: Job, ctx: JobContext[Any]) -> None:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

        worker = make(handler, concurrency=8)
        inbox: asyncio.Queue[Msg] = asyncio.Queue()
        tasks = await run_slots(worker, inbox)
        for n in range(1, 21):
            inbox.put_nowait(delivery(n))
        await until(lambda: inside == 8)  # every slot took a job although the first one waited
        assert inbox.qsize() == 12, "a slot took a job while all slots were busy"
        assert worker.in_flight == 8
        release.set()
        await until(lambda: worker.counters.processed == 20)
        assert most == 8
        assert AckedMsg.acked == 20
        await stop(worker, tasks)

    asyncio.run(go())


async def _noop(job: Job, ctx: JobContext[Any]) -> None:
    return None


def test_the_refill_threshold_follows_the_handling_time() -> None:
    async def go() -> None:
        worker = make(_noop, concurrency=100, fetch_batch=100)
        assert worker._refill == 50  # noqa: SLF001 - half the window before anything is known
        for _ in range(40):
            worker._adapt_refill(0.00002)  # noqa: SLF001 - quick jobs: 20 µs
        assert worker._refill == 50  # noqa: SLF001 - few, large pull requests
        for _ in range(40):
            worker._adapt_refill(0.010)  # noqa: SLF001 - jobs waiting 10 ms on I/O
        assert 1 <= worker._refill <= 5  # noqa: SLF001
        for _ in range(40):
            worker._adapt_refill(0.5)  # noqa: SLF001 - slow jobs: one free slot is enough
        assert worker._refill == 1  # noqa: SLF001
        for _ in range(60):
            worker._adapt_refill(0.00002)  # noqa: SLF001 - quick again
        assert worker._refill == 50  # noqa: SLF001

        small = make(_noop, concurrency=100, fetch_batch=10)
        small._adapt_refill(0.00002)  # noqa: SLF001
        assert small._refill == 5  # noqa: SLF001 - never above half of min(CONCURRENCY, FETCH_BATCH)

    asyncio.run(go())


def test_the_prefetch_covers_a_round_trip_of_quick_jobs_and_is_off_for_slow_ones() -> None:
    """The window (slots + prefetch) bounds what a worker holds: slow jobs never wait behind
    a busy slot, quick ones find their next job waiting when a slot frees up."""

    async def go() -> None:
        worker = make(_noop, concurrency=10, fetch_batch=100)
        assert worker._window == 10  # noqa: SLF001 - nothing known yet: slots only
        for _ in range(40):
            worker._adapt_refill(0.010)  # noqa: SLF001 - 10 ms jobs
        # the refill (1) plus the jobs 10 slots finish in PULL_LEAD (3 ms): 3 -> 4 in all
        assert worker._window == 10 + worker._refill + 3  # noqa: SLF001
        for _ in range(40):
            worker._adapt_refill(0.00002)  # noqa: SLF001 - quick jobs
        assert worker._window == 20  # noqa: SLF001 - capped at CONCURRENCY
        for _ in range(40):
            worker._adapt_refill(0.3)  # noqa: SLF001 - at PREFETCH_BELOW or slower: none
        assert worker._window == 10  # noqa: SLF001

    asyncio.run(go())
