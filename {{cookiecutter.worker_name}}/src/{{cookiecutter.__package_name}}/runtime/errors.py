"""Errors and exit codes.

Control flow raised by handlers::

    HandlerSignal
    ├── Retry    -- try again after a delay (counts toward MAX_DELIVER)
    └── Reject   -- dead-letter now, never retry

Errors the chassis reports to the operator (one line, a documented exit code)::

    WorkerError
    ├── ConfigError       -- bad setting           -> EXIT_CONFIG (78)
    ├── UnavailableError  -- cannot reach NATS, or -> EXIT_UNAVAILABLE (69)
    │                        it closed for good
    ├── ProvisionError    -- stream/consumer clash -> EXIT_PROVISION (73)
    ├── RouteRefusedError -- route change refused  -> EXIT_REFUSED (75)
    ├── NotPermittedError -- account not allowed,  -> EXIT_NOPERM (77)
    │                        or credentials refused
    ├── RolledBackError   -- a rollout failed a    -> EXIT_ROLLED_BACK (79)
    │                        gate and was rolled back
    └── InputError        -- bad CLI input         -> EXIT_DATAERR (65)
"""

from __future__ import annotations

# Exit codes follow BSD sysexits.h where one fits, so supervisors can tell them apart.
EXIT_OK = 0  # normal stop, drained on a signal, or retired after its lane was routed away
EXIT_FAILURE = 1  # unexpected crash (a bug): the traceback is logged
EXIT_USAGE = 2  # bad command-line usage (argparse)
EXIT_DATAERR = 65  # bad input given to a CLI command (e.g. a publish payload that is not a job)
EXIT_UNAVAILABLE = 69  # NATS unreachable after the bounded connect retry, or closed for good
EXIT_PROVISION = 73  # stream or consumer exists with settings JetStream cannot change in place
EXIT_REFUSED = 75  # route refused: the target lane has no live instance, or no earlier lane
EXIT_NOPERM = 77  # the NATS account may not do what was asked, or its credentials were refused
EXIT_CONFIG = 78  # invalid configuration (env var, .env file, missing creds/TLS file)
EXIT_ROLLED_BACK = 79  # a gated rollout failed a gate (or was aborted) and rolled back
EXIT_INTERRUPTED = 130  # a second signal forced a fast stop; unfinished jobs were handed back


JETSTREAM_UNAVAILABLE = (
    "JetStream is not available on this server or account: start nats-server with -js "
    "(or enable JetStream for the account), then try again"
)


class HandlerSignal(Exception):  # noqa: N818 - these are signals, not failures
    """Base of the exceptions a handler raises to steer what happens to its job."""


class Retry(HandlerSignal):
    """Ask for another attempt after ``delay`` seconds (``None``: the configured backoff)."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class Reject(HandlerSignal):
    """Send the job to the dead-letter queue now; retrying cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HandlerTimeoutError(Exception):
    """The handler ran longer than HANDLER_TIMEOUT; treated like any other failure."""


class WorkerError(Exception):
    """An operator-facing error: printed as one line, then exit with ``exit_code``."""

    exit_code = EXIT_FAILURE


class ConfigError(WorkerError):
    """A setting is invalid. The message names the variable and the fix."""

    exit_code = EXIT_CONFIG


class UnavailableError(WorkerError):
    """NATS could not be reached within the bounded startup retry, or (running) the client was
    closed for good and the process must be restarted."""

    exit_code = EXIT_UNAVAILABLE


class ProvisionError(WorkerError):
    """The stream or consumer exists with settings that cannot be changed in place."""

    exit_code = EXIT_PROVISION


class RouteRefusedError(WorkerError):
    """A route change was refused: the target lane has nobody to do the work, or a rollback has
    no earlier lane to go back to. Nothing was changed."""

    exit_code = EXIT_REFUSED


class NotPermittedError(WorkerError):
    """The NATS account is not allowed to do this, or its credentials are no longer accepted."""

    exit_code = EXIT_NOPERM


class RolledBackError(WorkerError):
    """A gated rollout (``rollout``) failed a gate, or was aborted, and rolled the new lane back:
    new work goes to the stable lane again, and the new lane's waiting and failed jobs with it.
    The message is the reason, with the figures behind it."""

    exit_code = EXIT_ROLLED_BACK


class InputError(WorkerError):
    """Input given to a CLI command is not usable."""

    exit_code = EXIT_DATAERR


def describe(exc: BaseException, limit: int = 1024) -> str:
    """One line about an error, for logs and DLQ headers (pydantic's report is multi-line)."""
    from pydantic import ValidationError  # imported by then; here so the CLI starts fast

    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        parts = [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in errors[:3]
        ]
        if len(errors) > 3:
            parts.append(f"and {len(errors) - 3} more")
        text = "; ".join(parts)
    else:
        try:
            text = str(exc)
        except Exception:  # an exception whose __str__ fails still gets a line: its type
            text = ""
    # One printable line: the text may quote a hostile payload (a field name), and it ends up in
    # a NATS header and a log line.
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
