"""The Worker embedded in-process with handlers of the test's own: the outcomes a handler can
choose (Reject, Retry with the configured backoff, any other exception) and what each costs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from worker_testkit import WorkerEnv

from {{ cookiecutter.__package_name }}.runtime import JobContext, Reject, Retry
from {{ cookiecutter.__package_name }}.runtime.consume.worker import Counters, Worker
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob as Job

pytestmark = pytest.mark.integration


async def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` on the event loop until true; fail after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {seconds:g}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
def test_reject_retry_and_unexpected_errors(worker_env: WorkerEnv) -> None:
    env = worker_env
    env.provision(MAX_DELIVER=3)
    env.publish(
        [
            {"id": "reject-1", "item": "reject"},
            {"id": "boom-1", "item": "boom"},
            {"id": "again-1", "item": "retry-default"},
            {"id": "fine-1", "item": "fine"},
        ]
    )
    settings = env.settings(max_deliver=3, backoff=[0.1, 0.2], concurrency=4, fetch_batch=4)
    attempts: dict[str, list[int]] = {}
    handled: list[str] = []

    async def handler(job: Job, ctx: JobContext[Any]) -> None:
        attempts.setdefault(job.id, []).append(ctx.attempt)
        assert ctx.msg_id == job.id
        if job.item == "reject":
            raise Reject("bad coupon")
        if job.item == "boom":
            raise ValueError(f"boom on attempt {ctx.attempt}")
        if job.item == "retry-default" and ctx.attempt < 3:
            raise Retry()  # no delay given: the configured BACKOFF applies
        handled.append(job.id)

    async def scenario() -> Counters:
        worker = Worker(settings, Job, handler, install_signal_handlers=False)
        running = asyncio.create_task(worker.run())
        try:
            await until(lambda: len(handled) == 2, 20, "two jobs handled")
            await until(lambda: len(attempts.get("boom-1", [])) == 3, 20, "three tries of boom-1")
            await until(lambda: worker.counters.dead_lettered == 2, 10, "two dead letters")
        finally:
            worker.stop("test over")
            assert await asyncio.wait_for(running, timeout=20) == 0
        return worker.counters

    counters = asyncio.run(scenario())
    assert attempts == {
        "reject-1": [1],  # Reject: no retries at all
        "boom-1": [1, 2, 3],  # any exception: retried up to MAX_DELIVER
        "again-1": [1, 2, 3],
        "fine-1": [1],
    }
    assert sorted(handled) == ["again-1", "fine-1"]
    assert counters.processed == 2
    assert counters.dead_lettered == 2
    assert counters.failed == 3  # the ValueErrors; Retry and Reject are not failures
    assert counters.retried == 4  # boom-1 twice, again-1 twice

    entries = {(e.headers or {})["Dlq-Msg-Id"]: e.headers or {} for e in env.dlq_entries()}
    assert set(entries) == {"reject-1", "boom-1"}
    assert entries["reject-1"]["Dlq-Reason"] == "rejected"
    assert entries["reject-1"]["Dlq-Deliveries"] == "1"
    assert entries["reject-1"]["Dlq-Error-Type"] == "Reject"
    assert entries["reject-1"]["Dlq-Error"] == "bad coupon"
    assert entries["boom-1"]["Dlq-Reason"] == "exhausted"
    assert entries["boom-1"]["Dlq-Deliveries"] == "3"
    assert entries["boom-1"]["Dlq-Error-Type"] == "ValueError"
    assert entries["boom-1"]["Dlq-Error"] == "boom on attempt 3"
    env.wait_stored(0)
