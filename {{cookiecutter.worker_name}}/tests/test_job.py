"""Your job model, without NATS. Yours to edit: add the cases your producers send."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from {{ cookiecutter.__package_name }}.job import Job


def test_a_minimal_job_gets_the_defaults() -> None:
    job = Job.model_validate_json(b'{"id": "A-1"}')
    assert job.id == "A-1"


def test_a_job_round_trips_through_json() -> None:
    job = Job(id="A-2")
    assert Job.model_validate_json(job.model_dump_json()) == job


@pytest.mark.parametrize(
    "payload",
    [b"{}", b'{"id": ""}', b'{"id": "x", "surprise": true}', b"not json", b"\xff\xfe"],
)
def test_what_is_not_a_job_is_refused(payload: bytes) -> None:
    with pytest.raises(ValidationError):
        Job.model_validate_json(payload)
