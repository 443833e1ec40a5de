"""The demo job and handler, for ``run --demo N`` and ``--app demo`` only.

They live in the chassis, not in ``job.py``: their fields let the sender choose how long a job
sleeps and how often it fails, which no production worker should offer its producers. The
chassis's own tests run workers with this app, so they never depend on the user's model.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..consume.context import JobContext
from ..errors import Retry

log = logging.getLogger(__name__)


class DemoJob(BaseModel):
    """An example job whose sender controls its duration and failures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200, description="Unique job id (deduplication key).")
    item: str = Field(default="example", max_length=200)
    quantity: int = Field(default=1, ge=1)
    work_seconds: float = Field(default=0.0, ge=0.0, le=3600.0, description="Sleep this long.")
    fail_times: int = Field(default=0, ge=0, description="Ask for a retry on the first N tries.")


async def handle(job: DemoJob, ctx: JobContext[Any]) -> None:
    """Fail ``fail_times`` times with ``Retry(0.2)``, then sleep ``work_seconds``."""
    if job.fail_times and ctx.attempt <= job.fail_times:
        raise Retry(delay=0.2, reason=f"demo failure {ctx.attempt} of {job.fail_times}")
    if job.work_seconds:
        await asyncio.sleep(job.work_seconds)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("handled %s x%d", job.item, job.quantity)
