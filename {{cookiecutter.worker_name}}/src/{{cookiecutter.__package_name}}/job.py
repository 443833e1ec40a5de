"""The job model: what one message on the queue means. Edit this file.

The chassis parses every message into :class:`Job` before the handler sees it. A payload that is not
valid JSON, or does not match this model, goes straight to the dead-letter queue with the
validation error; it is never retried, because retrying cannot fix it.

Keep the ``id`` field: the publish helper uses it as ``Nats-Msg-Id``, so a retried publish of the
same job is dropped by the stream's duplicate window.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Job(BaseModel):
    """One {{ cookiecutter.job_type }} job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200, description="Unique job id (deduplication key).")
    # Example fields: replace them with what your job carries.
    item: str = Field(default="example", max_length=200)
    quantity: int = Field(default=1, ge=1)
