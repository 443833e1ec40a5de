"""Declarative, idempotent JetStream provisioning: the work stream, a consumer per lane, the DLQ.

Layout (``<root>`` is the subject root, ``<lane>`` a release lane such as ``v1``)::

    producers --> <root>.jobs.<type>          ingress; never names a version
    stream    --  subject_transform <root>.jobs.>  ->  <root>.<lane>.>   (the route)
    consumer  <worker>-<lane>  filter <root>.<lane>.>   one per lane, shared by its instances
    DLQ       <root>.dlq.<type>   limits retention

The route (which lane new work lands on) belongs to the ``route`` command. Provisioning only sets
it when it creates the stream; afterwards it never moves it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError, ServiceUnavailableError

from ..errors import JETSTREAM_UNAVAILABLE, NotPermittedError, ProvisionError, UnavailableError
from ..names import WORKER_NAME
from ..settings import Settings

log = logging.getLogger(__name__)


def route_transform(settings: Settings, gen: int) -> SubjectTransform:
    """``<root>.jobs.>`` -> generation ``gen`` (see ``naming.py`` for the stored layout)."""
    dest = settings.names.route_dest(gen, replicated=settings.stream_replicas > 1)
    return SubjectTransform(src=settings.names.ingress_filter, dest=dest)


def routes_as(settings: Settings, transform: SubjectTransform | None, gen: int) -> bool:
    """Whether the stream's ``transform`` stamps new work as generation ``gen`` does in this
    version's layout. Anything else (another generation, the layout before generations, or a
    stream made before unkeyed buckets were fixed on replicated streams) is rewritten in place."""
    return transform == route_transform(settings, gen)


def stream_config(settings: Settings, gen: int) -> StreamConfig:
    return StreamConfig(
        name=settings.stream_name,
        description=f"{WORKER_NAME} work queue",
        subjects=settings.names.stream_subjects,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        duplicate_window=settings.duplicate_window,
        subject_transform=route_transform(settings, gen),
        metadata=stream_metadata(settings),
    )


def stream_metadata(settings: Settings) -> dict[str, str]:
    """What another worker's ``ecosystem`` needs to read this stream without our settings: the
    names :class:`~..naming.Names` is built from (see ``operate/ecosystem.py``)."""
    names = settings.names
    return {
        "worker": WORKER_NAME,
        "subject_root": names.root,
        "job_type": names.job_type,
        "dlq_stream": names.dlq_stream,
        "route_bucket": names.route_bucket,
        "registry_bucket": names.registry_bucket,
    }


def dlq_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=settings.dlq_stream_name,
        description=f"{WORKER_NAME} dead letters",
        subjects=settings.names.dlq_subjects,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=settings.dlq_max_age,
        duplicate_window=settings.duplicate_window,
        metadata={"worker": WORKER_NAME},
    )


# Deliveries the server allows beyond MAX_DELIVER. The chassis dead-letters at MAX_DELIVER itself;
# the headroom only matters when the final attempt could not settle (the worker died, or the DLQ
# publish failed during a leader election): the job then comes back once more instead of being
# stranded in the stream, which would happen if the server's limit were exactly MAX_DELIVER.
MAX_DELIVER_HEADROOM = 2


def consumer_backoff(settings: Settings) -> list[float]:
    """Redelivery waits after an ack timeout (a crashed or hung worker).

    JetStream uses ``backoff[0]`` instead of ``ack_wait`` once backoff is set, so the schedule
    starts at ``ack_wait`` and never waits less; it must be shorter than ``max_deliver``.
    """
    waits = [settings.ack_wait] + [max(settings.ack_wait, d) for d in settings.backoff]
    return waits[: max(0, settings.max_deliver + MAX_DELIVER_HEADROOM - 1)]


def consumer_config(
    settings: Settings, filters: list[str], lane: str | None = None
) -> ConsumerConfig:
    """A lane's durable; ``filters`` (from the route state) say which stored jobs it owns."""
    lane = lane or settings.lane
    backoff = consumer_backoff(settings)
    return ConsumerConfig(
        durable_name=settings.names.consumer(lane),
        description=f"{WORKER_NAME} lane {lane}",
        filter_subjects=filters,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait,
        max_deliver=settings.max_deliver + MAX_DELIVER_HEADROOM,
        backoff=backoff or None,
        max_ack_pending=settings.max_ack_pending,
        max_waiting=512,
        num_replicas=settings.stream_replicas,
        metadata={"worker": WORKER_NAME, "lane": lane},
    )


# Consumer fields we own and compare; anything else the server may fill in itself.
_CONSUMER_FIELDS = (
    "ack_policy",
    "deliver_policy",
    "ack_wait",
    "max_deliver",
    "backoff",
    "max_ack_pending",
)
_STREAM_FIELDS = ("subjects", "retention", "storage", "num_replicas", "duplicate_window")


def _same(new: object, old: object) -> bool:
    """Equal, treating durations as equal to the nanosecond (the server stores whole ns, so
    33.3 s reads back as 33.299999999 s and would look like a change on every start)."""
    if isinstance(new, int | float) and isinstance(old, int | float):
        return math.isclose(new, old, rel_tol=0, abs_tol=1e-6)
    if isinstance(new, list) and isinstance(old, list):
        return len(new) == len(old) and all(_same(a, b) for a, b in zip(new, old, strict=True))
    return new == old


def _diff(want: object, have: object, fields: tuple[str, ...]) -> dict[str, tuple[object, object]]:
    changes = {}
    for name in fields:
        new, old = getattr(want, name), getattr(have, name)
        if new is not None and not _same(new, old):
            changes[name] = (old, new)
    return changes


def _describe(changes: dict[str, tuple[object, object]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


@dataclass
class ProvisionReport:
    """What provisioning did, for the log and the ``provision`` command's output."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    route: str | None = None

    def lines(self) -> list[str]:
        out = [f"created {x}" for x in self.created] + [f"updated {x}" for x in self.updated]
        out += [f"unchanged {x}" for x in self.unchanged]
        if self.route:
            out.append(f"route: new work -> {self.route}")
        return out


def _raise_api(exc: APIError, what: str) -> None:
    if isinstance(exc, ServiceUnavailableError):  # JetStream's API has no responder
        raise UnavailableError(JETSTREAM_UNAVAILABLE) from None
    if exc.code == 403 or "permission" in (exc.description or "").lower():
        raise NotPermittedError(
            f"NATS account may not manage {what} ({exc.description}): grant JetStream API "
            "permissions for it, or set PROVISION=false and provision with an admin account"
        ) from None
    raise ProvisionError(f"cannot provision {what}: {exc.description} (code {exc.err_code})")


async def ensure_stream(
    js: JetStreamContext, want: StreamConfig, report: ProvisionReport, *, keep_route: bool
) -> StreamInfo:
    name = f"stream {want.name}"
    try:
        info = await js.stream_info(want.name or "")
    except NotFoundError:
        try:
            info = await js.add_stream(want)
        except APIError as exc:
            _raise_api(exc, name)
            raise
        report.created.append(name)
        return info
    except APIError as exc:
        _raise_api(exc, name)
        raise
    if keep_route:  # the live route is the route command's, never provisioning's
        want.subject_transform = info.config.subject_transform
    changes = _diff(want, info.config, _STREAM_FIELDS)
    if want.max_age is not None and not _same(want.max_age, info.config.max_age):
        changes["max_age"] = (info.config.max_age, want.max_age)
    have_meta = info.config.metadata or {}
    if any(have_meta.get(k) != v for k, v in (want.metadata or {}).items()):
        added = {k: v for k, v in (want.metadata or {}).items() if have_meta.get(k) != v}
        changes["metadata"] = ({k: have_meta.get(k) for k in added}, added)
    if not changes:
        report.unchanged.append(name)
        return info
    if "retention" in changes or "storage" in changes:
        raise ProvisionError(
            f"{name} exists with {_describe(changes)}; JetStream cannot change retention or "
            "storage in place: migrate it (or delete it when empty) and run provision again"
        )
    want.metadata = {**(info.config.metadata or {}), **(want.metadata or {})}
    try:
        info = await js.update_stream(want)
    except APIError as exc:
        raise ProvisionError(
            f"{name}: cannot apply {_describe(changes)}: {exc.description}"
        ) from None
    report.updated.append(f"{name} ({_describe(changes)})")
    return info


def consumer_filters(config: ConsumerConfig) -> list[str]:
    """A consumer's filters, whichever of the two fields holds them."""
    if config.filter_subjects:
        return list(config.filter_subjects)
    return [config.filter_subject] if config.filter_subject else []


async def ensure_consumer(
    js: JetStreamContext,
    settings: Settings,
    report: ProvisionReport,
    filters: list[str],
    lane: str | None = None,
) -> ConsumerInfo:
    want = consumer_config(settings, filters, lane)
    durable = want.durable_name or ""
    name = f"consumer {durable}"
    have: ConsumerInfo | None
    try:
        have = await js.consumer_info(settings.stream_name, durable)
    except NotFoundError:
        have = None
    except APIError as exc:
        _raise_api(exc, name)
        raise
    if have is not None:
        changes = _diff(want, have.config, _CONSUMER_FIELDS)
        if sorted(filters) != sorted(consumer_filters(have.config)):
            changes["filter_subjects"] = (consumer_filters(have.config), filters)
        if want.backoff is None and have.config.backoff:
            changes["backoff"] = (have.config.backoff, None)
        if not changes:
            report.unchanged.append(name)
            return have
    info: ConsumerInfo
    try:
        info = await js.add_consumer(settings.stream_name, want)
    except APIError as exc:
        if have is None:
            _raise_api(exc, name)
        raise ProvisionError(
            f"{name} exists with settings JetStream cannot change in place "
            f"({_describe(changes)}: {exc.description}); drain the lane, then delete the "
            f"consumer ('nats consumer rm {settings.stream_name} {durable}') and provision again"
        ) from None
    if have is None:
        report.created.append(name)
    else:
        report.updated.append(f"{name} ({_describe(changes)})")
    return info


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> bool:
    """Create a KV bucket if missing; True when it was created."""
    try:
        await js.key_value(config.bucket or "")
        return False
    except BucketNotFoundError:
        await js.create_key_value(config)
        return True
