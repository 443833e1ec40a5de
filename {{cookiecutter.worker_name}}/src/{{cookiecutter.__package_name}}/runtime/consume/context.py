"""What a handler may know about its job: delivery facts, computed only when asked, and the
process-wide ``resources`` that ``resources.lifespan`` opened.

A worker binds ``resources`` once, as a class attribute of a subclass made at start-up
(:func:`bound_context`), so the context of each message is still one object with one slot.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg

R = TypeVar("R")


class JobContext(Generic[R]):
    """Delivery facts for one job. Attributes are parsed lazily: the happy path pays nothing."""

    __slots__ = ("_msg",)
    resources: R  # what resources.lifespan yielded; a class attribute (see bound_context)

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


def bound_context(resources: object) -> type[JobContext[Any]]:
    """A JobContext class whose instances all see these ``resources``."""
    return type("BoundJobContext", (JobContext,), {"__slots__": (), "resources": resources})
