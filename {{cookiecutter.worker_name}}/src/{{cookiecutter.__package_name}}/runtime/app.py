"""Compose one running instance: worker, health server, registry and lane watcher.

``serve`` is what ``run`` does; tests and other programs can call it with their own job model and
handler (``install_signal_handlers=False`` and ``on_worker`` to get hold of the worker).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from .health import HealthServer
from .registry import Registry
from .retirement import LaneWatcher
from .settings import Settings
from .worker import Handler, Worker


def health_checks(
    worker: Worker, settings: Settings
) -> tuple[
    Callable[[], tuple[bool, dict[str, object]]], Callable[[], tuple[bool, dict[str, object]]]
]:
    """Liveness: the loop answers and the pull loop heard from the server recently.
    Readiness: connected, bound to the consumer, not draining."""

    def live() -> tuple[bool, dict[str, object]]:
        silent = asyncio.get_running_loop().time() - worker.last_activity_at
        ok = not worker.ready.is_set() or silent < settings.liveness_stall
        return ok, {"live": ok, "pull_silent_s": round(silent, 1), "state": worker.state}

    def ready() -> tuple[bool, dict[str, object]]:
        connected = worker.nc is not None and worker.nc.is_connected
        ok = connected and worker.ready.is_set() and not worker.stopping.is_set()
        return ok, {
            "ready": ok,
            "connected": connected,
            "state": worker.state,
            "in_flight": worker.in_flight,
        }

    return live, ready


async def serve(
    settings: Settings,
    job_model: type[BaseModel],
    handler: Handler,
    *,
    install_signal_handlers: bool = True,
    on_worker: Callable[[Worker], Any] | None = None,
) -> int:
    """Run one instance until it is stopped or retires; return the exit code."""
    worker = Worker(settings, job_model, handler, install_signal_handlers=install_signal_handlers)
    if on_worker is not None:
        on_worker(worker)

    def snapshot() -> dict[str, Any]:
        return {
            "state": worker.state,
            "in_flight": worker.in_flight,
            "counters": worker.counters.as_dict(),
        }

    async def start_community() -> None:
        assert worker.nc is not None
        registry = Registry(worker.nc, settings, snapshot)
        await registry.start()
        worker.closing_hooks.append(registry.stop)
        watcher = LaneWatcher(worker.nc, settings, worker)
        await watcher.start()
        worker.closing_hooks.append(watcher.stop)
        worker.reconnect_hooks.append(watcher.poke)

    worker.started_hooks.append(start_community)
    health: HealthServer | None = None
    if settings.health_port:
        live, ready = health_checks(worker, settings)
        health = HealthServer(settings.health_host, settings.health_port, live, ready)
        await health.start()
    try:
        return await worker.run()
    finally:
        if health is not None:
            await health.stop()
