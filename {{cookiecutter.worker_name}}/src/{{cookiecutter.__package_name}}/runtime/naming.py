"""Every NATS name this worker uses, computed once from its settings, and only here.

Streams, consumers, subjects, KV buckets, the micro service and the inbox prefix all come from
:class:`Names` (``settings.names``), so a setting such as ``CONSUMER_NAME`` or ``STREAM_NAME`` is
honoured by every command and by the worker alike.

The subject layout (``<root>`` is ``SUBJECT_ROOT``, ``<type>`` is ``JOB_TYPE``)::

    <root>.jobs.<type>            ingress: what producers publish to; never names a version
    <root>.<lane>.>               stored: the stream's subject transform rewrites the ingress
                                  to the current lane's subjects (the route)
    <root>.dlq.<type>             dead letters
    <root>.instances.<instance>   each instance's status endpoint (micro service)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .names import WORKER_NAME

if TYPE_CHECKING:
    from .settings import Settings


@dataclass(frozen=True)
class Names:
    """The names of one worker's NATS resources (see the module docstring for the layout)."""

    worker: str
    root: str
    job_type: str
    stream: str
    dlq_stream: str
    lane: str
    custom_consumer: str | None  # CONSUMER_NAME: this instance's lane's durable, if set

    @classmethod
    def of(cls, settings: Settings) -> Names:
        return cls(
            worker=WORKER_NAME,
            root=settings.subject_root,
            job_type=settings.job_type,
            stream=settings.stream_name,
            dlq_stream=settings.dlq_stream_name,
            lane=settings.lane,
            custom_consumer=settings.consumer_name,
        )

    # ------------------------------------------------------------------------- consumers

    def consumer(self, lane: str | None = None) -> str:
        """The durable of ``lane`` (this instance's by default): ``CONSUMER_NAME`` for this
        instance's own lane when it is set, ``<worker>-<lane>`` otherwise. Commands that act on
        another lane look its durable up on the server (``evolve.lanes.lane_consumer``), which
        also finds a custom name given to that lane's instances."""
        lane = lane or self.lane
        if lane == self.lane and self.custom_consumer:
            return self.custom_consumer
        return f"{self.worker}-{lane}"

    @property
    def durable(self) -> str:
        return self.consumer()

    # ------------------------------------------------------------------------- subjects

    @property
    def ingress(self) -> str:
        """Where producers publish. Never contains a version: routing happens in the stream."""
        return f"{self.root}.jobs.{self.job_type}"

    @property
    def ingress_filter(self) -> str:
        """The work stream's subjects, and the route transform's source."""
        return f"{self.root}.jobs.>"

    def lane_filter(self, lane: str | None = None) -> str:
        """Stored subjects of a lane: the route transform rewrites the ingress to these."""
        return f"{self.root}.{lane or self.lane}.>"

    def lane_of_route(self, dest: str) -> str | None:
        """The lane a route transform's destination points at (inverse of lane_filter)."""
        prefix = f"{self.root}."
        if dest.startswith(prefix) and dest.endswith(".>"):
            return dest[len(prefix) : -2]
        return None

    def ingress_for_stored(self, stored: str, lane: str) -> str:
        """The ingress subject a job stored on ``lane`` was published to (for moving it)."""
        prefix = f"{self.root}.{lane}."
        suffix = stored[len(prefix) :] if stored.startswith(prefix) else self.job_type
        return f"{self.root}.jobs.{suffix}"

    @property
    def dlq_subject(self) -> str:
        return f"{self.root}.dlq.{self.job_type}"

    @property
    def dlq_filter(self) -> str:
        return f"{self.root}.dlq.>"

    def instance_subject(self, instance: str) -> str:
        return f"{self.root}.instances.{instance}"

    @property
    def inbox_prefix(self) -> str:
        """A private reply prefix, so least-privilege accounts can deny other workers' inboxes."""
        return f"_INBOX.{self.worker}"

    # ------------------------------------------------------------------------- advisories

    @property
    def stream_updated_advisory(self) -> str:
        return f"$JS.EVENT.ADVISORY.STREAM.UPDATED.{self.stream}"

    def max_deliveries_advisory(self, consumer: str | None = None) -> str:
        return (
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{consumer or self.durable}"
        )

    # ------------------------------------------------------------------------- buckets, service

    @property
    def route_bucket(self) -> str:
        """KV: the route history (when, from which lane, to which, by whom)."""
        return f"{self.stream}_ROUTE"

    @property
    def registry_bucket(self) -> str:
        """KV: one heartbeat per live instance, expiring after INSTANCE_TTL."""
        return f"{self.stream}_INSTANCES"

    @property
    def service(self) -> str:
        """The NATS micro service every instance registers under."""
        return self.worker
