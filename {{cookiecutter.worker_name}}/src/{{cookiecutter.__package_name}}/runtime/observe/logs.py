"""Logging: one JSON object per line for machines, plain lines for people at a terminal."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from ..names import WORKER_NAME

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed with ``extra=`` (job id, subject, trace id, ...)."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """One line for people: time, level, message, then the extra fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _extras(record)
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return line


def _text(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


class JsonFormatter(logging.Formatter):
    """Flat JSON with the record's ``extra`` fields; exceptions become one ``exc`` string."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str, **static: Any) -> None:
    """Configure the root logger once; ``fmt='auto'`` picks text on a TTY, JSON otherwise."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter({"worker": WORKER_NAME, **static}))
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # nats-py logs every reconnect attempt at ERROR; our own callbacks say it once, clearly.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    # asyncio's DEBUG lines are the event loop's internals ("Using selector: ..." each time a
    # loop starts), not the worker's: even at LOG_LEVEL=DEBUG a command prints its result once.
    logging.getLogger("asyncio").setLevel(logging.INFO)
