"""What a handler may know about its job: delivery facts, computed only when asked, and the
process-wide ``resources`` that ``resources.lifespan`` opened; and how it hands work on to
another worker (:meth:`JobContext.publish`).

A worker binds ``resources`` once, as a class attribute of a subclass made at start-up
(:func:`bound_context`), so the context of each message is still one object that holds only its
message (a second slot is filled only by a handler that publishes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from nats.aio.msg import Msg

if TYPE_CHECKING:
    from nats.js.api import PubAck
    from pydantic import BaseModel

    from ..contract import Downstream

R = TypeVar("R")


class JobContext(Generic[R]):
    """Delivery facts for one job. Attributes are parsed lazily: the happy path pays nothing."""

    __slots__ = ("_msg", "_published")
    _published: dict[str, int]  # ctx.publish's count per target, set on the first publish
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

    async def publish(
        self,
        job: BaseModel | Mapping[str, Any],
        *,
        to: str | Downstream,
        key: str | None = None,
    ) -> PubAck:
        """Send ``job`` to another worker, as part of handling this one::

            await ctx.publish(Notification(id=f"{job.id}-mail", to=job.email), to="notification")

        ``to`` is a job type under this worker's subject root (``notification`` publishes to
        ``<root>.jobs.notification``), a full ingress subject (``shop.jobs.invoice``), or a
        :class:`~..contract.Downstream` made from that worker's contract (typed: only its jobs
        pass). The job is keyed by ``key``, else its id, like :class:`~..publish.Producer` does.

        Exactly once per upstream job within the target's duplicate window: the downstream
        ``Nats-Msg-Id`` is ``<this job's Nats-Msg-Id, or stream:sequence>:<target>:<n>``, ``n``
        counting this handler run's publishes to that target, so a retried or redelivered job
        that publishes the same jobs in the same order stores each of them once. The downstream
        job joins this job's trace. Declare the target in ``PUBLISHES_TO`` for ``permissions``.
        """
        from ..publish import publish_downstream

        try:
            counts = self._published
        except AttributeError:
            counts = self._published = {}
        return await publish_downstream(self._msg, job, to, key=key, counts=counts)


def bound_context(resources: object) -> type[JobContext[Any]]:
    """A JobContext class whose instances all see these ``resources``."""
    return type("BoundJobContext", (JobContext,), {"__slots__": (), "resources": resources})
