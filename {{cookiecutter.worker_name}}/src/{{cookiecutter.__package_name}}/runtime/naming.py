"""Every NATS name this worker uses, computed once from its settings, and only here.

Streams, consumers, subjects, KV buckets, the micro service and the inbox prefix all come from
:class:`Names` (``settings.names``), so a setting such as ``CONSUMER_NAME`` or ``STREAM_NAME`` is
honoured by every command and by the worker alike.

The subject layout (``<root>`` is ``SUBJECT_ROOT``, ``<type>`` is ``JOB_TYPE``). Any number of
workers may share a root: each stream owns only its own job type's subjects::

    <root>.jobs.<type>[.<key>]    ingress: what producers publish to; never names a version.
                                  The optional key (by default the job id) makes routing sticky.
    <root>.<type>.g<gen>.<p10>.<p100>.<r1>.<r2>.<type>[.<key>]
                                  stored: the stream's subject transform stamps each job with
                                  the route generation and its bucket (see ``evolve/split.py``);
                                  lane consumers own buckets through their filters
    <root>.<lane>.>               stored by the template's layout before generations (legacy),
                                  drained by that lane's consumer until it is empty
    <root>.<type>.parked.<lane>   the filter of a lane that owns no buckets; the stream stores
                                  it as published, so it doubles as that lane's smoke inbox
                                  (``rollout --smoke``: jobs straight to a lane without share)
    <root>.dlq.<type>[.part]      dead letters (parts of one too big for a message)
    <root>.<type>.instances.<instance>[.contract]
                                  each instance's status (and contract) endpoint (micro service)
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .names import WORKER_NAME

_TOKEN_SAFE = re.compile(r"^[A-Za-z0-9_=-]{1,64}$")
# nats-server's transform functions are written in double braces; spelled out here because this
# file is part of a cookiecutter template, which would read them as its own placeholders.
_OPEN, _CLOSE = "{" * 2, "}" * 2
# The <r1>.<r2> tokens of unkeyed jobs on a replicated stream: bucket 99, the last the ramping
# lane gets (split.RANK), so they move with the whole ramp (see Names.route_dest).
UNKEYED_REPLICATED = "9.9"


def _fn(call: str) -> str:
    """A subject-transform function token, e.g. partition(10) in double braces."""
    return f"{_OPEN}{call}{_CLOSE}"


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

    def keyed_ingress(self, key: str) -> str:
        """The ingress with a routing key: the same key always lands on the same lane."""
        return f"{self.ingress}.{key_token(key)}"

    @property
    def stream_subjects(self) -> list[str]:
        """What the work stream captures: this job type only, keyed or not, and the smoke
        inboxes of lanes without share (see :meth:`smoke_subject`)."""
        return [self.ingress, f"{self.ingress}.*", f"{self.root}.{self.job_type}.parked.*"]

    @property
    def ingress_filter(self) -> str:
        """The route transform's source (the stream applies it only to what it captured)."""
        return f"{self.root}.jobs.>"

    def generation_prefix(self, gen: int) -> str:
        return f"{self.root}.{self.job_type}.g{gen}"

    def route_dest(self, gen: int, *, replicated: bool = False) -> str:
        """The route transform's destination for generation ``gen``.

        Unkeyed jobs get their bucket from two ``random(10)`` digits, but only on a stream with
        one replica: every replica of a replicated stream applies the transform itself (the
        leader replicates the subject as published), so each drew its own digits, and two lane
        consumers led from different nodes saw one job in different buckets: delivered twice,
        or by nobody (hundreds lost per ramp step on R3). There the digits are fixed to the
        bucket ranked last (``UNKEYED_REPLICATED``): unkeyed jobs stay on the current lane until
        a ramp completes, and keyed jobs, whose bucket is a hash, split as everywhere.
        """
        unkeyed = UNKEYED_REPLICATED if replicated else f"{_fn('random(10)')}.{_fn('random(10)')}"
        return (
            f"{self.generation_prefix(gen)}."
            f"{_fn('partition(10)')}.{_fn('partition(100)')}.{unkeyed}.>"
        )

    def gen_of_route(self, dest: str) -> int | None:
        """The generation a route destination stamps; None for another layout."""
        prefix = f"{self.root}.{self.job_type}.g"
        head = dest.split("." + _OPEN, 1)[0]
        number = head[len(prefix) :]
        return int(number) if head.startswith(prefix) and number.isdigit() else None

    def gen_of_filter(self, subject_filter: str) -> int | None:
        """The generation a consumer filter belongs to; None for a legacy or parked one."""
        prefix = f"{self.root}.{self.job_type}.g"
        number = subject_filter[len(prefix) :].split(".", 1)[0]
        return int(number) if subject_filter.startswith(prefix) and number.isdigit() else None

    def legacy_lane_filter(self, lane: str) -> str:
        """Where the layout before generations stored a lane's jobs."""
        return f"{self.root}.{lane}.>"

    def legacy_lane_of_route(self, dest: str) -> str | None:
        """The lane a route destination of the layout before generations points at."""
        prefix = f"{self.root}."
        if dest.startswith(prefix) and dest.endswith(".>") and _OPEN not in dest:
            lane = dest[len(prefix) : -2]
            return lane if "." not in lane else None
        return None

    def parked_filter(self, lane: str) -> str:
        """A filter nothing is stored under: a lane without buckets still needs one."""
        return f"{self.root}.{self.job_type}.parked.{lane}"

    def smoke_subject(self, lane: str) -> str:
        """Where ``rollout --smoke`` publishes jobs straight to ``lane`` before it gets a share:
        its parked filter, which only its consumer owns (stored as published: the route
        transform's source, ``<root>.jobs.>``, does not match it)."""
        return self.parked_filter(lane)

    def ingress_for_stored(self, stored: str) -> str:
        """The ingress subject a stored job was published to (for moving or replaying it)."""
        tokens = stored.split(".")
        if stored.startswith(f"{self.root}.{self.job_type}.g") and len(tokens) >= 8:
            return ".".join([self.root, "jobs", *tokens[7:]])
        if len(tokens) >= 3 and tokens[0] == self.root:  # legacy <root>.<lane>.<type>[.<key>]
            return ".".join([self.root, "jobs", *tokens[2:]])
        return self.ingress

    @property
    def dlq_subject(self) -> str:
        return f"{self.root}.dlq.{self.job_type}"

    @property
    def dlq_parts(self) -> str:
        """Where a dead letter too big for one message keeps its parts."""
        return f"{self.dlq_subject}.part"

    @property
    def dlq_subjects(self) -> list[str]:
        """What the DLQ stream captures: this job type's dead letters (and their parts) only."""
        return [self.dlq_subject, self.dlq_parts]

    def instance_subject(self, instance: str) -> str:
        """One instance's micro-service endpoints (``status``, ``contract``) live under this."""
        return f"{self.instances_prefix}.{instance}"

    @property
    def instances_prefix(self) -> str:
        """Per job type, so workers sharing a root cannot reach each other's instances."""
        return f"{self.root}.{self.job_type}.instances"

    def instance_endpoint(self, instance: str, endpoint: str) -> str:
        """An instance's other micro endpoints: ``contract`` (its job model's JSON Schema),
        ``validate`` (does its model accept these payloads?) and ``retire`` (stop now)."""
        return f"{self.instance_subject(instance)}.{endpoint}"

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
    def rollout_key(self) -> str:
        """The key of the gated rollout's state (definition, step, lease, decisions) in the
        route bucket: every write to it is a compare-and-set."""
        return "rollout"

    @property
    def registry_bucket(self) -> str:
        """KV: one heartbeat per live instance, expiring after INSTANCE_TTL."""
        return f"{self.stream}_INSTANCES"

    @property
    def service(self) -> str:
        """The NATS micro service every instance registers under."""
        return self.worker


def key_token(key: str) -> str:
    """A routing key as one subject token: itself when it is a plain token, else its base64url
    (or, for a long key, a digest). Deterministic, so one key always lands in one bucket."""
    if _TOKEN_SAFE.match(key):
        return key
    encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    if len(encoded) <= 64:
        return f"b64-{encoded}"
    return "sha-" + hashlib.sha256(key.encode()).hexdigest()[:40]
