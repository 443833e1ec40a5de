"""Fuzzing the decode path without NATS: whatever bytes arrive, the outcome is clean.

* ``Job.model_validate_json`` on arbitrary bytes and on JSON-ish documents either returns a job
  or raises ``ValidationError``: never anything else (no RecursionError, no UnicodeError).
* ``describe`` of that error (what the DLQ's ``Dlq-Error`` header and the log line carry) is
  always one non-empty, printable line of at most 1024 characters, and so is ``describe`` of any
  other exception, whatever a hostile payload put in its field names or messages.
* The worker's own ``_process`` turns every undecodable payload into a dead letter with reason
  ``invalid`` without calling the handler, and hands every valid one to the handler and acks it.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, cast

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from pydantic import ValidationError

from {{ cookiecutter.__package_name }}.runtime.consume.context import JobContext
from {{ cookiecutter.__package_name }}.runtime.consume.worker import Worker
from {{ cookiecutter.__package_name }}.runtime.errors import describe
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob as Job
from {{ cookiecutter.__package_name }}.runtime.settings import load_settings

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEEP = [b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(["id", "item", "quantity", "work_seconds", "fail_times"]) | st.text(
    max_size=12
)
job_like = st.dictionaries(field_names, json_values, max_size=7) | st.fixed_dictionaries(
    {"id": st.text(max_size=250)},
    optional={
        "item": st.text(max_size=250) | json_values,
        "quantity": st.integers() | json_values,
        "work_seconds": st.floats(allow_nan=True) | json_values,
        "fail_times": st.integers() | json_values,
    },
)


def encode(value: Any) -> bytes:
    """JSON the way a careless producer might write it: NaN and Infinity included."""
    return json.dumps(value, allow_nan=True).encode()


def decode(data: bytes) -> Job | ValidationError:
    """The chassis' decode step; anything but ValidationError escaping it fails the test."""
    try:
        return Job.model_validate_json(data)
    except ValidationError as exc:
        return exc


def assert_one_line(text: str, limit: int = 1024) -> None:
    assert text, "describe() returned nothing"
    assert len(text) <= limit, len(text)
    # It becomes a NATS header value and a log line: no line breaks, no control characters.
    assert text.isprintable(), repr(text[:200])


@FUZZ
@given(st.binary(max_size=2048))
@example(b"\xff\xfe\xfd")
@example(b"")
@example(b"null")
@example(DEEP[0])
@example(DEEP[1])
@example(b'{"id": "\\ud800"}')
@example(b'{"id": "x", "quantity": 1' + b"0" * 5000 + b"}")
def test_arbitrary_bytes_decode_to_a_job_or_a_validation_error(data: bytes) -> None:
    outcome = decode(data)
    if isinstance(outcome, ValidationError):
        assert_one_line(describe(outcome))


@FUZZ
@given(job_like | json_values)
def test_json_documents_decode_to_a_job_or_a_validation_error(value: Any) -> None:
    outcome = decode(encode(value))
    if isinstance(outcome, ValidationError):
        assert_one_line(describe(outcome))
        return
    # A job that decoded is a real job: it survives its own wire form.
    assert decode(outcome.model_dump_json().encode()) == outcome
    assert isinstance(value, dict)
    assert "id" in value


@FUZZ
@given(st.text(max_size=5000), st.integers(min_value=4, max_value=2048))
def test_describe_is_always_one_bounded_line(message: str, limit: int) -> None:
    for exc in (ValueError(message), RuntimeError(message, message), KeyError(message)):
        assert_one_line(describe(exc, limit), limit)
    assert_one_line(describe(Exception()))


# ------------------------------------------------------------------------------------ the worker


class RecordingMsg(Msg):
    """A delivery whose ack is recorded instead of sent."""

    async def ack(self) -> None:
        self.headers = {**(self.headers or {}), "acked": "yes"}


class RecordingWorker(Worker):
    """The real Worker, with dead-lettering recorded instead of published."""

    def __init__(self) -> None:
        self.handled: list[Job] = []
        self.dead: list[tuple[str, BaseException]] = []

        async def handler(job: Job, ctx: JobContext[Any]) -> None:
            self.handled.append(job)

        super().__init__(load_settings(_env_file=None), Job, handler, install_signal_handlers=False)

    async def _dead_letter(
        self, msg: Msg, reason: str, exc: BaseException, attempt: int | None = None
    ) -> str:
        self.dead.append((reason, exc))
        return "dead_lettered"


def process(data: bytes) -> tuple[RecordingWorker, RecordingMsg, Any]:
    worker = RecordingWorker()
    msg = RecordingMsg(
        _client=cast(Any, None),
        subject="root.v1.job",
        reply="$JS.ACK.STREAM.consumer.1.7.7.1700000000000000000.0",
        data=data,
        headers=None,
    )

    async def go() -> Any:
        slot = worker._slots[0]  # noqa: SLF001 - the real processing step, minus NATS
        return await worker._process(msg, slot, asyncio.get_running_loop())  # noqa: SLF001

    return worker, msg, asyncio.run(go())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512) | job_like.map(encode))
@example(DEEP[0])
@example(b'{"id": "ok-1"}')
def test_the_worker_dead_letters_every_undecodable_payload_as_invalid(data: bytes) -> None:
    worker, msg, outcome = process(data)
    decoded = decode(data)
    if isinstance(decoded, ValidationError):
        assert worker.handled == [], "the handler saw a payload that is not a job"
        assert [reason for reason, _ in worker.dead] == ["invalid"]
        assert outcome is not None
        assert outcome[0] == "dead_lettered"
        assert_one_line(describe(worker.dead[0][1]))
        assert (msg.headers or {}).get("acked") is None
    else:
        assert worker.handled == [decoded]
        assert worker.dead == []
        assert outcome is None
        assert (msg.headers or {}).get("acked") == "yes"


def test_non_finite_numbers_are_never_a_valid_work_time() -> None:
    for value in (math.nan, math.inf, -math.inf):
        assert isinstance(decode(encode({"id": "n", "work_seconds": value})), ValidationError)
