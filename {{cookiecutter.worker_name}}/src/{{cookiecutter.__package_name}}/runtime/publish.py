"""Publishing jobs: one helper for the CLI and for Python producers.

Every job is published with ``Nats-Msg-Id`` set to its id, so publishing the same job twice
within the stream's duplicate window stores it once, and to ``<root>.jobs.<type>.<id>``, so the
id is its routing key: during a ramp the same job always lands on the same lane. Bulk paths
keep many publishes in flight instead of paying a round trip per message.

A handler hands a job on to another worker with ``ctx.publish`` (:func:`publish_downstream`):
keyed the same way, with a ``Nats-Msg-Id`` derived from the upstream job and the target, and in
the upstream job's trace.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, NotFoundError
from pydantic import BaseModel

from . import connection
from .connection import connect
from .consume.retrying import retry
from .contract import Downstream, ingress_of
from .naming import key_token
from .settings import Settings

if TYPE_CHECKING:
    from .observe.telemetry import Telemetry

Outgoing = tuple[str, bytes, dict[str, str] | None]
_WINDOW = 256  # publishes in flight at once on bulk paths
PUBLISH_PATIENCE = 20.0  # seconds a publish is retried: longer than a JetStream leader election


def encode(job: BaseModel) -> tuple[bytes, dict[str, str]]:
    """The wire form of a job: compact JSON, with its ``id`` as the deduplication key."""
    job_id = getattr(job, "id", None)
    return job.model_dump_json().encode(), ({"Nats-Msg-Id": str(job_id)} if job_id else {})


async def publish_patiently(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
    *,
    patience: float = PUBLISH_PATIENCE,
) -> PubAck:
    """One publish that rides out a leader election (~4-9 s after a node dies).

    A 503 ("no responders": the stream has no leader right now) stored nothing, so it is always
    retried; a timeout only with a ``Nats-Msg-Id``, which the stream deduplicates. A subject that
    no stream stores fails at once (the meta leader says so), not after ``patience``.
    """
    checked = False

    async def election(exc: Exception) -> bool:
        nonlocal checked
        if isinstance(exc, NatsTimeoutError):  # maybe stored: safe to repeat only if deduplicated
            return bool((headers or {}).get("Nats-Msg-Id")) and not _refused(subject)
        if not isinstance(exc, NoStreamResponseError | NoRespondersError):
            return False
        if not checked:
            stored = await _stream_stores(js, subject)
            if stored is False:  # a real misconfiguration, not an election: say so now
                return False
            checked = stored is True
        return True

    return await retry(
        lambda: js.publish(subject, data, headers=headers), patience=patience, should_retry=election
    )


def _refused(subject: str) -> bool:
    """Did the server refuse a publish to ``subject`` (a permissions violation, which reaches the
    client only as an error line while the publish itself times out)? Then retrying is futile."""
    return any(f'"{subject}"' in text for text in connection.denied[-20:])


async def _stream_stores(js: JetStreamContext, subject: str) -> bool | None:
    """Does a stream store ``subject``? None while the meta leader cannot say (an election)."""
    try:
        await js.find_stream_name_by_subject(subject)
    except NotFoundError:
        return False
    except Exception:
        return None
    return True


async def publish_many(js: JetStreamContext, messages: Iterable[Outgoing]) -> list[PubAck]:
    """Publish with up to ``_WINDOW`` acknowledgements outstanding; keeps input order."""
    acks: list[PubAck] = []
    batch: list[asyncio.Task[PubAck]] = []
    for subject, data, headers in messages:
        batch.append(asyncio.ensure_future(publish_patiently(js, subject, data, headers)))
        if len(batch) >= _WINDOW:
            acks.extend(await asyncio.gather(*batch))
            batch.clear()
    if batch:
        acks.extend(await asyncio.gather(*batch))
    return acks


class Producer:
    """Publish jobs from any Python program::

    async with Producer(settings) as producer:
        await producer.publish(Job(id="A-1", item="book"))
    """

    def __init__(
        self, settings: Settings, nc: Client | None = None, telemetry: Telemetry | None = None
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry if telemetry is not None and telemetry.tracing else None
        self._nc = nc
        self._owns_connection = nc is None

    async def __aenter__(self) -> Producer:
        if self._nc is None:
            self._nc = await connect(self.settings)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._nc is not None and self._owns_connection:
            await self._nc.drain()

    @property
    def js(self) -> JetStreamContext:
        if self._nc is None:
            raise RuntimeError("use 'async with Producer(settings)' before publishing")
        return self._nc.jetstream()

    def subject_for(self, job: BaseModel, key: str | None = None) -> str:
        """The ingress with the job's routing key: ``key``, else its id (sticky ramps)."""
        key = key if key is not None else getattr(job, "id", None)
        names = self.settings.names
        return names.keyed_ingress(str(key)) if key else names.ingress

    async def publish(self, job: BaseModel, key: str | None = None) -> PubAck:
        """Publish one job; ``key`` (default: its id) decides its lane during a ramp."""
        data, headers = encode(job)
        subject = self.subject_for(job, key)
        if self.telemetry is None:
            return await publish_patiently(self.js, subject, data, headers)
        # The span names the ingress, not the keyed subject: span names stay low-cardinality.
        with self.telemetry.producing(self.settings.names.ingress, headers):
            return await publish_patiently(self.js, subject, data, headers)

    async def publish_all(self, jobs: Sequence[BaseModel]) -> list[PubAck]:
        if self.telemetry is None:
            return await publish_many(
                self.js, ((self.subject_for(job), *encode(job)) for job in jobs)
            )
        return list(await asyncio.gather(*(self.publish(job) for job in jobs)))


# --------------------------------------------------------------------------------- pipelines

TRACE_HEADERS = ("traceparent", "tracestate")


def upstream_id(msg: Msg) -> str:
    """What identifies the job being handled across its deliveries: its ``Nats-Msg-Id``, else
    ``<stream>:<sequence>`` (both stay the same when JetStream redelivers it)."""
    headers = msg.headers
    msg_id = headers.get("Nats-Msg-Id") if headers else None
    if msg_id:
        return msg_id
    meta = msg.metadata
    return f"{meta.stream}:{meta.sequence.stream}"


def downstream_msg_id(msg: Msg, ingress: str, n: int) -> str:
    """``<upstream id>:<target ingress>:<n>``: the same for every run of the upstream job."""
    return f"{upstream_id(msg)}:{ingress}:{n}"


@contextmanager
def _in_upstream_trace(msg: Msg, subject: str, headers: dict[str, str]) -> Iterator[None]:
    """With telemetry on: a PRODUCER span in the current (upstream) trace, its context injected
    into ``headers``. Off: the upstream message's trace headers, copied as they are."""
    otel = sys.modules.get("opentelemetry.trace")  # loaded only when telemetry is on
    if otel is not None and otel.get_current_span().get_span_context().is_valid:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        from .. import __version__
        from .observe import telemetry as t

        with otel.get_tracer(t.SCOPE, __version__).start_as_current_span(
            f"send {subject}",
            kind=SpanKind.PRODUCER,
            attributes={
                t.ATTR_SYSTEM: "nats",
                t.ATTR_DESTINATION: subject,
                t.ATTR_OPERATION: "send",
                t.ATTR_OPERATION_NAME: "send",
                t.ATTR_MESSAGE_ID: headers["Nats-Msg-Id"],
            },
        ):
            propagate.inject(headers)
            yield
        return
    upstream = msg.headers
    if upstream:
        for name in TRACE_HEADERS:
            if value := upstream.get(name):
                headers[name] = value
    yield


async def publish_downstream(
    msg: Msg,
    job: BaseModel | Mapping[str, Any],
    to: str | Downstream,
    *,
    key: str | None = None,
    counts: dict[str, int],
) -> PubAck:
    """``ctx.publish``: send ``job`` to the worker ``to`` names, on the upstream's connection.

    ``counts`` (per handler run) numbers the publishes to each target, for the ``Nats-Msg-Id``.
    """
    if isinstance(to, Downstream):
        target = to
    else:
        target = Downstream(ingress_of(to, msg.subject.split(".", 1)[0]))
    data, job_id = target.encode(job)
    key = key if key is not None else job_id
    subject = f"{target.ingress}.{key_token(key)}" if key else target.ingress
    n = counts[target.ingress] = counts.get(target.ingress, 0) + 1
    headers = {"Nats-Msg-Id": downstream_msg_id(msg, target.ingress, n)}
    js = msg._client.jetstream()  # noqa: SLF001 - the connection that delivered the job
    with _in_upstream_trace(msg, target.ingress, headers):
        try:
            return await publish_patiently(js, subject, data, headers)
        except NatsTimeoutError:
            if _refused(subject):
                raise PermissionError(
                    f"NATS refused the publish to {subject}: declare {target.ingress} in "
                    "PUBLISHES_TO and apply the 'permissions' output to this worker's user"
                ) from None
            raise
