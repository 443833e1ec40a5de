"""The route as data: route generations, each with its split, kept in KV and applied to the server.

New work lands in the *current generation*: the stream's subject transform stamps every stored job
with ``g<gen>`` and its bucket (see ``split.py``). Each lane's durable consumer owns, through its
``filter_subjects``, its buckets in every generation that may still hold jobs. A new split is a
new generation, so what is already stored never changes hands:

1. write the new state (generation N+1, its split) to KV, compare-and-set on the revision read;
2. give every lane its filters for N+1 (safe: nothing is stored there yet, and the split's
   buckets are disjoint, as a work-queue stream requires);
3. point the stream's transform at N+1 (one ``update_stream``: the switch);
4. drop generations older than N+1 that the stream no longer holds, again with compare-and-set.

Only generations *older* than the committed one are ever dropped, and every change is a
compare-and-set on one KV entry, so clean-up cannot race a ramp step (the race that stranded
1,417 jobs in the prototype: an empty, brand-new generation dropped during a step).

Streams made by the template before generations (transform ``<root>.jobs.>`` ->
``<root>.<lane>.>``) are upgraded in place: the old lane keeps a *legacy* filter until its
stored backlog is gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamInfo
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from ..consume.retrying import retry
from ..names import WORKER_NAME
from ..settings import Settings
from .split import Split, generation_filters
from .topology import ensure_bucket

log = logging.getLogger(__name__)
STATE_KEY = "split"
KV_PATIENCE = 20.0  # seconds a route KV write waits for its bucket's stream to have a leader
T = TypeVar("T")


async def kv_write(call: Callable[[], Awaitable[T]]) -> T:
    """A write to the route's KV bucket that rides out its stream's leader election.

    Only "no responders" is retried: nothing was stored, so the write can be repeated as is. On
    a replicated bucket created a moment earlier (a worker's first start on a cluster) the chaos
    suite saw the first write find no leader yet. A timeout is not retried: a compare-and-set
    that did land would then fail as "changed meanwhile" and be read as someone else's step.
    """

    async def nobody_answered(exc: Exception) -> bool:
        return isinstance(exc, NoStreamResponseError | NoRespondersError)

    return await retry(call, patience=KV_PATIENCE, should_retry=nobody_answered)


class StateChangedError(Exception):
    """Someone else changed the route between our read and our write: read again."""


@dataclass(frozen=True)
class RouteState:
    """Which lanes get new work, and which generations may still hold jobs."""

    gen: int
    split: Split
    generations: dict[int, Split] = field(default_factory=dict)  # live ones, including gen
    legacy: tuple[str, ...] = ()  # lanes with backlog stored as <root>.<lane>.>
    previous: Split | None = None  # the split before the last change (for --rollback)
    revision: int = 0  # KV revision this state was read at (0: not stored yet)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "gen": self.gen,
                "split": self.split.as_dict(),
                "generations": {str(g): s.as_dict() for g, s in sorted(self.generations.items())},
                "legacy": list(self.legacy),
                "previous": self.previous.as_dict() if self.previous else None,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, revision: int) -> RouteState:
        raw = json.loads(data)
        previous = raw.get("previous")
        return cls(
            gen=int(raw["gen"]),
            split=Split.from_dict(raw["split"]),
            generations={int(g): Split.from_dict(s) for g, s in raw["generations"].items()},
            legacy=tuple(raw.get("legacy") or ()),
            previous=Split.from_dict(previous) if previous else None,
            revision=revision,
        )

    def lanes(self) -> list[str]:
        """Every lane that owns buckets in a live generation, or legacy backlog."""
        seen: dict[str, None] = {}
        for split in [self.split, *self.generations.values()]:
            for lane in split.lanes:
                seen[lane] = None
        for lane in self.legacy:
            seen[lane] = None
        return list(seen)

    def generations_of(self, lane: str) -> list[int]:
        return sorted(g for g, s in self.generations.items() if s.share(lane))

    def step(self, split: Split) -> RouteState:
        """The state after routing new work by ``split``: a new generation."""
        gen = self.gen + 1
        return replace(
            self,
            gen=gen,
            split=split,
            generations={**self.generations, gen: split},
            previous=self.split,
        )


def lane_filters(settings: Settings, state: RouteState | None, lane: str) -> list[str]:
    """Every subject ``lane``'s consumer must own under ``state``."""
    filters: list[str] = []
    if state is not None:
        for gen, split in sorted(state.generations.items()):
            ranks = split.ranks(lane)
            if ranks:
                filters += generation_filters(
                    settings.names.generation_prefix(gen), settings.job_type, ranks
                )
        if lane in state.legacy:
            filters.append(settings.names.legacy_lane_filter(lane))
    return filters or [settings.names.parked_filter(lane)]


# ------------------------------------------------------------------------------ KV


async def ensure_state_bucket(js: JetStreamContext, settings: Settings) -> bool:
    """The route's KV bucket: the state (``split``) and the history (``route``)."""
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=settings.names.route_bucket,
            history=64,
            storage=StorageType.FILE,
            replicas=settings.stream_replicas,
            description=f"{WORKER_NAME} route state and history",
        ),
    )


async def _bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    return await js.key_value(settings.names.route_bucket)


async def read_state(js: JetStreamContext, settings: Settings) -> RouteState | None:
    """The stored state; None before the first worker provisioned the stream."""
    try:
        kv = await _bucket(js, settings)
        entry = await kv.get(STATE_KEY)
    except (BucketNotFoundError, KeyNotFoundError, NotFoundError):
        return None
    if not entry.value:
        return None
    return RouteState.from_json(entry.value, int(entry.revision or 0))


async def write_state(js: JetStreamContext, settings: Settings, state: RouteState) -> RouteState:
    """Compare-and-set against ``state.revision``; raises StateChangedError when it moved."""
    kv = await _bucket(js, settings)
    try:
        if state.revision:
            revision = await kv_write(
                lambda: kv.update(STATE_KEY, state.to_json(), last=state.revision)
            )
        else:
            revision = await kv_write(lambda: kv.create(STATE_KEY, state.to_json()))
    except KeyWrongLastSequenceError:
        raise StateChangedError("the route changed meanwhile") from None
    return replace(state, revision=int(revision))


def initial_state(settings: Settings, info: StreamInfo | None) -> RouteState:
    """The state for a stream that has none: new, or made before generations (legacy)."""
    legacy_lane = None
    if info is not None and info.config.subject_transform is not None:
        legacy_lane = settings.names.legacy_lane_of_route(info.config.subject_transform.dest)
    split = Split(current=legacy_lane or settings.lane)
    legacy = (legacy_lane,) if legacy_lane else ()
    return RouteState(gen=1, split=split, generations={1: split}, legacy=legacy)


NO_MESSAGE = 10037  # JetStream's err_code for "no message found"


async def generation_empty(js: JetStreamContext, settings: Settings, subject: str) -> bool:
    """Whether the stream surely holds no message under ``subject`` (a read, no consumer).

    Only the server's "no message found" counts as empty. Any other answer, a 404 for a stream
    that is electing a leader included, counts as "not known to be empty": dropping a
    generation that still holds jobs would strand them (the chaos suite saw that, with a node
    down).
    """
    try:
        await js.get_msg(settings.stream_name, seq=1, next=True, subject=subject)
    except NotFoundError as exc:
        return exc.err_code == NO_MESSAGE
    except Exception as exc:  # timeouts, elections: not empty as far as we know
        log.debug("could not tell whether %s is empty: %s", subject, exc)
    return False


async def prune(js: JetStreamContext, settings: Settings, state: RouteState) -> RouteState:
    """Drop generations older than the current one, and legacy lanes, that hold nothing."""
    gone_gens = [
        g
        for g in state.generations
        if g < state.gen
        and await generation_empty(js, settings, f"{settings.names.generation_prefix(g)}.>")
    ]
    gone_legacy = [
        lane
        for lane in state.legacy
        if await generation_empty(js, settings, settings.names.legacy_lane_filter(lane))
    ]
    if not gone_gens and not gone_legacy:
        return state
    pruned = replace(
        state,
        generations={g: s for g, s in state.generations.items() if g not in gone_gens},
        legacy=tuple(lane for lane in state.legacy if lane not in gone_legacy),
    )
    pruned = await write_state(js, settings, pruned)
    log.info(
        "route: dropped emptied generation(s) %s%s",
        ", ".join(f"g{g}" for g in sorted(gone_gens)) or "-",
        f" and legacy backlog of {', '.join(gone_legacy)}" if gone_legacy else "",
    )
    return pruned


def describe_split(split: Split) -> str:
    if split.ramping and split.percent:
        return f"{split.ramping} {split.percent}% / {split.current} {100 - split.percent}%"
    return f"{split.current} 100%"
