"""Worker configuration, read once at startup from environment variables and an optional ``.env``.

Every field maps to the upper-case environment variable of the same name (``concurrency`` ->
``CONCURRENCY``). :func:`load_settings` turns a validation failure into a :class:`ConfigError`
that names the variable and the problem, and never echoes a secret's value.
"""

from __future__ import annotations

import os
import re
import socket
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .. import __version__
from .errors import ConfigError
from .names import JOB_TYPE, STREAM_NAME, SUBJECT_ROOT
from .naming import Names

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SCHEMES = {"nats", "tls", "ws", "wss"}
SECRET_FIELDS = frozenset({"nats_password", "nats_token", "nats_nkey_seed"})


def default_lane() -> str:
    """A release's lane is its major version: patch and minor releases share a consumer."""
    major = __version__.split(".", 1)[0]
    return f"v{major}" if major.isdigit() else "v0"


def redact_url(url: str) -> str:
    """Hide credentials embedded in a URL (``nats://user:secret@host``) before showing it."""
    scheme, sep, rest = url.rpartition("://")
    _userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


def default_instance_id() -> str:
    """Hostname (the pod name on Kubernetes) plus pid: unique per process, readable in status."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _downstream_ingresses(targets: list[str]) -> list[str]:
    """PUBLISHES_TO: each a job type (same root) or a full ingress subject; as given."""
    from .contract import ingress_of

    for target in targets:
        ingress_of(target, "root")  # ValueError names the entry and the fix
    return targets


class Settings(BaseSettings):
    """All knobs of the worker. See the generated README for the full table."""

    # defer_build: the validator is built once, for the user's subclass (settings.py), not also
    # for this base class nobody instantiates (about 0.25 MB of peak RSS).
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True, defer_build=True
    )

    # Connection
    nats_url: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        description="Comma-separated server URLs; list several nodes of a cluster.",
    )
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_nkey_seed: SecretStr | None = Field(default=None, description="NKey seed (SU...).")
    nats_nkey_seed_file: Path | None = None
    nats_creds: Path | None = Field(default=None, description="Path to a .creds file (JWT+seed).")
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    nats_connect_timeout: float = Field(
        default=10.0, gt=0, le=600, description="Give up connecting at startup after this long."
    )
    nats_name: str | None = None
    nats_ping_interval: float = Field(
        default=10.0,
        ge=1,
        le=600,
        description="Ping the server this often; a silent (partitioned) one is left after "
        "NATS_MAX_OUTSTANDING_PINGS unanswered pings.",
    )
    nats_max_outstanding_pings: int = Field(default=2, ge=1, le=100)

    # Topology
    subject_root: str = SUBJECT_ROOT
    job_type: str = JOB_TYPE
    stream_name: str = STREAM_NAME
    dlq_stream_name: str = f"{STREAM_NAME}_DLQ"
    lane: str = Field(default_factory=default_lane)
    consumer_name: str | None = Field(
        default=None, description="Durable consumer; defaults to <worker>-<lane>."
    )
    stream_replicas: int = Field(default=1, ge=1, le=5)
    duplicate_window: float = Field(default=120.0, gt=0, le=86_400)
    dlq_max_age: float = Field(default=14 * 86_400.0, ge=0)
    provision: bool = Field(default=True, description="Create/update streams at start.")
    publishes_to: Annotated[
        list[str], NoDecode, BeforeValidator(_split_csv), AfterValidator(_downstream_ingresses)
    ] = Field(
        default_factory=list,
        description="Where the handler's ctx.publish sends jobs: comma-separated job types "
        "under the same subject root, or ingress subjects <root>.jobs.<type> (for permissions).",
    )

    # Processing
    concurrency: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Jobs handled at once by one instance. For a handler that awaits I/O: the "
        "jobs/s wanted x (the handler's latency + 0.7 ms), plus 10 % (README, Sizing "
        "CONCURRENCY).",
    )
    fetch_batch: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Most messages asked for in one pull request; the pull window is "
        "min(CONCURRENCY, FETCH_BATCH), refilled by free slots as handling times dictate.",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="The worker's event loop: uvloop (the default: timers that overshoot less, "
        "and quick jobs 6-10 % faster in most bench runs) or asyncio (about 2.4 MB less peak "
        "RSS). uvloop falls back to asyncio where it is not installed.",
    )
    ack_wait: float = Field(default=30.0, ge=1.0, le=86_400)
    max_deliver: int = Field(default=5, ge=1, le=1000)
    backoff: Annotated[list[float], NoDecode] = Field(default_factory=lambda: [1.0, 5.0, 30.0])
    max_ack_pending: int = Field(default=1000, ge=1, le=1_000_000)
    handler_timeout: float = Field(default=300.0, gt=0, le=86_400)
    drain_timeout: float = Field(default=25.0, ge=0, le=3600)

    # Lanes, retirement and the registry
    instance_id: str = Field(default_factory=default_instance_id)
    heartbeat_interval: float = Field(default=5.0, gt=0, le=300)
    instance_ttl: float = Field(
        default=15.0, gt=0, le=3600, description="A silent instance leaves the registry after this."
    )
    auto_retire: bool = Field(
        default=True, description="Exit 0 once this lane is routed away from and drained."
    )
    retire_grace: float = Field(default=10.0, ge=0, le=3600)
    route_check_interval: float = Field(
        default=15.0, gt=0, le=3600, description="Fallback poll; route changes are pushed."
    )

    # Operations
    health_port: int = Field(
        default=8080, ge=0, le=65535, description="HTTP port for /livez and /readyz; 0 = off."
    )
    health_host: str = "0.0.0.0"  # noqa: S104 - probes come from the kubelet / container engine
    liveness_stall: float = Field(
        default=60.0, gt=0, description="/livez fails when the pull loop was silent this long."
    )
    prometheus_metrics: bool = Field(
        default=False, description="Serve Prometheus metrics at /metrics on HEALTH_PORT."
    )
    sdk_consumer_spans: bool = Field(
        default=False,
        description="Record each job's CONSUMER span with the OpenTelemetry SDK (slower) instead "
        "of the chassis's own OTLP recorder.",
    )
    loop_stall_warning: float = Field(
        default=1.0, ge=0, description="Warn when the event loop was blocked this long; 0 = off."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator("nats_url", mode="before")
    @classmethod
    def _parse_urls(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("nats_url")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        if not urls:
            raise ValueError("at least one server URL is required, e.g. nats://127.0.0.1:4222")
        for url in urls:
            parts = urlsplit(url if "://" in url else f"nats://{url}")
            try:
                ok = parts.scheme in _SCHEMES and bool(parts.hostname) and parts.port != 0
            except ValueError:  # port out of range or not a number
                ok = False
            if not ok:
                raise ValueError(
                    f"{redact_url(url)!r} is not a server URL; use nats://HOST:PORT "
                    "(or tls://, ws://, wss://), comma-separated for a cluster"
                )
        websocket = {url.split("://", 1)[0] in ("ws", "wss") for url in urls if "://" in url}
        if len(websocket) > 1 or (True in websocket and any("://" not in url for url in urls)):
            raise ValueError("mixes websocket (ws://, wss://) and nats:// or tls:// servers")
        return urls

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("backoff", mode="before")
    @classmethod
    def _parse_backoff(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("backoff")
    @classmethod
    def _check_backoff(cls, delays: list[float]) -> list[float]:
        if not delays or any(d <= 0 for d in delays):
            raise ValueError("must be a comma-separated list of positive seconds, e.g. 1,5,30")
        return delays

    @field_validator("subject_root", "job_type", "lane", "instance_id")
    @classmethod
    def _check_token(cls, value: str) -> str:
        if not _TOKEN.match(value):
            raise ValueError("must be one NATS subject token: letters, digits, '-' or '_'")
        return value

    @field_validator("stream_name", "dlq_stream_name", "consumer_name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '-' or '_' (no '.', '*', '>')")
        return value

    @field_validator(
        "nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key", "nats_nkey_seed_file"
    )
    @classmethod
    def _check_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file {str(path)!r} does not exist or is not a file")
        return path

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("NATS_TLS_CERT and NATS_TLS_KEY must be set together (mTLS)")
        if self.nats_password is not None and not self.nats_user:
            raise ValueError("NATS_PASSWORD is set but NATS_USER is not")
        if self.max_ack_pending < self.concurrency:
            raise ValueError(
                f"MAX_ACK_PENDING ({self.max_ack_pending}) must be >= CONCURRENCY "
                f"({self.concurrency}), or instances would starve each other"
            )
        if self.instance_ttl <= self.heartbeat_interval:
            raise ValueError(
                f"INSTANCE_TTL ({self.instance_ttl:g}) must be longer than HEARTBEAT_INTERVAL "
                f"({self.heartbeat_interval:g}), or live instances would flicker out of status"
            )
        if self.stream_name == self.dlq_stream_name:
            raise ValueError("STREAM_NAME and DLQ_STREAM_NAME must differ")
        return self

    @cached_property
    def names(self) -> Names:
        """Every NATS name (streams, consumers, subjects, buckets): see ``naming.py``."""
        return Names.of(self)


def _env_name(loc: tuple[int | str, ...]) -> str:
    return str(loc[0]).upper() if loc else "configuration"


def load_settings(**overrides: object) -> Settings:
    """Read the settings (the user's class, see ``binding``) or raise :class:`ConfigError`."""
    from .binding import settings_class

    try:
        return settings_class()(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            name = _env_name(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {msg}" if name != "configuration" else msg)
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
