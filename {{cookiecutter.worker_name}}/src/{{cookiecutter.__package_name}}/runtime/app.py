"""Compose one running instance: worker, health server, registry and lane watcher.

``serve`` is what ``run`` does; tests and other programs can call it with their own
:class:`~.binding.WorkerApp` (``install_signal_handlers=False`` and ``on_worker`` to get hold of
the worker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .binding import WorkerApp
from .consume.dlq import MaxDeliveriesRescue
from .consume.worker import Hook, Worker
from .evolve.registry import Registry
from .evolve.retirement import LaneWatcher
from .observe.health import HealthServer
from .observe.telemetry_config import setup_if_wanted
from .settings import Settings

if TYPE_CHECKING:
    from .observe.telemetry import Telemetry

log = logging.getLogger(__name__)
BACKLOG_POLL = 10.0  # seconds between consumer-info reads for the backlog gauges


def _flush(telemetry: Telemetry) -> Hook:
    async def flush() -> None:
        # A daemon thread inside shutdown() bounds the wait; to_thread keeps the loop free.
        await asyncio.to_thread(telemetry.shutdown)

    return flush


def _cancel(task: asyncio.Task[None]) -> Hook:
    async def cancel() -> None:
        task.cancel()

    return cancel


async def _poll_backlog(worker: Worker, settings: Settings, telemetry: Telemetry) -> None:
    """Keep the lane-backlog gauges fresh (gauge callbacks cannot await)."""
    assert worker.js is not None
    while True:
        try:
            info = await worker.js.consumer_info(settings.stream_name, settings.names.durable)
            telemetry.backlog["pending"] = int(info.num_pending or 0)
            telemetry.backlog["unacked"] = int(info.num_ack_pending or 0)
        except Exception as exc:  # disconnected: keep the last values
            log.debug("backlog poll failed: %s", exc)
        await asyncio.sleep(BACKLOG_POLL)


def health_checks(
    worker: Worker, settings: Settings
) -> tuple[
    Callable[[], tuple[bool, dict[str, object]]], Callable[[], tuple[bool, dict[str, object]]]
]:
    """Liveness: the loop answers, the client can still make progress, and the pull loop heard
    from the server recently. Readiness: connected, bound to the consumer, not draining."""

    def live() -> tuple[bool, dict[str, object]]:
        silent = asyncio.get_running_loop().time() - worker.last_activity_at
        nc = worker.nc
        connected = nc is not None and nc.is_connected
        # A client closed for good (or refused on every reconnect) never recovers by itself:
        # that fails liveness, from the moment it is seen until the process exits.
        closed = nc is not None and nc.is_closed and not worker.stopping.is_set()
        if worker.lost is not None or closed:
            lost = str(worker.lost) if worker.lost is not None else "NATS client closed"
            return False, {"live": False, "lost": lost, "state": worker.state}
        # A broker outage is readiness' business (a restart would not fix it); liveness fails
        # only when connected and the pull loop is silent although it expects deliveries.
        ok = not worker.ready.is_set() or not connected or silent < settings.liveness_stall
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
    app: WorkerApp,
    *,
    install_signal_handlers: bool = True,
    on_worker: Callable[[Worker], Any] | None = None,
    telemetry: Telemetry | None = None,
    dev: bool = False,
) -> int:
    """Run one instance until it is stopped or retires; return the exit code.

    The app's resources are opened before the worker connects and closed after it has drained
    and said goodbye, so no running job loses a resource under it.
    """
    if telemetry is None:
        telemetry = setup_if_wanted(settings, dev=dev)  # imports the SDK only when it is used
    async with app.lifespan(settings) as resources:
        worker = Worker(
            settings,
            app.job_model,
            app.handler,
            install_signal_handlers=install_signal_handlers,
            telemetry=telemetry,
            resources=resources,
        )
        return await _serve_worker(worker, settings, telemetry, on_worker)


async def _serve_worker(
    worker: Worker,
    settings: Settings,
    telemetry: Telemetry | None,
    on_worker: Callable[[Worker], Any] | None,
) -> int:
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
        if telemetry is not None:
            worker.closing_hooks.append(_flush(telemetry))  # runs last: after the final beat
            if telemetry.metrics:
                telemetry.observe(worker.counters.as_dict, lambda: worker.in_flight)
                poller = asyncio.create_task(_poll_backlog(worker, settings, telemetry))
                worker.closing_hooks.append(_cancel(poller))
        registry = Registry(
            worker.nc,
            settings,
            snapshot,
            ready=worker.ready,
            samples=lambda: worker.recent,
            job_model=worker.job_model,
            stop=worker.stop,
        )
        await registry.start()
        worker.closing_hooks.append(registry.stop)
        rescue = MaxDeliveriesRescue(worker.nc.jetstream(), settings)
        rescue_sub = await worker.nc.subscribe(rescue.subject, cb=rescue.on_advisory)
        worker.closing_hooks.append(rescue_sub.unsubscribe)
        watcher = LaneWatcher(worker.nc, settings, worker)
        await watcher.start()
        worker.closing_hooks.append(watcher.stop)
        worker.reconnect_hooks.append(watcher.poke)

    worker.started_hooks.append(start_community)
    health: HealthServer | None = None
    if settings.health_port:
        live, ready = health_checks(worker, settings)
        metrics_text = None
        if telemetry is not None and settings.prometheus_metrics:
            from .observe.telemetry import prometheus_text

            metrics_text = prometheus_text
        health = HealthServer(settings.health_host, settings.health_port, live, ready, metrics_text)
        await health.start()
    try:
        return await worker.run()
    finally:
        if health is not None:
            await health.stop()
