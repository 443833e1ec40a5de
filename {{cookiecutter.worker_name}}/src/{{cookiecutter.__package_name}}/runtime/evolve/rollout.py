"""A gated rollout: ramp a lane by steps, judge it against the stable lane, roll back on its own.

``rollout v2 --steps 1,10,50,100 --interval 60`` runs a controller (any host with the CLI):

1. **Schema gate** (before anything): v2's job model must accept whatever the stable lane's
   accepts, and a sample of the stored backlog (``contract_gate.py``; ``--force`` skips it).
2. **Smoke gate** (``--smoke FILE``, JSON lines): the jobs go straight to v2 through its smoke
   inbox (its parked filter, which only v2's consumer owns while it has no share: see
   ``naming.py``) and must all be acknowledged within ``--smoke-timeout``. A v2 that crashes at
   start, or fails a smoke job, never gets real traffic.
3. **Steps**: each step routes ``percent`` of new work to v2 (``lanes.switch``: a new route
   generation), then analyses v2 against the stable lane over the same window, from the
   instances' own counters (asked fresh through their ``status`` endpoints, the heartbeat
   standing in for a silent one) counted from the step's start:

   * failure rate = tries that did not succeed (retried or dead-lettered) / all tries. v2 fails
     when its rate exceeds the stable lane's by more than ``--max-failure-rate``. Before
     ``--min-jobs`` tries, the rate is taken over ``--min-jobs`` (unseen tries counted as
     successes): enough failures fail v2 early, but success needs ``--min-jobs`` tries;
   * latency: v2's sampled p95 above ``--max-latency-ratio`` times the stable lane's (differences
     under ``LATENCY_FLOOR_MS`` are noise and ignored).

   Verdicts are ``Successful`` (promote once the interval is over), ``Inconclusive`` (too few
   jobs: wait, never promote) and ``Failed`` (roll back at once). The last step (100) promotes.
4. **Rollback** (a failed gate, or ``rollout --abort``): new work goes 100 % to the stable lane at
   once; v2's instances are asked to retire (``retire`` endpoint: they stop pulling and hand
   their unstarted jobs back); v2's waiting jobs, and those it nak'd, move through the ingress to
   the stable lane with a dedup id (``lanes.move_backlog``); the jobs v2 dead-lettered during the
   rollout are replayed (``dlq.replay``: a fresh dedup id each). The controller exits 79.

Everything lives in one KV entry (``settings.names.rollout_key`` in the route bucket): the
definition, the phase and step, the step's start and counter baseline, the last analysis, every
decision with its reason and figures, and the controller's lease. Every write is a
compare-and-set on the revision read, so two controllers never both act: one holds the lease
(renewed every tick), another may take over only once it expired, and resumes where the state
says. A step is recorded as applied only after its route switch; a controller that died in
between re-applies it, which ``lanes.switch`` turns into "nothing to do" (the same split), so no
step is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import itertools
import json
import logging
import os
import socket
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from ..errors import InputError, RolledBackError, RouteRefusedError
from ..settings import Settings
from . import lanes
from .registry import heartbeats
from .routing import read_state

log = logging.getLogger(__name__)
FINAL = ("promoted", "rolled_back")
LATENCY_FLOOR_MS = 25.0
MAX_DECISIONS = 100
SMOKE_LIMIT = 100  # smoke jobs kept in the state (a smoke test, not a load test)


@dataclass(frozen=True)
class Gates:
    """The rollout's definition: steps, pacing and thresholds."""

    steps: tuple[int, ...] = (1, 10, 50, 100)
    interval: float = 60.0
    max_failure_rate: float = 0.05
    max_latency_ratio: float = 2.0
    min_jobs: int = 20
    smoke_timeout: float = 30.0
    lease: float = 15.0
    rollback_timeout: float = 60.0

    def check(self) -> None:
        steps = list(self.steps)
        if not steps or steps[-1] != 100 or any(not 1 <= s <= 100 for s in steps):
            raise InputError("--steps must be percentages from 1 to 100 ending at 100: 1,10,50,100")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise InputError(f"--steps must rise: {','.join(map(str, steps))}")
        if self.interval <= 0 or self.lease <= 0 or self.smoke_timeout <= 0:
            raise InputError("--interval, --lease and --smoke-timeout must be above 0 seconds")
        if not 0 <= self.max_failure_rate <= 1 or self.max_latency_ratio < 1 or self.min_jobs < 1:
            raise InputError(
                "--max-failure-rate is 0..1, --max-latency-ratio at least 1, --min-jobs at least 1"
            )


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--steps takes percentages separated by commas, not {text!r}") from None


class LeaseLostError(RouteRefusedError):
    """Another controller holds the rollout."""


def _now() -> float:
    return time.time()


def _stamp(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at if at is not None else _now()))


def _me() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------------------ figures


@dataclass
class LaneFigures:
    """One lane's tries since the step began, and its sampled handling times."""

    succeeded: int = 0
    failed: int = 0
    instances: int = 0
    p95_ms: float | None = None
    samples: int = 0

    @property
    def tries(self) -> int:
        return self.succeeded + self.failed

    @property
    def failure_rate(self) -> float:
        return self.failed / self.tries if self.tries else 0.0


async def _fresh(nc: Client, settings: Settings, beat: dict[str, Any]) -> dict[str, Any]:
    if beat.get("state") == "stopped":
        return beat
    with contextlib.suppress(Exception):
        subject = settings.names.instance_subject(str(beat.get("instance")))
        reply = await nc.request(subject, b"", timeout=0.5)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer
    return beat


async def counters(nc: Client, settings: Settings) -> dict[str, dict[str, Any]]:
    """instance -> {lane, ok, bad, recent_ms}: cumulative since the instance started."""
    beats = await heartbeats(nc.jetstream(), settings)
    out: dict[str, dict[str, Any]] = {}
    for beat in await asyncio.gather(*(_fresh(nc, settings, b) for b in beats)):
        c = beat.get("counters") or {}
        out[str(beat.get("instance"))] = {
            "lane": beat.get("lane"),
            "ok": int(c.get("processed", 0)),
            # Every try that did not succeed ends as a retry or a dead letter.
            "bad": int(c.get("retried", 0)) + int(c.get("dead_lettered", 0)),
            "recent_ms": list(beat.get("recent_ms") or []),
            "live": beat.get("state") != "stopped",
        }
    return out


def lane_figures(
    now: dict[str, dict[str, Any]], baseline: dict[str, list[int]], lane: str
) -> LaneFigures:
    fig = LaneFigures()
    samples: list[float] = []
    for instance, c in now.items():
        if c["lane"] != lane:
            continue
        ok0, bad0 = baseline.get(instance, [0, 0])
        fig.succeeded += max(0, c["ok"] - ok0)
        fig.failed += max(0, c["bad"] - bad0)
        fig.instances += 1 if c["live"] else 0
        samples += c["recent_ms"]
    fig.samples = len(samples)
    if len(samples) >= 3:
        fig.p95_ms = round(statistics.quantiles(samples, n=20, method="inclusive")[18], 3)
    return fig


def analyse(gates: Gates, new: LaneFigures, stable: LaneFigures) -> tuple[str, str]:
    """(verdict, reason): Successful, Inconclusive or Failed."""
    judged = max(new.tries, gates.min_jobs)
    rate = new.failed / judged
    excess = rate - stable.failure_rate
    if new.failed and excess > gates.max_failure_rate:
        return "Failed", (
            f"failure rate {rate:.1%} ({new.failed} of {new.tries} tries"
            + (f", judged over --min-jobs {gates.min_jobs}" if new.tries < gates.min_jobs else "")
            + f") vs stable {stable.failure_rate:.1%}: over --max-failure-rate "
            f"{gates.max_failure_rate:g} above stable"
        )
    if new.p95_ms is not None and stable.p95_ms is not None:
        limit = gates.max_latency_ratio * max(stable.p95_ms, LATENCY_FLOOR_MS)
        if new.p95_ms > limit:
            return "Failed", (
                f"p95 {new.p95_ms:g} ms vs stable {stable.p95_ms:g} ms: over "
                f"--max-latency-ratio {gates.max_latency_ratio:g}"
            )
    if new.tries < gates.min_jobs:
        return "Inconclusive", f"{new.tries} of --min-jobs {gates.min_jobs} tries so far: waiting"
    return "Successful", (
        f"failure rate {new.failure_rate:.1%} of {new.tries} tries (stable "
        f"{stable.failure_rate:.1%}), p95 {new.p95_ms if new.p95_ms is not None else '-'} ms "
        f"(stable {stable.p95_ms if stable.p95_ms is not None else '-'} ms)"
    )


# ------------------------------------------------------------------------------ state in KV


async def _kv(js: JetStreamContext, settings: Settings) -> KeyValue:
    return await js.key_value(settings.names.route_bucket)


async def read(js: JetStreamContext, settings: Settings) -> tuple[dict[str, Any] | None, int]:
    """The stored rollout state and its revision (None, 0 when there never was one)."""
    try:
        entry = await (await _kv(js, settings)).get(settings.names.rollout_key)
    except (KeyNotFoundError, NotFoundError):
        return None, 0
    if not entry.value:
        return None, int(entry.revision or 0)
    state: dict[str, Any] = json.loads(entry.value)
    return state, int(entry.revision or 0)


def summary(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``status`` shows of a rollout."""
    if state is None:
        return None
    steps = state.get("steps") or []
    step = int(state.get("step", 0))
    return {
        "lane": state.get("lane"),
        "stable": state.get("stable"),
        "phase": state.get("phase"),
        "steps": steps,
        "step": step + 1 if state.get("phase") == "step" else None,
        "percent": steps[step] if state.get("phase") == "step" and step < len(steps) else None,
        "controller": state.get("owner"),
        "lease_left_s": round(float(state.get("lease_until", 0)) - _now(), 1),
        "analysis": state.get("analysis"),
        "decisions": (state.get("decisions") or [])[-10:],
        "started_at": state.get("started_at"),
        "reason": state.get("reason"),
    }


class Controller:
    """Drives one rollout; holds its lease while it runs."""

    def __init__(self, nc: Client, settings: Settings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.me = _me()
        self.state: dict[str, Any] = {}
        self.revision = 0

    @property
    def gates(self) -> Gates:
        g = dict(self.state["gates"])
        g["steps"] = tuple(self.state["steps"])
        return Gates(**g)

    @property
    def lane(self) -> str:
        return str(self.state["lane"])

    @property
    def stable(self) -> str:
        return str(self.state["stable"])

    # --------------------------------------------------------------------------- KV writes

    async def _write(self, create: bool = False) -> None:
        kv = await _kv(self.js, self.settings)
        self.state["owner"] = self.me
        self.state["lease_until"] = _now() + self.gates.lease
        data = json.dumps(self.state).encode()
        key = self.settings.names.rollout_key
        if create:
            self.revision = int(await kv.create(key, data))
        else:
            self.revision = int(await kv.update(key, data, last=self.revision))

    async def claim(self) -> None:
        """Take the lease of the state read into ``self.state`` at ``self.revision`` (CAS)."""
        await self._write()

    async def save(self) -> None:
        """Compare-and-set; an ``--abort`` written meanwhile is merged in, a takeover ends us."""
        for _ in range(5):
            try:
                await self._write()
                return
            except KeyWrongLastSequenceError:
                stored, revision = await read(self.js, self.settings)
                if stored is None or stored.get("owner") != self.me:
                    raise LeaseLostError(
                        f"another controller ({(stored or {}).get('owner')}) took the rollout "
                        "over: this one stops"
                    ) from None
                if stored.get("abort") and not self.state.get("abort"):
                    self.state["abort"] = stored["abort"]
                self.revision = revision
        raise LeaseLostError("the rollout state keeps changing under this controller")

    def decide(self, verdict: str, reason: str, **figures: Any) -> None:
        entry = {"at": _stamp(), "phase": self.state["phase"], "verdict": verdict, "reason": reason}
        if self.state["phase"] == "step":
            entry["step"] = int(self.state["step"]) + 1
            entry["percent"] = self.state["steps"][int(self.state["step"])]
        entry.update(figures)
        decisions = self.state.setdefault("decisions", [])
        decisions.append(entry)
        del decisions[:-MAX_DECISIONS]
        log.info("rollout %s: %s: %s", self.lane, verdict, reason)

    # --------------------------------------------------------------------------- start

    async def begin(
        self, lane: str, gates: Gates, smoke: list[str], *, force: bool = False
    ) -> bool:
        """Claim the rollout: a new one, or resume one whose controller is gone. True: resumed."""
        stored, revision = await read(self.js, self.settings)
        told = False
        while stored is not None and stored.get("phase") not in FINAL:
            if stored.get("lane") != lane:
                raise RouteRefusedError(
                    f"a rollout of lane {stored.get('lane')} is in progress: wait for it "
                    "(status), or stop it with 'rollout --abort'"
                )
            left = float(stored.get("lease_until", 0)) - _now()
            if left <= 0:
                break
            if not told:  # a standby: it takes over if the running controller dies
                log.warning(
                    "controller %s runs this rollout; standing by to take over if its lease "
                    "(%.0fs left) expires",
                    stored.get("owner"),
                    left,
                )
                told = True
            await asyncio.sleep(min(left, 1.0) + 0.05)
            stored, revision = await read(self.js, self.settings)
        if stored is not None and stored.get("phase") not in FINAL:
            self.state, self.revision = stored, revision
            try:
                await self._write()
            except KeyWrongLastSequenceError:
                raise LeaseLostError("another controller took the rollout over first") from None
            self.decide("Resumed", f"controller {self.me} took over an expired lease")
            await self.save()
            return True
        route = await lanes.current_state(self.js, self.settings)
        split = route.split
        if split.current == lane:
            raise RouteRefusedError(f"lane {lane} already gets all new work: nothing to roll out")
        if split.ramping not in (None, lane):
            raise RouteRefusedError(
                f"lane {split.ramping} is ramping ({split.percent} %): finish or roll back that "
                "ramp first ('route')"
            )
        if not force:
            await lanes.require_contract(self.nc, self.settings, split.current, lane)
        dlq_seq = 0
        with contextlib.suppress(NotFoundError):
            dlq_seq = int((await self.js.stream_info(self.settings.dlq_stream_name)).state.last_seq)
        gate_fields = asdict(gates)
        steps = gate_fields.pop("steps")
        self.state = {
            "id": uuid.uuid4().hex[:12],
            "lane": lane,
            "stable": split.current,
            "steps": list(steps),
            "gates": gate_fields,
            "smoke": smoke[:SMOKE_LIMIT],
            "phase": "smoke" if smoke else "step",
            "step": 0,
            "applied": False,
            "started_at": _stamp(),
            "dlq_seq": dlq_seq,
            "decisions": [],
        }
        self.decide(
            "Started",
            f"{lane} from {split.current}: steps {','.join(map(str, steps))} every "
            f"{gates.interval:g}s" + (f", {len(smoke)} smoke job(s)" if smoke else ""),
        )
        try:
            if revision:
                self.revision = revision
                await self._write()
            else:
                await self._write(create=True)
        except KeyWrongLastSequenceError:
            raise LeaseLostError("another controller started a rollout at the same time") from None
        return False

    # --------------------------------------------------------------------------- the loop

    async def run(self) -> str:
        """Until promoted (returns the last line) or rolled back (raises RolledBackError)."""
        gates = self.gates
        tick = min(1.0, gates.interval / 4, gates.lease / 3)
        while True:
            if self.state.get("abort") and self.state["phase"] != "rolling_back":
                await self.rollback(f"aborted by hand: {self.state['abort']}")
            phase = self.state["phase"]
            if phase == "rolling_back":
                await self.rollback(str(self.state.get("reason") or "rollback resumed"))
            if phase == "smoke":
                await self.smoke()
                continue
            if phase == "promoted":
                return str(self.state.get("reason"))
            await self.step_tick()
            if self.state["phase"] == "promoted":
                await self.save()
                return str(self.state["reason"])
            await self.save()
            await asyncio.sleep(tick)
            stored, _ = await read(self.js, self.settings)
            if stored is not None and stored.get("abort") and not self.state.get("abort"):
                self.state["abort"] = stored["abort"]

    async def step_tick(self) -> None:
        gates = self.gates
        index = int(self.state["step"])
        percent = gates.steps[index]
        if not self.state.get("applied"):
            try:
                await lanes.switch(
                    self.nc,
                    self.settings,
                    self.lane,
                    percent=percent,
                    note=f"rollout step {index + 1}/{len(gates.steps)}",
                )
            except RouteRefusedError as exc:
                await self.rollback(f"step {percent} % refused: {exc}")
            self.state["applied"] = True
            self.state["step_started"] = _now()
            now = await counters(self.nc, self.settings)
            self.state["baseline"] = {i: [c["ok"], c["bad"]] for i, c in now.items()}
            self.state["waited"] = 0
            if percent >= 100:
                self.state["phase"] = "promoted"
                self.state["reason"] = (
                    f"promoted lane {self.lane}: all new work (steps "
                    f"{','.join(map(str, gates.steps))})"
                )
                self.decide("Promoted", self.state["reason"])
                return
            self.decide("Applied", f"{percent} % of new work to {self.lane}")
            await self.save()
            return
        now = await counters(self.nc, self.settings)
        baseline = self.state.get("baseline") or {}
        new = lane_figures(now, baseline, self.lane)
        stable = lane_figures(now, baseline, self.stable)
        verdict, reason = analyse(gates, new, stable)
        elapsed = _now() - float(self.state["step_started"])
        figures = {"new": asdict(new), "stable": asdict(stable), "window_s": round(elapsed, 1)}
        self.state["analysis"] = {
            "at": _stamp(),
            "step": index + 1,
            "percent": percent,
            "verdict": verdict,
            "reason": reason,
            **figures,
        }
        if verdict == "Failed":
            self.decide(verdict, reason, **figures)
            await self.rollback(f"step {percent} %: {reason}")
        if elapsed < gates.interval:
            return
        if verdict == "Successful":
            self.decide(verdict, reason, **figures)
            self.state["step"] = index + 1
            self.state["applied"] = False
        elif int(self.state.get("waited", 0)) < int(elapsed // gates.interval):
            self.state["waited"] = int(elapsed // gates.interval)
            self.decide(verdict, reason, **figures)

    # --------------------------------------------------------------------------- smoke

    async def smoke(self) -> None:
        """Publish the smoke jobs to the new lane's smoke inbox; all must be acknowledged."""
        gates = self.gates
        subject = self.settings.names.smoke_subject(self.lane)
        durable = await lanes.lane_consumer(self.js, self.settings, self.lane)
        if durable is None:
            await self.rollback(
                f"smoke: lane {self.lane} has no consumer: start its workers (LANE={self.lane})"
            )
        assert durable is not None
        info = await self.js.consumer_info(self.settings.stream_name, durable)
        filters = list(info.config.filter_subjects or [info.config.filter_subject or ""])
        if subject not in filters:
            await self.rollback(
                f"smoke: lane {self.lane} still owns stored work of an earlier route, so it "
                "has no smoke inbox: let it drain (status), then start again"
            )
        if "smoke_seqs" not in self.state:
            await self._capture_smoke()
            seqs = []
            for n, text in enumerate(self.state["smoke"]):
                ack = await self.js.publish(
                    subject,
                    text.encode(),
                    headers={
                        "Nats-Msg-Id": f"smoke:{self.state['id']}:{n}",
                        "Job-Id": f"smoke-{self.state['id']}-{n}",
                    },
                )
                seqs.append(int(ack.seq))
            self.state["smoke_seqs"] = seqs
            self.state["smoke_deadline"] = _now() + gates.smoke_timeout
            await self.save()
        seqs = list(self.state["smoke_seqs"])
        while True:
            waiting = [s for s in seqs if await self._stored(s)]
            dead = await self._dead_smoke(set(seqs))
            if dead:
                await self.rollback(
                    f"smoke: lane {self.lane} dead-lettered {len(dead)} of {len(seqs)} smoke "
                    f"job(s) ({dead[0]})"
                )
            if not waiting:
                self.decide("Successful", f"smoke: {len(seqs)} job(s) done by {self.lane}")
                self.state["phase"] = "step"
                await self.save()
                return
            if _now() >= float(self.state["smoke_deadline"]):
                live = await counters(self.nc, self.settings)
                instances = sum(1 for c in live.values() if c["lane"] == self.lane and c["live"])
                await self.rollback(
                    f"smoke: {len(waiting)} of {len(seqs)} smoke job(s) not done by lane "
                    f"{self.lane} within {gates.smoke_timeout:g}s"
                    + ("" if instances else f" (no live instance of {self.lane})")
                )
            await self.save()
            await asyncio.sleep(0.25)

    async def _capture_smoke(self) -> None:
        """Make sure the stream stores smoke inboxes: a stream last provisioned by an instance
        made from an older template captures only the ingress."""
        info = await self.js.stream_info(self.settings.stream_name)
        config = info.config
        have = list(config.subjects or [])
        missing = [s for s in self.settings.names.stream_subjects if s not in have]
        if missing:
            config.subjects = [*have, *missing]
            await self.js.update_stream(config)
            log.info("stream %s now also captures %s", self.settings.stream_name, missing)

    async def _stored(self, seq: int) -> bool:
        try:
            await self.js.get_msg(self.settings.stream_name, seq)
        except NotFoundError:
            return False
        return True

    async def _dead_smoke(self, seqs: set[int]) -> list[str]:
        from ..consume.dlq import iter_dead_letters

        found = []
        with contextlib.suppress(NotFoundError):
            async for entry in iter_dead_letters(self.js, self.settings):
                s = entry.summary
                if entry.seq > int(self.state.get("dlq_seq", 0)) and s["stream_seq"] in seqs:
                    found.append(f"{s['error_type']}: {s['error']}")
        return found

    # --------------------------------------------------------------------------- rollback

    async def rollback(self, reason: str) -> None:
        """Stable lane 100 % at once; v2 retires; its waiting and failed jobs go to the stable
        lane; raises RolledBackError. Each part is idempotent, so a successor can redo it."""
        if self.state["phase"] != "rolling_back":
            self.state["phase"] = "rolling_back"
            self.state["reason"] = reason
            self.decide("RollingBack", reason)
            await self.save()
        started = _now()
        result = await lanes.switch(
            self.nc,
            self.settings,
            self.stable,
            percent=100,
            force=True,
            note=f"rollout rollback of {self.lane}",
        )
        log.info("rollback: new work -> %s (%.0f ms)", self.stable, (_now() - started) * 1000)
        retired = await self._retire_lane()
        moved, left = await self._drain()
        replayed = await self._replay_dead_letters()
        self.state["phase"] = "rolled_back"
        self.decide(
            "RolledBack",
            reason,
            route_changed=result.changed,
            retired=retired,
            moved=moved,
            left=left,
            replayed=replayed,
        )
        await self.save()
        tail = f"; {left} still held by {self.lane}" if left else ""
        raise RolledBackError(
            f"rolled lane {self.lane} back to {self.stable}: {reason}; moved {moved} waiting "
            f"job(s), replayed {replayed} dead letter(s){tail}"
        )

    async def _retire_lane(self) -> int:
        asked = 0
        for instance, c in (await counters(self.nc, self.settings)).items():
            if c["lane"] != self.lane or not c["live"]:
                continue
            subject = self.settings.names.instance_endpoint(instance, "retire")
            with contextlib.suppress(Exception):
                await self.nc.request(subject, f"rollout rolled lane {self.lane} back".encode(), 1)
                asked += 1
        return asked

    async def _drain(self) -> tuple[int, int]:
        """Move v2's waiting jobs, and those it nak'd as they come due, until none is left."""
        for seq in self.state.get("smoke_seqs") or []:  # smoke jobs are not real work
            with contextlib.suppress(NotFoundError):
                await self.js.delete_msg(self.settings.stream_name, seq)
        deadline = _now() + self.gates.rollback_timeout
        moved = left = 0
        while True:
            chunk = max(1.0, min(self.gates.lease / 3, deadline - _now()))
            n, left = await lanes.move_backlog(self.nc, self.settings, self.lane, within=chunk)
            moved += n
            if n:
                self.state["moved"] = int(self.state.get("moved", 0)) + n
            await self.save()
            if not left or _now() >= deadline:
                return int(self.state.get("moved", moved)), left
            await asyncio.sleep(0.3)

    async def _replay_dead_letters(self) -> int:
        from ..consume import dlq

        since = int(self.state.get("dlq_seq", 0))
        smoke = set(self.state.get("smoke_seqs") or [])
        replay: list[dlq.DeadLetter] = []
        drop: list[dlq.DeadLetter] = []
        try:
            async for entry in dlq.iter_dead_letters(self.js, self.settings):
                s = entry.summary
                if entry.seq <= since or s["lane"] != self.lane:
                    continue
                (drop if s["stream_seq"] in smoke else replay).append(entry)
        except NotFoundError:
            return 0
        for entry in drop:
            await dlq.delete_entry(self.js, self.settings, entry)
        count = await dlq.replay(self.js, self.settings, replay) if replay else 0
        self.state["replayed"] = int(self.state.get("replayed", 0)) + count
        return int(self.state["replayed"])


# ------------------------------------------------------------------------------ entry points


async def run_rollout(
    nc: Client, settings: Settings, lane: str, gates: Gates, smoke: list[str], force: bool
) -> str:
    controller = Controller(nc, settings)
    resumed = await controller.begin(lane, gates, smoke, force=force)
    if resumed:
        log.warning(
            "resuming the rollout of %s at %s (the stored definition wins over these options)",
            lane,
            summary(controller.state),
        )
    return await controller.run()


async def abort(nc: Client, settings: Settings, reason: str, wait: float = 120.0) -> str:
    """Ask the running controller to roll back, or roll back here when none holds the lease."""
    js = nc.jetstream()
    while True:
        stored, revision = await read(js, settings)
        if stored is None or stored.get("phase") in FINAL:
            raise InputError("no rollout in progress: nothing to abort (see 'status')")
        stored["abort"] = reason
        try:
            kv = await _kv(js, settings)
            await kv.update(settings.names.rollout_key, json.dumps(stored).encode(), last=revision)
            break
        except KeyWrongLastSequenceError:
            continue
    deadline = _now() + wait
    while _now() < deadline:
        stored, revision = await read(js, settings)
        assert stored is not None
        if stored.get("phase") in FINAL:
            return f"aborted: {stored.get('reason')}"
        if float(stored.get("lease_until", 0)) < _now():  # nobody drives it: roll back here
            controller = Controller(nc, settings)
            controller.state, controller.revision = stored, revision
            try:
                await controller.claim()
            except KeyWrongLastSequenceError:
                continue
            try:
                await controller.rollback(f"aborted by hand: {reason}")
            except RolledBackError as exc:
                return f"aborted: {exc}"
        await asyncio.sleep(0.25)
    raise RouteRefusedError(f"the controller did not roll back within {wait:g}s: see 'status'")


async def show(nc: Client, settings: Settings) -> dict[str, Any] | None:
    stored, _ = await read(nc.jetstream(), settings)
    out = summary(stored)
    if out is not None:
        state = await read_state(nc.jetstream(), settings)
        out["route"] = state.split.as_dict() if state else None
    return out
