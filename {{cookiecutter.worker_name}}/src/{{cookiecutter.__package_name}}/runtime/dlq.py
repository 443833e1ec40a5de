"""The dead-letter queue: where jobs go when retrying cannot or did not help.

A DLQ entry is the original payload with the original headers, plus ``Dlq-*`` headers that say
where it came from and why it failed. The entry is published (and confirmed by the DLQ stream)
*before* the original is terminated, so a failed DLQ publish leaves the original in the work
queue: it is never lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from .. import __version__
from .errors import describe
from .publish import publish_many
from .retrying import retry
from .settings import Settings

if TYPE_CHECKING:
    from .telemetry import Telemetry

log = logging.getLogger(__name__)

H_REASON = "Dlq-Reason"  # invalid | rejected | exhausted
H_SUBJECT = "Dlq-Subject"
H_STREAM = "Dlq-Stream"
H_SEQUENCE = "Dlq-Sequence"
H_DELIVERIES = "Dlq-Deliveries"
H_ERROR_TYPE = "Dlq-Error-Type"
H_ERROR = "Dlq-Error"
H_VERSION = "Dlq-Worker-Version"
H_LANE = "Dlq-Lane"
H_TIME = "Dlq-Time"
H_MSG_ID = "Dlq-Msg-Id"
H_REPLAYED_FROM = "Dlq-Replayed-From"
DLQ_PATIENCE = 20.0  # seconds a DLQ publish is retried before the job is handed back
RESCUE_PATIENCE = 60.0  # seconds a max-deliveries rescue is retried


def entry_headers(
    original: Mapping[str, str] | None,
    settings: Settings,
    *,
    reason: str,
    subject: str,
    stream: str,
    seq: int,
    deliveries: int,
    error_type: str,
    error: str,
) -> dict[str, str]:
    """The original headers plus the ``Dlq-*`` record of where the job came from and why."""
    headers = dict(original or {})
    original_id = headers.pop("Nats-Msg-Id", None)
    headers.update(
        {
            H_REASON: reason,
            H_SUBJECT: subject,
            H_STREAM: stream,
            H_SEQUENCE: str(seq),
            H_DELIVERIES: str(deliveries),
            H_ERROR_TYPE: error_type,
            H_ERROR: error,
            H_VERSION: __version__,
            H_LANE: settings.lane,
            H_TIME: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # One DLQ entry per stored message: a retried DLQ publish is deduplicated, while
            # the same job failing after a replay (a new stream sequence) gets its own entry.
            "Nats-Msg-Id": f"dlq:{stream}:{seq}",
        }
    )
    if original_id is not None:
        headers[H_MSG_ID] = original_id
    return headers


def dlq_headers(
    msg: Msg, settings: Settings, *, reason: str, error: BaseException, deliveries: int
) -> dict[str, str]:
    meta = msg.metadata
    return entry_headers(
        msg.headers,
        settings,
        reason=reason,
        subject=msg.subject,
        stream=meta.stream,
        seq=meta.sequence.stream,
        deliveries=deliveries,
        error_type=type(error).__name__,
        error=describe(error),
    )


async def dead_letter(
    js: JetStreamContext,
    settings: Settings,
    msg: Msg,
    *,
    reason: str,
    error: BaseException,
    deliveries: int,
    attempts: int = 3,
    trace_headers: Mapping[str, str] | None = None,
) -> bool:
    """Publish a DLQ entry, then terminate the original. False (and nothing acked) on failure.

    ``trace_headers`` (the failed delivery's trace context) fill in for a producer that sent
    none, so a replay can always link back to the failed run.
    """
    headers = dlq_headers(msg, settings, reason=reason, error=error, deliveries=deliveries)
    for key, value in (trace_headers or {}).items():
        headers.setdefault(key, value)
    # Ride out a leader election of the DLQ stream (~5-7 s after a node dies: "no responders"):
    # retry for up to DLQ_PATIENCE seconds, telling the server we still hold the job. Giving up
    # early is what strands a job on its final delivery (see tests/chaos).
    tries = 0

    async def publish() -> None:
        nonlocal tries
        tries += 1
        await js.publish(settings.dlq_subject, msg.data, headers=headers, timeout=5.0)

    async def keep_the_job(_exc: Exception) -> None:
        with contextlib.suppress(Exception):
            await msg.in_progress()  # keep the job ours while the DLQ elects a leader

    try:  # timeouts, no responders during a leader election, ...
        await retry(publish, patience=DLQ_PATIENCE, min_attempts=attempts, between=keep_the_job)
    except Exception as exc:
        log.error(
            "DLQ publish failed %d times in %.0fs (%s); leaving stream seq %s for redelivery",
            tries,
            DLQ_PATIENCE,
            type(exc).__name__,
            headers[H_SEQUENCE],
        )
        return False
    await msg.term()
    return True


@dataclass(frozen=True)
class DeadLetter:
    """One DLQ entry as the ``dlq`` command shows it."""

    seq: int
    data: bytes
    headers: dict[str, str]

    @property
    def summary(self) -> dict[str, object]:
        h = self.headers
        return {
            "dlq_seq": self.seq,
            "reason": h.get(H_REASON),
            "error_type": h.get(H_ERROR_TYPE),
            "error": h.get(H_ERROR),
            "deliveries": int(h.get(H_DELIVERIES, "0") or 0),
            "subject": h.get(H_SUBJECT),
            "stream_seq": int(h.get(H_SEQUENCE, "0") or 0),
            "msg_id": h.get(H_MSG_ID),
            "worker_version": h.get(H_VERSION),
            "lane": h.get(H_LANE),
            "time": h.get(H_TIME),
            "size": len(self.data),
        }


async def iter_dead_letters(
    js: JetStreamContext, settings: Settings, limit: int | None = None
) -> AsyncIterator[DeadLetter]:
    """Walk the DLQ oldest first by direct sequence reads (no consumer is created)."""
    info = await js.stream_info(settings.dlq_stream_name)
    seq, last = info.state.first_seq, info.state.last_seq
    seen = 0
    while seq and seq <= last and (limit is None or seen < limit):
        try:
            raw: RawStreamMsg = await js.get_msg(settings.dlq_stream_name, seq=seq, next=True)
        except NotFoundError:
            return
        if raw.seq is None or raw.seq > last:
            return
        yield DeadLetter(seq=raw.seq, data=raw.data or b"", headers=dict(raw.headers or {}))
        seen += 1
        seq = raw.seq + 1


def replay_headers(entry: DeadLetter) -> dict[str, str]:
    """Original headers for the republish; the Dlq-* bookkeeping is dropped."""
    headers = {k: v for k, v in entry.headers.items() if not k.startswith("Dlq-")}
    original = entry.headers.get(H_MSG_ID)
    # A fresh dedup key per DLQ entry: the original id may still be inside the duplicate window
    # (the replay would be silently dropped), and replaying the same entry twice stays one job.
    headers["Nats-Msg-Id"] = f"{original or 'job'}:replay:{entry.seq}"
    if original:
        headers.setdefault("Job-Id", original)
    headers[H_REPLAYED_FROM] = str(entry.seq)
    return headers


async def replay(
    js: JetStreamContext,
    settings: Settings,
    entries: list[DeadLetter],
    telemetry: Telemetry | None = None,
) -> int:
    """Republish entries to the ingress subject, then delete them from the DLQ.

    With tracing on, each replay starts a new trace whose PRODUCER span links to the dead
    letter's original trace, so the failed run and the replayed run lead to each other. The span
    covers preparing the message; the publishes themselves are pipelined afterwards.
    """
    subject = settings.ingress_subject
    outgoing = []
    for entry in entries:
        headers = replay_headers(entry)
        if telemetry is not None:
            with telemetry.replaying(subject, headers, entry.headers):
                pass
        outgoing.append((subject, entry.data, headers))
    await publish_many(js, outgoing)
    for entry in entries:
        await js.delete_msg(settings.dlq_stream_name, entry.seq)
    return len(entries)


async def purge(js: JetStreamContext, settings: Settings) -> int:
    info = await js.stream_info(settings.dlq_stream_name)
    await js.purge_stream(settings.dlq_stream_name)
    return int(info.state.messages)


class MaxDeliveriesRescue:
    """Dead-letter jobs the *server* gave up on.

    A job whose every delivery killed its worker (a poison message) exceeds the consumer's
    ``max_deliver`` without the chassis ever settling it; JetStream then stops delivering it and
    publishes a MAX_DELIVERIES advisory. Every instance listens; the first one copies the stored
    message to the DLQ (its dedup id makes the others' copies no-ops) and deletes it from the
    work stream, so it is neither lost nor stuck.
    """

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self.js = js
        self.settings = settings

    @property
    def subject(self) -> str:
        s = self.settings
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s.stream_name}.{s.durable}"

    async def on_advisory(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable MAX_DELIVERIES advisory")
            return

        async def note_retry(exc: Exception) -> None:
            log.debug("max-deliveries rescue of seq %d: retrying (%s)", seq, describe(exc))

        try:  # the DLQ may be electing a leader, and the advisory comes only once
            await retry(
                lambda: self.rescue(seq, deliveries),
                patience=RESCUE_PATIENCE,
                between=note_retry,
                first_delay=0.5,
                max_delay=4.0,
            )
        except Exception as exc:  # the broker stayed busy for the whole patience
            log.error("max-deliveries rescue of seq %d failed: %s", seq, describe(exc))

    async def rescue(self, seq: int, deliveries: int) -> None:
        s = self.settings
        try:
            raw = await self.js.get_msg(s.stream_name, seq=seq)
        except NotFoundError:
            return  # already rescued (or acknowledged in the meantime)
        headers = entry_headers(
            raw.headers,
            s,
            reason="max_deliveries",
            subject=raw.subject or "",
            stream=s.stream_name,
            seq=seq,
            deliveries=deliveries,
            error_type="MaxDeliveriesExceeded",
            error="no delivery settled (the worker died each time); JetStream stopped",
        )
        await self.js.publish(s.dlq_subject, raw.data or b"", headers=headers, timeout=5.0)
        await self.js.delete_msg(s.stream_name, seq)
        log.warning(
            "job at stream seq %d dead-lettered after %d deliveries that never settled",
            seq,
            deliveries,
        )
