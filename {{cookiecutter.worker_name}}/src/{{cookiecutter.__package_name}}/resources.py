"""What your handler shares across jobs: database pools, HTTP clients, caches. Edit this file.

``lifespan`` runs once per worker process. The code before ``yield`` runs at start-up, before the
first job is pulled; a failure there stops the worker with exit code 1 before it takes any work.
The code after ``yield`` runs at shutdown, after the last job has settled, so nothing a running
job uses is closed under it. Every handler call reaches the yielded object as ``ctx.resources``.

Example::

    @dataclass
    class Resources:
        http: httpx.AsyncClient

    @asynccontextmanager
    async def lifespan(settings: Settings) -> AsyncIterator[Resources]:
        async with httpx.AsyncClient(base_url=settings.payments_url) as http:
            yield Resources(http=http)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .settings import Settings


@dataclass
class Resources:
    """Shared objects for every job; add your own fields."""


@asynccontextmanager
async def lifespan(settings: Settings) -> AsyncIterator[Resources]:
    """Open the resources before the first job and close them after the last one."""
    yield Resources()
