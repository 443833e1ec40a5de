"""Acknowledgements, written in batches: what ``msg.ack()`` sends, for a fraction of its cost.

``msg.ack()`` goes through ``publish()``: a subject check with a regular expression, a payload
size check, three coroutines and a queue put per job, about 2 µs of the chassis's cost per job
(the template's ``bench/`` profiles). An ack is an empty ``PUB`` to the reply subject the server
wrote, so the acks of one event-loop step are joined into one command and handed to nats-py's
own write buffer once, where its flusher writes them (and, after a reconnect, replays them) like
any other publish. The batch goes out at the end of the step that acknowledged the jobs: what
nats-py's flusher does anyway, so no ack waits longer than before.

Built on nats-py ``Client`` internals (``_pending``, ``_pending_data_size``, ``_flush_queue``,
``_flusher_task``, ``_flush_pending``), checked once: a nats-py release without them gets
``None`` here and the worker falls back to ``msg.ack()``. The template's newest-nats-py probe
checks them against every new release.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client

log = logging.getLogger(__name__)
_NEEDS = (
    "_pending",
    "_pending_data_size",
    "_flush_queue",
    "_flusher_task",
    "_flush_pending",
    "is_connected",
)


class AckBatch:
    """Collects the ack subjects of one loop step and hands them to the client in one piece."""

    __slots__ = ("_loop", "_nc", "_replies", "_scheduled")

    def __init__(self, nc: Client, loop: asyncio.AbstractEventLoop) -> None:
        self._nc = nc
        self._loop = loop
        self._replies: list[str] = []
        self._scheduled = False

    def ack(self, reply: str) -> None:
        """Acknowledge the job whose reply subject is ``reply`` (sent once this step yields)."""
        self._replies.append(reply)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the collected acks to the client's write buffer and wake its flusher."""
        self._scheduled = False
        replies = self._replies
        if not replies:
            return
        self._replies = []
        cmd = ("PUB " + " 0\r\n\r\nPUB ".join(replies) + " 0\r\n\r\n").encode()
        nc = self._nc
        nc._pending.append(cmd)  # noqa: SLF001 - see the module docstring
        nc._pending_data_size += len(cmd)  # noqa: SLF001
        if not nc.is_connected:  # kept in the buffer: nats-py writes it after the reconnect
            return
        flusher = nc._flusher_task  # noqa: SLF001
        loop = self._loop
        if flusher is None or flusher.done():  # as nats-py does: flush without the flusher
            loop.create_task(nc._flush_pending())  # noqa: SLF001
            return
        queue = nc._flush_queue  # noqa: SLF001
        if queue is not None and queue.empty():
            queue.put_nowait(loop.create_future())


def ack_batch(nc: Client | None) -> AckBatch | None:
    """An AckBatch for ``nc``, or None when this nats-py lacks what it builds on."""
    if nc is None or not all(hasattr(nc, name) for name in _NEEDS):
        log.debug("nats-py without the write buffer the ack batch uses: acks via msg.ack()")
        return None
    if not isinstance(getattr(nc, "_pending", None), list):
        return None
    return AckBatch(nc, asyncio.get_running_loop())
