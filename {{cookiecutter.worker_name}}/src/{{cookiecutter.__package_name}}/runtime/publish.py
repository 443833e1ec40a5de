"""Publishing jobs: one helper for the CLI and for Python producers.

Every job is published with ``Nats-Msg-Id`` set to its id, so publishing the same job twice
within the stream's duplicate window stores it once, and to ``<root>.jobs.<type>.<id>``, so the
id is its routing key: during a ramp the same job always lands on the same lane. Bulk paths
keep many publishes in flight instead of paying a round trip per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, NotFoundError
from pydantic import BaseModel

from .connection import connect
from .consume.retrying import retry
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
            return bool((headers or {}).get("Nats-Msg-Id"))
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
        with self.telemetry.producing(subject, headers):
            return await publish_patiently(self.js, subject, data, headers)

    async def publish_all(self, jobs: Sequence[BaseModel]) -> list[PubAck]:
        if self.telemetry is None:
            return await publish_many(
                self.js, ((self.subject_for(job), *encode(job)) for job in jobs)
            )
        return list(await asyncio.gather(*(self.publish(job) for job in jobs)))
