"""The job model and the handler, without NATS: a fake delivery gives the handler its attempt."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest
from nats.aio.msg import Msg
from pydantic import ValidationError

from {{ cookiecutter.__package_name }}.runtime import JobContext, Retry
from {{ cookiecutter.__package_name }}.runtime.errors import describe
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob as Job
from {{ cookiecutter.__package_name }}.runtime.operate.demo import handle


def delivery(attempt: int, *, stream_seq: int = 7, msg_id: str | None = "job-1") -> JobContext[Any]:
    """A JetStream delivery as the chassis hands it to the handler (reply subject = metadata)."""
    reply = f"$JS.ACK.STREAM.consumer.{attempt}.{stream_seq}.{stream_seq}.1700000000000000000.0"
    msg = Msg(
        _client=cast(Any, None),
        subject="root.v1.job",
        reply=reply,
        data=b"{}",
        headers={"Nats-Msg-Id": msg_id} if msg_id else None,
    )
    return JobContext(msg)


def test_minimal_job_gets_defaults() -> None:
    job = Job.model_validate_json(b'{"id": "A-1"}')
    assert job.id == "A-1"
    assert job.quantity == 1
    assert job.work_seconds == 0.0
    assert job.fail_times == 0


def test_job_round_trips_through_json() -> None:
    job = Job(id="A-2", item="book", quantity=3, work_seconds=0.5, fail_times=2)
    assert Job.model_validate_json(job.model_dump_json()) == job


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"{}", "id"),
        (b'{"id": ""}', "id"),
        (b'{"id": "x", "quantity": 0}', "quantity"),
        (b'{"id": "x", "work_seconds": -1}', "work_seconds"),
        (b'{"id": "x", "fail_times": -1}', "fail_times"),
        (b'{"id": "x", "surprise": true}', "surprise"),  # extra="forbid"
        (b'{"id": "x", "quantity": "many"}', "quantity"),
    ],
)
def test_invalid_jobs_are_rejected_naming_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Job.model_validate_json(payload)
    assert field in describe(caught.value)
    assert "\n" not in describe(caught.value)  # one line: it goes into a DLQ header


@pytest.mark.parametrize("payload", [b"not json", b'{"id": 42', b"", b"[]", b"\xff\xfe"])
def test_malformed_payloads_are_validation_errors(payload: bytes) -> None:
    with pytest.raises(ValidationError):
        Job.model_validate_json(payload)


def test_job_is_immutable() -> None:
    job = Job(id="A-3")
    with pytest.raises(ValidationError):
        job.id = "B"


def test_context_reads_the_delivery() -> None:
    ctx = delivery(3, stream_seq=42)
    assert ctx.attempt == 3
    assert ctx.stream_sequence == 42
    assert ctx.msg_id == "job-1"
    assert ctx.subject == "root.v1.job"
    assert delivery(1, msg_id=None).msg_id is None


def test_plain_job_succeeds() -> None:
    asyncio.run(handle(Job(id="ok"), delivery(1)))


@pytest.mark.parametrize("fail_times", [1, 2, 4])
def test_retry_is_raised_while_attempt_is_at_most_fail_times(fail_times: int) -> None:
    job = Job(id="flaky", fail_times=fail_times)
    for attempt in range(1, fail_times + 1):
        with pytest.raises(Retry) as caught:
            asyncio.run(handle(job, delivery(attempt)))
        assert caught.value.delay is not None
        assert caught.value.delay > 0
        assert f"{attempt} of {fail_times}" in caught.value.reason
    asyncio.run(handle(job, delivery(fail_times + 1)))  # the next attempt succeeds
    asyncio.run(handle(job, delivery(fail_times + 5)))


def test_work_seconds_makes_the_handler_take_that_long() -> None:
    started = time.monotonic()
    asyncio.run(handle(Job(id="slow", work_seconds=0.2), delivery(1)))
    assert time.monotonic() - started >= 0.19


def test_handler_does_not_block_the_event_loop() -> None:
    """Two 0.3 s jobs side by side take ~0.3 s, not 0.6 s: the handler awaits, never blocks."""

    async def both() -> float:
        started = time.monotonic()
        job = Job(id="slow", work_seconds=0.3)
        await asyncio.gather(handle(job, delivery(1)), handle(job, delivery(1)))
        return time.monotonic() - started

    assert asyncio.run(both()) < 0.55
