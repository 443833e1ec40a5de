"""The business logic: one async function. Edit this file.

Return normally and the job is acknowledged. Raise to control what happens next:

* ``Retry(delay=...)`` asks for another attempt after ``delay`` seconds;
* ``Reject(reason)`` sends the job to the dead-letter queue at once, without retries;
* any other exception is retried with the configured backoff, and after ``MAX_DELIVER`` attempts
  the job is dead-lettered with the error.

The handler runs with a timeout (``HANDLER_TIMEOUT``); a timeout counts as a failure. Long jobs
need nothing special: the chassis tells JetStream the job is still in progress while it runs.
Do not block the event loop: run blocking calls with ``asyncio.to_thread``.

``ctx.resources`` holds what ``resources.py`` opened at start-up (pools, clients, and your
settings from ``settings.py`` if the handler needs them).
"""

from __future__ import annotations

import logging

from .job import Job
from .resources import Resources
from .runtime import JobContext

log = logging.getLogger(__name__)


async def handle(job: Job, ctx: JobContext[Resources]) -> None:
    """Process one job. Replace the body with your own logic."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("handled %s x%d", job.item, job.quantity)
