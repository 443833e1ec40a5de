"""Route KV writes ride out a leader election, and only where repeating them is safe."""

from __future__ import annotations

import asyncio

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError

from {{ cookiecutter.__package_name }}.runtime.evolve import routing


def test_a_write_nobody_answered_is_repeated_until_the_bucket_has_a_leader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(routing, "KV_PATIENCE", 5.0)
    calls: list[int] = []

    async def write() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise NoStreamResponseError  # 503: stored nothing
        return 7

    assert asyncio.run(routing.kv_write(write)) == 7
    assert len(calls) == 3


def test_a_write_that_timed_out_is_not_repeated() -> None:
    """It may have landed: a repeated compare-and-set would look like someone else's step."""
    calls: list[int] = []

    async def write() -> int:
        calls.append(1)
        raise NatsTimeoutError

    with pytest.raises(NatsTimeoutError):
        asyncio.run(routing.kv_write(write))
    assert len(calls) == 1
