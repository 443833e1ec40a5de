"""Connect to NATS with the configured credentials, a bounded startup retry and clear errors."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client
from nats.errors import NoServersError

from .errors import ConfigError, NotPermittedError, UnavailableError, WorkerError, describe
from .names import WORKER_NAME
from .settings import Settings, redact_url

log = logging.getLogger(__name__)
# Permission violations the server reported on any connection of this process, newest last: a
# request the server refused only times out on the client, so the CLI looks here to say why.
denied: list[str] = []
_denied_level = logging.WARNING
# getaddrinfo's "this name does not exist" answers; EAI_AGAIN (DNS unreachable) is not one of them.
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def quiet_denials() -> None:
    """One-shot commands report a refusal as their one error line, not also as a warning."""
    global _denied_level
    _denied_level = logging.DEBUG


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Build a TLS context when a CA or client certificate is configured."""
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(
        cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None
    )
    if settings.nats_tls_cert and settings.nats_tls_key:
        ctx.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
    return ctx


def connect_options(settings: Settings) -> dict[str, Any]:
    """Translate settings into ``nats.connect`` keyword arguments."""
    opts: dict[str, Any] = {
        "servers": settings.nats_url,
        "name": settings.nats_name or WORKER_NAME,
        # Reconnect forever once running: a broker restart must not kill the worker.
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
        "connect_timeout": min(2.0, settings.nats_connect_timeout),
        "pending_size": 8 * 1024 * 1024,
        # Notice a server that stopped answering (partition, frozen host) and fail over to
        # another URL; nats-py's default (2 min x 2 pings) leaves the worker idle for minutes.
        "ping_interval": settings.nats_ping_interval,
        "max_outstanding_pings": settings.nats_max_outstanding_pings,
        # A private reply prefix, so least-privilege accounts can deny other workers' inboxes.
        "inbox_prefix": settings.names.inbox_prefix,
    }
    if settings.nats_user:
        opts["user"] = settings.nats_user
        if settings.nats_password is not None:
            opts["password"] = settings.nats_password.get_secret_value()
    if settings.nats_token is not None:
        opts["token"] = settings.nats_token.get_secret_value()
    if settings.nats_nkey_seed is not None:
        opts["nkeys_seed_str"] = settings.nats_nkey_seed.get_secret_value()
    if settings.nats_nkey_seed_file is not None:
        opts["nkeys_seed"] = str(settings.nats_nkey_seed_file)
    if settings.nats_creds is not None:
        opts["user_credentials"] = str(settings.nats_creds)
    tls = tls_context(settings)
    if tls is not None:
        opts["tls"] = tls
    return opts


def _is_key_error(exc: Exception) -> bool:
    return type(exc).__module__.split(".")[0] == "nkeys" or isinstance(exc, TypeError | ValueError)


_REFUSALS = (
    "authorization violation",  # the server's -ERR
    "authorization failed",  # nats-py's AuthorizationError
    "authentication expired",  # 'User/Account Authentication Expired' (JWT expiry)
    "authentication revoked",  # 'User Authentication Revoked'
)


def _refused(text: str) -> bool:
    """The server no longer accepts the credentials."""
    text = text.lower()
    return any(refusal in text for refusal in _REFUSALS)


def lost_error(cause: BaseException | str | None) -> WorkerError:
    """The error a running worker exits with when nats-py closed its client for good."""
    text = describe(cause) if isinstance(cause, BaseException) else cause
    text = text or "closed by the client library"
    if _refused(text):
        return NotPermittedError(
            f"NATS closed the connection for good ({text}): the credentials are no longer "
            "accepted; check NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_NKEY_SEED or NATS_CREDS"
        )
    return UnavailableError(f"NATS closed the connection for good ({text})")


async def _unresolvable(settings: Settings) -> list[str]:
    """Hosts of NATS_URL whose name does not exist at all (not a temporary DNS failure)."""
    loop = asyncio.get_running_loop()
    gone = []
    for url in settings.nats_url:
        host = urlsplit(url if "://" in url else f"nats://{url}").hostname or ""
        try:
            await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                gone.append(host)
        except (OSError, UnicodeError):
            continue
    return gone


async def connect(
    settings: Settings,
    *,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_lost: Callable[[WorkerError], None] | None = None,
) -> Client:
    """Connect, retrying for at most ``NATS_CONNECT_TIMEOUT`` seconds, then fail with one line.

    nats-py applies ``max_reconnect_attempts`` to the *initial* connect too, so "reconnect
    forever" would make an unreachable server hang the start. The first connect therefore tries
    each server a bounded number of times under our own deadline; only once connected does the
    client switch to reconnecting forever (a running worker must survive broker restarts).

    A host name that does not exist (DNS: no such name, e.g. ``NATS_URL=nonsense``) for every
    server is a configuration error, reported at once (exit 78) instead of after the timeout. A
    temporary DNS failure (``EAI_AGAIN``) is retried like an unreachable server. A name that
    exists only once its container starts (compose without ``depends_on``) also fails at once:
    the supervisor's restart covers that, and the line says which name did not resolve.

    ``on_lost`` is called, once connected, when the client can no longer make progress by
    itself, with the error to exit with:

    * nats-py closed the client for good. It does so on any ``-ERR`` from the server other than
      'Stale Connection' and 'Permissions Violation' (``_process_err``): 'Maximum Payload
      Violation', 'Maximum Subscriptions Exceeded' (the server keeps the connection, nats-py
      closes it anyway), 'Authorization Violation', 'User Authentication Expired'... and when
      reconnect attempts run out (never here: they are unlimited). Auth causes give
      :class:`NotPermittedError` (77), others :class:`UnavailableError` (69).
    * Every reconnect attempt is refused for the credentials (a user revoked by a config
      reload, an expired JWT) for ``NATS_CONNECT_TIMEOUT``: nats-py would retry forever, while
      a restart re-reads credentials that were rotated meanwhile (77).

    Not fatal, and left to nats-py and liveness: 'Permissions Violation' (the connection stays
    usable; a denied pull request shows as a silent pull loop, which fails ``/livez`` after
    ``LIVENESS_STALL``), a server that closes a slow consumer (a plain disconnect: nats-py
    reconnects), and the client-side slow consumer (messages dropped, never a close). The
    caller ignores ``on_lost`` while it closes the client on purpose.
    """
    opts = connect_options(settings)
    opts["max_reconnect_attempts"] = 1
    servers = ", ".join(redact_url(u) for u in settings.nats_url)
    last_error: list[str] = []
    connected: list[Client] = []  # set once connected

    tls_errors: list[str] = []
    refused_since: list[float] = []  # first credentials refusal of the current outage

    async def error_cb(exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if "authorization" in text.lower() or "permissions" in text.lower():
            last_error.append(text)
        if connected and on_lost is not None and _refused(text) and not connected[0].is_connected:
            now = loop.time()
            if not refused_since:
                refused_since.append(now)
            elif now - refused_since[0] >= settings.nats_connect_timeout:
                on_lost(
                    NotPermittedError(
                        f"NATS refused the credentials on every reconnect for "
                        f"{now - refused_since[0]:.0f}s ({text}): check NATS_USER/NATS_PASSWORD, "
                        "NATS_TOKEN, NATS_NKEY_SEED or NATS_CREDS"
                    )
                )
        if "permissions violation" in text.lower():
            denied.append(text)
            if connected:  # a one-shot command reports it as its error; a worker logs it
                log.log(_denied_level, "nats error: %s", text)
            return
        if isinstance(exc, ssl.SSLError):
            tls_errors.append(str(exc.reason or exc))
        if connected:
            log.warning("nats error: %s", text)
        else:  # the outcome of the initial connect is reported once, below
            log.debug("connect attempt failed: %s", text)

    async def disconnected_cb() -> None:
        if connected and (connected[0].is_closed or connected[0].is_draining):
            return  # closing on purpose
        if connected:
            log.warning("disconnected from NATS; reconnecting")
        if on_disconnect is not None:
            await on_disconnect()

    async def reconnected_cb() -> None:
        refused_since.clear()
        log.info("reconnected to NATS")
        if on_reconnect is not None:
            await on_reconnect()

    async def closed_cb() -> None:
        if connected and on_lost is not None:
            on_lost(lost_error(connected[0].last_error))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.nats_connect_timeout
    delay = 0.2
    while True:
        remaining = deadline - loop.time()
        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    **opts,
                    error_cb=error_cb,
                    disconnected_cb=disconnected_cb,
                    reconnected_cb=reconnected_cb,
                    closed_cb=closed_cb,
                ),
                timeout=max(remaining, 0.5),
            )
        except (NoServersError, OSError, TimeoutError) as exc:
            if tls_errors and not any("authorization" in e.lower() for e in last_error):
                raise UnavailableError(
                    f"TLS handshake with {servers} failed ({tls_errors[-1]}): check NATS_TLS_CA, "
                    "NATS_TLS_CERT and NATS_TLS_KEY"
                ) from None
            if any("authorization" in e.lower() for e in last_error):
                raise NotPermittedError(
                    f"NATS refused the credentials at {servers}: check NATS_USER/NATS_PASSWORD, "
                    "NATS_TOKEN, NATS_NKEY_SEED or NATS_CREDS"
                ) from None
            gone = await _unresolvable(settings) if isinstance(exc, NoServersError) else []
            if gone and len(gone) == len(settings.nats_url):
                raise ConfigError(
                    f"NATS_URL: no such host {', '.join(map(repr, gone))} (DNS has no such name): "
                    "check NATS_URL, e.g. nats://HOST:4222"
                ) from None
            if loop.time() + delay >= deadline:
                raise UnavailableError(
                    f"cannot reach NATS at {servers} after {settings.nats_connect_timeout:g}s "
                    f"({type(exc).__name__}): check NATS_URL and that the server is running, "
                    "or use 'run --embedded-nats' for a local one"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        except ssl.SSLError as exc:
            raise UnavailableError(
                f"TLS handshake with {servers} failed ({exc.reason or exc}): check NATS_TLS_CA, "
                "NATS_TLS_CERT and NATS_TLS_KEY"
            ) from None
        except Exception as exc:
            # nats-py reads NATS_NKEY_SEED(_FILE) / NATS_CREDS while connecting; a bad one raises
            # nkeys' errors (or a TypeError/ValueError from the creds parser). nkeys is not
            # imported here: it pulls in PyNaCl, which a worker without NKeys need not load.
            key_material = (
                settings.nats_nkey_seed or settings.nats_nkey_seed_file or settings.nats_creds
            )
            if not key_material or not _is_key_error(exc):
                raise
            raise ConfigError(
                "NATS_NKEY_SEED, NATS_NKEY_SEED_FILE or NATS_CREDS does not hold a valid NKey "
                f"seed or creds file ({type(exc).__name__})"
            ) from None
        else:
            nc.options["max_reconnect_attempts"] = -1  # from now on: reconnect forever
            connected.append(nc)
            return nc
