"""Which telemetry the environment asks for. Kept free of OpenTelemetry imports, so deciding
that telemetry is *off* costs nothing at startup."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..settings import Settings

if TYPE_CHECKING:
    from .telemetry import Telemetry


def setup_if_wanted(
    settings: Settings, *, dev: bool = False, traces_only: bool = False
) -> Telemetry | None:
    """Telemetry when the environment asks for it, else None without importing the SDK.

    ``traces_only``: short CLI commands (publish, replay) have spans to send but no metrics.
    """
    traces, metrics = wanted(settings, dev=dev)
    if traces == "none" and (traces_only or not metrics):
        return None
    from .telemetry import setup

    return setup(settings, dev=dev)


def wanted(settings: Settings, *, dev: bool = False) -> tuple[str, list[str]]:
    """Which trace exporter ('otlp' | 'console' | 'none') and metric outputs this env asks for."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return "none", []
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    choice = env.get("OTEL_TRACES_EXPORTER", "").lower()
    if choice in ("otlp", "console", "none"):
        traces = choice
    elif endpoint:
        traces = "otlp"
    else:
        traces = "console" if dev else "none"
    metrics: list[str] = []
    metrics_choice = env.get("OTEL_METRICS_EXPORTER", "").lower()
    if metrics_choice == "otlp" or (
        metrics_choice != "none"
        and (
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        )
    ):
        metrics.append("otlp")
    if settings.prometheus_metrics:
        metrics.append("prometheus")
    return traces, metrics
