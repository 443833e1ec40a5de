"""Rescue stranded jobs: stored, owned by a lane's filters, but behind its consumer's ack floor.

On a work-queue stream an acknowledged job is deleted, so a job that is still stored although
its lane's consumer acknowledged everything up to a later sequence was skipped: that consumer
will never deliver it. JetStream does this when a consumer gains a filter for messages it has
already passed (``ramp-notes``), and when a replica leads a consumer before it has applied the
latest route (a node that just restarted). Route steps are ordered so that neither should
happen, but nothing may be lost if one does. (The hundreds of skipped jobs per R3 ramp step the
chaos suite once saw had another cause, random buckets drawn per replica: see
``Names.route_dest``.)

Each instance sweeps its own lane at every route check: one consumer read and one direct read
per filter when nothing is stranded. A job behind the floor is only a suspect at first: while a
consumer leader changes, the floor can run ahead of jobs that are still delivered. One still
there after three ``ACK_WAIT`` periods (and a later sweep) is stranded: it is republished
through the ingress (so the current split routes it) with a ``Nats-Msg-Id`` derived from its
stream sequence, then deleted: a sweep that dies in between, or two instances sweeping at once,
leave one copy.
"""

from __future__ import annotations

import contextlib
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ..publish import publish_patiently
from ..settings import Settings
from .topology import consumer_filters

log = logging.getLogger(__name__)
STRANDED_FROM = "Stranded-Seq"
# How long (in ACK_WAITs) a job must stay behind the ack floor to count as stranded: after a
# consumer leader change, JetStream delivered some such jobs more than one ACK_WAIT later.
SUSPECT_FOR = 3


async def rescue_stranded(
    js: JetStreamContext, settings: Settings, durable: str, suspects: dict[int, float]
) -> int:
    """Republish the jobs ``durable`` skipped; returns how many were rescued.

    ``suspects`` (stream sequence -> when it was first seen behind the floor) is kept by the
    caller between sweeps; only a suspect older than ``SUSPECT_FOR`` ACK_WAITs is rescued.
    """
    now = time.monotonic()
    seen: set[int] = set()
    info = await js.consumer_info(settings.stream_name, durable)
    floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
    rescued = 0
    for subject_filter in consumer_filters(info.config):
        seq = 1
        while seq <= floor:
            try:
                raw = await js.get_msg(
                    settings.stream_name, seq=seq, next=True, subject=subject_filter
                )
            except NotFoundError:
                break
            if raw.seq is None or raw.seq > floor:
                break
            seen.add(raw.seq)
            first_seen = suspects.setdefault(raw.seq, now)
            if now - first_seen < SUSPECT_FOR * settings.ack_wait:
                seq = raw.seq + 1
                continue
            headers = {k: str(v) for k, v in (raw.headers or {}).items()}
            job_id = headers.get("Nats-Msg-Id") or "job"
            headers.update(
                {STRANDED_FROM: str(raw.seq), "Nats-Msg-Id": f"{job_id}:stranded:{raw.seq}"}
            )
            headers.setdefault("Job-Id", job_id)
            subject = settings.names.ingress_for_stored(raw.subject or "")
            await publish_patiently(js, subject, raw.data or b"", headers)
            # NotFound: another instance rescued it first, and our copy was deduplicated
            with contextlib.suppress(NotFoundError):
                await js.delete_msg(settings.stream_name, raw.seq)
            rescued += 1
            seq = raw.seq + 1
    for gone in set(suspects) - seen:  # delivered after all, or rescued
        del suspects[gone]
    if rescued:
        log.warning(
            "rescued %d job(s) that consumer %s had skipped (stored behind its ack floor %d); "
            "republished through the ingress",
            rescued,
            durable,
            floor,
        )
    return rescued
