"""What a handler may know about the message behind its job, computed only when asked."""

from __future__ import annotations

from nats.aio.msg import Msg


class JobContext:
    """Delivery facts for one job. Attributes are parsed lazily: the happy path pays nothing."""

    __slots__ = ("_msg",)

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def attempt(self) -> int:
        """1 on first delivery, 2 on the first retry, and so on."""
        return int(self._msg.metadata.num_delivered or 1)

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def stream_sequence(self) -> int:
        return int(self._msg.metadata.sequence.stream)

    @property
    def msg_id(self) -> str | None:
        headers = self._msg.headers
        return headers.get("Nats-Msg-Id") if headers else None

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._msg.headers or {})

    async def progress(self) -> None:
        """Tell JetStream the job is still being worked on (the chassis also does this itself)."""
        await self._msg.in_progress()
