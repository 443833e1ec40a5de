"""The demo job and handler, for ``run --demo N`` and ``--app demo`` only.

They live in the chassis, not in ``job.py``: their fields let the sender choose how long a job
sleeps and how often it fails, which no production worker should offer its producers. The
chassis's own tests run workers with this app, so they never depend on the user's model.

Test-only knobs, read once at import (the rollout tests make "bad versions" with them; never set
them in production):

* ``DEMO_FAIL_PERCENT=P``: the handler fails (raises) on every try of the jobs whose id hashes
  into the first P of 100 buckets, so a lane run with it fails about P % of its jobs, always the
  same ones;
* ``DEMO_JOB_VARIANT=required-field``: the job model gets a new required field (``priority``),
  a breaking change of the contract for the schema gate.
* ``DEMO_FORWARD_TO=<target>``: a pipeline. On every try, before it may fail, the handler
  publishes one job to ``<target>`` (a job type under the same root, or an ingress subject) with
  ``ctx.publish``: ``{"id": <job id>-<random>, "item": <job id>}``. The id is new on each try on
  purpose: only the derived ``Nats-Msg-Id`` keeps a retried job from creating a second one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import zlib
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


class DemoJobWithRequiredField(DemoJob):
    """``DEMO_JOB_VARIANT=required-field``: a breaking change (a new required field)."""

    priority: int = Field(ge=0, description="A field the stored jobs do not have.")


FAIL_PERCENT = int(os.environ.get("DEMO_FAIL_PERCENT", "0") or 0)  # test-only, see above
FORWARD_TO = os.environ.get("DEMO_FORWARD_TO", "").strip()  # test-only, see above
if os.environ.get("DEMO_JOB_VARIANT") == "required-field":  # test-only, see above
    DemoJob = DemoJobWithRequiredField  # type: ignore[misc,assignment]


class DemoFailureError(Exception):
    """What a lane run with ``DEMO_FAIL_PERCENT`` raises."""


async def handle(job: DemoJob, ctx: JobContext[Any]) -> None:
    """Fail ``fail_times`` times with ``Retry(0.2)``, then sleep ``work_seconds``."""
    if FAIL_PERCENT and zlib.crc32(job.id.encode()) % 100 < FAIL_PERCENT:
        raise DemoFailureError(f"DEMO_FAIL_PERCENT={FAIL_PERCENT} fails job {job.id}")
    if FORWARD_TO:
        await ctx.publish({"id": f"{job.id}-{os.urandom(4).hex()}", "item": job.id}, to=FORWARD_TO)
    if job.fail_times and ctx.attempt <= job.fail_times:
        raise Retry(delay=0.2, reason=f"demo failure {ctx.attempt} of {job.fail_times}")
    if job.work_seconds:
        await asyncio.sleep(job.work_seconds)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("handled %s x%d", job.item, job.quantity)
