"""One way to ride out a broker hiccup (a leader election, a node restart): retry with a doubling
pause until a deadline. Used by DLQ publishes, the max-deliveries rescue, producers and route."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    patience: float,
    should_retry: Callable[[Exception], Awaitable[bool]] | None = None,
    between: Callable[[Exception], Awaitable[None]] | None = None,
    min_attempts: int = 1,
    first_delay: float = 0.2,
    max_delay: float = 2.0,
) -> T:
    """Await ``call()`` until it succeeds, pausing ``first_delay`` doubling to ``max_delay``.

    Its error is re-raised once ``patience`` seconds are used up (but not before
    ``min_attempts`` tries), or at once when ``should_retry`` says it is not worth another try.
    ``between`` runs after each failure that will be retried (log it, keep a job alive...).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if attempt >= min_attempts and loop.time() + delay > deadline:
                raise
            if should_retry is not None and not await should_retry(exc):
                raise
            if between is not None:
                await between(exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
