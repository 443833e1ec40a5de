"""The ack batch: what one loop step acknowledges goes to nats-py's write buffer as one command."""

from __future__ import annotations

import asyncio
from typing import Any

from {{ cookiecutter.__package_name }}.runtime.consume.acks import AckBatch, ack_batch


class BufferOnly:
    """The parts of nats-py's Client the ack batch writes to (nothing is sent)."""

    def __init__(self, *, connected: bool = True) -> None:
        self._pending: list[bytes] = []
        self._pending_data_size = 0
        self._flush_queue: asyncio.Queue[Any] = asyncio.Queue()
        self._flusher_task: Any = asyncio.get_running_loop().create_future()  # "running"
        self.is_connected = connected

    async def _flush_pending(self) -> None:  # what flushes when the flusher task is gone
        self._pending, self._pending_data_size = [], 0


def test_acks_of_one_step_become_one_write_and_one_flusher_wake_up() -> None:
    async def go() -> None:
        nc = BufferOnly()
        batch = ack_batch(nc)  # type: ignore[arg-type]
        assert isinstance(batch, AckBatch)
        for n in (1, 2, 3):
            batch.ack(f"$JS.ACK.S.c.1.{n}.{n}.0.0")
        assert nc._pending == []  # noqa: SLF001 - not before this step yields
        await asyncio.sleep(0)
        assert nc._pending == [  # noqa: SLF001 - what msg.ack() sends, three times, in order
            b"PUB $JS.ACK.S.c.1.1.1.0.0 0\r\n\r\n"
            b"PUB $JS.ACK.S.c.1.2.2.0.0 0\r\n\r\n"
            b"PUB $JS.ACK.S.c.1.3.3.0.0 0\r\n\r\n"
        ]
        assert nc._pending_data_size == len(nc._pending[0])  # noqa: SLF001
        assert nc._flush_queue.qsize() == 1  # noqa: SLF001 - the flusher is woken once

    asyncio.run(go())


def test_acks_while_disconnected_wait_in_the_buffer_for_the_reconnect() -> None:
    async def go() -> None:
        nc = BufferOnly(connected=False)
        batch = ack_batch(nc)  # type: ignore[arg-type]
        assert batch is not None
        batch.ack("$JS.ACK.S.c.1.9.9.0.0")
        await asyncio.sleep(0)
        assert nc._pending == [b"PUB $JS.ACK.S.c.1.9.9.0.0 0\r\n\r\n"]  # noqa: SLF001
        assert nc._flush_queue.empty()  # noqa: SLF001 - nats-py writes it after reconnecting

    asyncio.run(go())


def test_a_client_without_the_write_buffer_falls_back_to_msg_ack() -> None:
    async def go() -> None:
        assert ack_batch(None) is None
        assert ack_batch(object()) is None  # type: ignore[arg-type]

    asyncio.run(go())
