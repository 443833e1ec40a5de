"""The worker community: who is alive, in which lane, doing what.

Two views, both plain NATS:

* every instance is a NATS micro service (``nats micro ls``, ``$SRV.PING|INFO|STATS.<worker>``)
  with metadata lane, instance and state: it answers only while its process lives;
* every instance also answers ``contract`` (its job model's JSON Schema: what ``route`` and
  ``rollout`` compare between lanes), ``validate`` (does its model accept these payloads? run on a
  sample of the stored backlog) and ``retire`` (stop now, as a rollback asks of a bad lane);
* every instance puts a heartbeat (state, counters, in-flight) into a KV bucket whose entries
  expire after ``INSTANCE_TTL``: a killed instance drops out of ``status`` within that time, and a
  stopped one leaves its final ``stopped`` heartbeat behind until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from nats import micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue
from nats.micro.request import Request
from nats.micro.service import Service

from ... import __version__
from ..errors import describe
from ..names import DESCRIPTION, WORKER_NAME
from ..settings import Settings
from .topology import ensure_bucket

if TYPE_CHECKING:
    from pydantic import BaseModel

log = logging.getLogger(__name__)
Snapshot = Callable[[], dict[str, Any]]
WINDOW = 60.0  # seconds of history behind each heartbeat's succeeded/failed counts


async def ensure_registry_bucket(js: JetStreamContext, settings: Settings) -> bool:
    """Create the heartbeat bucket if missing; True when it was created."""
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=settings.names.registry_bucket,
            history=1,
            ttl=settings.instance_ttl,
            storage=StorageType.MEMORY if settings.stream_replicas == 1 else StorageType.FILE,
            replicas=settings.stream_replicas,
            description=f"{WORKER_NAME} instance heartbeats",
        ),
    )


class Registry:
    """Register this instance and keep its heartbeat fresh until :meth:`stop`."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        snapshot: Snapshot,
        ready: asyncio.Event | None = None,
        samples: Callable[[], Iterable[float]] | None = None,
        job_model: type[BaseModel] | None = None,
        stop: Callable[[str], None] | None = None,
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.snapshot = snapshot
        self._ready = ready  # beat as soon as it is set: status shows "running" at once
        self._samples = samples  # recent handling times (s), for the status endpoint
        self._job_model = job_model  # for the contract and validate endpoints
        self._stop = stop  # for the retire endpoint
        self._retire_asked = False
        self._history: deque[tuple[float, int, int]] = deque(maxlen=64)  # (t, done, failed)
        self.instance = settings.instance_id
        self._service: Service | None = None
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._metadata: dict[str, str] = {
            "lane": settings.lane,
            "instance": self.instance,
            "state": "starting",
            "stream": settings.stream_name,  # one worker name may serve several deployments
        }

    async def start(self) -> None:
        self._service = await micro.add_service(
            self.nc,
            name=WORKER_NAME,
            version=__version__,
            description=DESCRIPTION,
            metadata=self._metadata,
        )
        await self._service.add_endpoint(
            name="status",
            subject=self.settings.names.instance_subject(self.instance),
            handler=self._answer_status,
            metadata={"lane": self.settings.lane},
        )
        for name, handler in (
            ("contract", self._answer_contract),
            ("validate", self._answer_validate),
            ("retire", self._answer_retire),
        ):
            await self._service.add_endpoint(
                name=name,
                subject=self.settings.names.instance_endpoint(self.instance, name),
                handler=handler,
                metadata={"lane": self.settings.lane},
            )
        try:
            self._kv = await self.nc.jetstream().key_value(self.settings.names.registry_bucket)
        except BucketNotFoundError:
            log.warning(
                "heartbeat bucket %s missing: run 'provision'; heartbeats are off",
                self.settings.names.registry_bucket,
            )
        await self.beat()
        self._task = asyncio.create_task(self._loop())

    async def _answer_status(self, req: Request) -> None:
        """A fresh snapshot, with the sampled handling times (status merges them per lane)."""
        payload = self._payload()
        if self._samples is not None:
            payload["recent_ms"] = [round(s * 1000, 3) for s in self._samples()]
        await req.respond(json.dumps(payload).encode())

    def contract(self) -> dict[str, Any]:
        """What this instance accepts: its job model's JSON Schema (None without a model)."""
        schema = self._job_model.model_json_schema() if self._job_model is not None else None
        return {
            "worker": WORKER_NAME,
            "job_type": self.settings.job_type,
            "lane": self.settings.lane,
            "version": __version__,
            "schema": schema,
            "asyncapi": self._asyncapi(),  # what '<worker> contract' writes (see contract.py)
        }

    def _asyncapi(self) -> dict[str, Any] | None:
        from ..contract import document

        if self._job_model is None:
            return None
        return document("asyncapi", self._job_model, self.settings)

    async def _answer_contract(self, req: Request) -> None:
        await req.respond(json.dumps(self.contract()).encode())

    async def _answer_validate(self, req: Request) -> None:
        """``{"payloads": [text, ...]}`` -> ``{"rejected": [{"index", "error"}, ...]}``, judged
        by this instance's own model (the most faithful answer to "would it take these?")."""
        rejected: list[dict[str, Any]] = []
        try:
            payloads = json.loads(req.data)["payloads"]
        except (ValueError, KeyError, TypeError):
            await req.respond_error("400", 'send {"payloads": [json text, ...]}')
            return
        if self._job_model is not None:
            for index, payload in enumerate(payloads):
                try:
                    self._job_model.model_validate_json(payload)
                except Exception as exc:
                    rejected.append({"index": index, "error": describe(exc, 300)})
        await req.respond(json.dumps({"rejected": rejected}).encode())

    async def _answer_retire(self, req: Request) -> None:
        """Stop now (drain: unstarted jobs go back, running ones finish); for a rollback."""
        reason = req.data.decode(errors="replace")[:200] or "asked to retire"
        await req.respond(json.dumps({"instance": self.instance, "retiring": True}).encode())
        if self._stop is not None and not self._retire_asked:
            self._retire_asked = True  # a second stop() would cut the drain short
            log.info("retiring on request: %s", reason)
            self._stop(f"retired: {reason}")

    def _window(self, counters: dict[str, int]) -> dict[str, float]:
        """Jobs succeeded and failed over the last ``WINDOW`` seconds of heartbeats."""
        now = time.monotonic()
        done, failed = counters.get("processed", 0), counters.get("failed", 0)
        failed += counters.get("dead_lettered", 0)
        if not self._history or now - self._history[-1][0] >= 1.0:
            self._history.append((now, done, failed))
        while len(self._history) > 1 and now - self._history[1][0] >= WINDOW:
            self._history.popleft()
        t0, done0, failed0 = self._history[0]
        return {
            "seconds": round(now - t0, 1),
            "succeeded": done - done0,
            "failed": failed - failed0,
        }

    def _payload(self, state: str | None = None) -> dict[str, Any]:
        snap = self.snapshot()
        if state is not None:
            snap["state"] = state
        snap["window"] = self._window(snap.get("counters") or {})
        self._metadata["state"] = str(snap.get("state", "running"))  # live in $SRV.INFO
        return {
            "instance": self.instance,
            "lane": self.settings.lane,
            "version": __version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ts": time.time(),
            **snap,
        }

    async def beat(self, state: str | None = None) -> None:
        payload = self._payload(state)
        if self._kv is None:
            return
        try:
            await self._kv.put(self.instance, json.dumps(payload).encode())
        except Exception as exc:  # a missed heartbeat is not worth a crash
            log.debug("heartbeat failed: %s", exc)

    async def _loop(self) -> None:
        if self._ready is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), self.settings.heartbeat_interval)
            await self.beat()
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            await self.beat()

    async def stop(self) -> None:
        """Final heartbeat says ``stopped``; then leave the micro registry."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.nc.is_connected:  # during an outage the final beat would only wait and fail
            await self.beat("stopped")
        else:
            log.info("final heartbeat skipped: not connected (the entry expires by itself)")
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
            self._service = None


async def discover(
    nc: Client,
    settings: Settings,
    window: float = 0.5,
    enough: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Ask every live instance of this stream (``$SRV.INFO.<worker>``) for ``window`` seconds,
    or only until one answer satisfies ``enough`` (``route`` needs just one live instance).

    Instances of the same worker serving another stream on the account (staging next to
    production, say) answer too; their metadata names their stream, and they are left out.
    """
    inbox = nc.new_inbox()
    found: list[dict[str, Any]] = []
    satisfied = asyncio.Event()

    async def collect(msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            info = json.loads(msg.data)
            answer = {
                **info.get("metadata", {}),
                "version": info.get("version"),
                "id": info.get("id"),
            }
            if answer.get("stream") != settings.stream_name:
                return
            found.append(answer)
            if enough is not None and enough(answer):
                satisfied.set()

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(f"$SRV.INFO.{WORKER_NAME}", b"", reply=inbox)
        await nc.flush()
        # Scatter-gather: answers have no count to wait for, so the window bounds the wait.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(satisfied.wait(), window)
    finally:
        await sub.unsubscribe()
    return found


async def heartbeats(js: JetStreamContext, settings: Settings) -> list[dict[str, Any]]:
    """The latest heartbeat of every instance seen within ``INSTANCE_TTL``."""
    try:
        kv = await js.key_value(settings.names.registry_bucket)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError, NotFoundError):
        return []
    out = []
    now = time.time()
    for key in keys:
        try:
            entry = await kv.get(key)
        except Exception as exc:  # expired between keys() and get()
            log.debug("heartbeat %s vanished: %s", key, exc)
            continue
        if entry.value:
            beat = json.loads(entry.value)
            beat["age_s"] = round(max(0.0, now - float(beat.get("ts", now))), 1)
            out.append(beat)
    out.sort(key=lambda b: (str(b.get("lane")), str(b.get("instance"))))
    return out
