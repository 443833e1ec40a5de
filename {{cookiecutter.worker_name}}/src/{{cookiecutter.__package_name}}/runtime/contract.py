"""The worker's job contract, for its producers: a JSON Schema and an AsyncAPI 3.0 document.

Both are derived, never written by hand: the schema from the pydantic job model, the document
from the settings (subject root, job type, stream, servers) and the chassis's wire conventions::

    <worker> contract --format jsonschema     # the job's JSON Schema (draft 2020-12)
    <worker> contract                         # the AsyncAPI 3.0 document (JSON)

The AsyncAPI document describes the ingress channel (``<root>.jobs.<type>``, and its keyed form
``<root>.jobs.<type>.{key}``), the dead-letter channel, the job message with its headers
(``Nats-Msg-Id``, the deduplication key, and the W3C ``traceparent``/``tracestate``), the NATS
servers and the operations: producers send, the worker receives (and sends dead letters).
A running instance serves the same through its micro service (see ``evolve/registry.py``).

:class:`Downstream` and :func:`ingress_of` name another worker's ingress, for a handler's
``ctx.publish(job, to=...)`` and for the ``PUBLISHES_TO`` setting.

Only the standard library is imported here: the CLI's start and the settings module use it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import EXIT_FAILURE, InputError, WorkerError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .settings import Settings

ASYNCAPI_VERSION = "3.0.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
FORMATS = ("asyncapi", "jsonschema")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_COMPONENT = re.compile(r"[^A-Za-z0-9_.-]")
TRACEPARENT_PATTERN = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


class ContractError(WorkerError):
    """The job model cannot be described (a field type without a JSON Schema)."""

    exit_code = EXIT_FAILURE


# --------------------------------------------------------------------------------- targets


def ingress_of(target: str, root: str) -> str:
    """The ingress subject a downstream ``target`` names.

    ``notification`` (a job type: the worker with that job type under the same subject root)
    is ``<root>.jobs.notification``; ``shop.jobs.notification`` (another root) is itself.
    Anything else raises ``ValueError`` with the fix.
    """
    target = target.strip()
    if _TOKEN.match(target):
        return f"{root}.jobs.{target}"
    tokens = target.split(".")
    if len(tokens) == 3 and tokens[1] == "jobs" and all(_TOKEN.match(t) for t in tokens):
        return target
    raise ValueError(
        f"{target!r} names no worker's ingress: give a job type under the same subject root "
        "(e.g. notification) or a full ingress subject <root>.jobs.<type> (e.g. shop.jobs.invoice)"
    )


@dataclass(frozen=True)
class Downstream:
    """Another worker's ingress, optionally with its job model (a typed target)::

        NOTIFY = Downstream.from_contract("contracts/notification-sender.json", Notification)
        ...
        await ctx.publish(Notification(id=..., to=...), to=NOTIFY)

    With a ``model``, :meth:`encode` accepts only that model's jobs, or dicts it validates.
    """

    ingress: str
    model: type[BaseModel] | None = None

    @classmethod
    def from_contract(
        cls, contract: Mapping[str, Any] | str | Path, model: type[BaseModel] | None = None
    ) -> Downstream:
        """From another worker's AsyncAPI document (``<worker> contract``): a dict, or a path."""
        if not isinstance(contract, Mapping):
            path = Path(contract)
            try:
                contract = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read the contract {path}: {exc}") from None
        assert isinstance(contract, Mapping)
        try:
            address = contract["channels"]["jobs"]["address"]
        except (KeyError, TypeError):
            raise InputError(
                "not a worker's AsyncAPI contract (no channels.jobs.address): write it with "
                "'<worker> contract --format asyncapi'"
            ) from None
        ingress = str(address)
        if _TOKEN.match(ingress):  # a bare job type is no contract's address
            raise InputError(f"the contract's ingress {ingress!r} is not a full subject")
        try:
            return cls(ingress_of(ingress, ""), model)
        except ValueError as exc:
            raise InputError(f"the contract's ingress is not usable: {exc}") from None

    def encode(self, job: BaseModel | Mapping[str, Any]) -> tuple[bytes, str | None]:
        """The job's JSON and its id (None without one), checked against ``model`` if set."""
        if self.model is not None and not isinstance(job, self.model):
            job = self.model.model_validate(job)
        if isinstance(job, Mapping):
            job_id = job.get("id")
            data = json.dumps(job, separators=(",", ":"), ensure_ascii=False).encode()
        else:
            job_id = getattr(job, "id", None)
            data = job.model_dump_json().encode()
        return data, (str(job_id) if job_id not in (None, "") else None)


# --------------------------------------------------------------------------------- JSON Schema


def _model_schema(job_model: type[BaseModel], ref_template: str) -> dict[str, Any]:
    try:
        schema: dict[str, Any] = job_model.model_json_schema(ref_template=ref_template)
    except Exception as exc:  # PydanticInvalidForJsonSchema, a custom type's error, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ContractError(
            f"the job model {job_model.__name__} has no JSON Schema ({first}): give every field a "
            "type pydantic can describe, or add json_schema_extra / WithJsonSchema to it"
        ) from None
    return schema


def json_schema(job_model: type[BaseModel]) -> dict[str, Any]:
    """The job's JSON Schema (draft 2020-12), from the pydantic model (validation mode)."""
    schema = _model_schema(job_model, "#/$defs/{model}")
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


# --------------------------------------------------------------------------------- AsyncAPI


def job_headers_schema(duplicate_window: float) -> dict[str, Any]:
    """The headers of a job message (all optional; producers should set ``Nats-Msg-Id``)."""
    return {
        "type": "object",
        "properties": {
            "Nats-Msg-Id": {
                "type": "string",
                "minLength": 1,
                "description": "Deduplication key, by convention the job's id: the stream "
                f"stores a message with a given id once within {duplicate_window:g} s "
                "(DUPLICATE_WINDOW), so a producer may safely repeat a publish it is unsure of.",
            },
            "traceparent": {
                "type": "string",
                "pattern": TRACEPARENT_PATTERN,
                "description": "W3C Trace Context: the worker's span for the job joins this "
                "trace (and so does any job its handler publishes downstream).",
                "examples": ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
            },
            "tracestate": {"type": "string", "description": "W3C Trace Context vendor state."},
        },
    }


def dead_letter_headers_schema() -> dict[str, Any]:
    """What a dead letter carries next to the original (see ``consume/dlq.py``)."""
    text = {"type": "string"}
    return {
        "type": "object",
        "properties": {
            "Dlq-Reason": {
                "type": "string",
                "enum": ["invalid", "rejected", "exhausted", "max_deliveries"],
                "description": "Why the job was dead-lettered.",
            },
            "Dlq-Error-Type": {**text, "description": "The exception's type."},
            "Dlq-Error": {**text, "description": "The error, percent-encoded UTF-8."},
            "Dlq-Deliveries": {**text, "description": "How many times it was delivered."},
            "Dlq-Subject": {**text, "description": "The subject it was stored under."},
            "Dlq-Stream": {**text, "description": "The work stream."},
            "Dlq-Sequence": {**text, "description": "Its sequence in the work stream."},
            "Dlq-Msg-Id": {**text, "description": "Its Nats-Msg-Id."},
            "Dlq-Worker-Version": text,
            "Dlq-Lane": text,
            "Dlq-Time": text,
            "Dlq-Format": {"type": "string", "enum": ["inline", "blob", "part"]},
            "Dlq-Original-Headers": {
                **text,
                "description": "inline: the original header block, base64.",
            },
            "traceparent": {"type": "string", "pattern": TRACEPARENT_PATTERN},
        },
    }


def _hoisted(job_model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job schema as AsyncAPI components: (payload reference, component schemas)."""
    schema = copy.deepcopy(_model_schema(job_model, "#/components/schemas/{model}"))
    components: dict[str, Any] = dict(schema.pop("$defs", {}))
    if set(schema) == {"$ref"}:  # a recursive model: pydantic puts itself in $defs
        return schema, components
    name = _COMPONENT.sub("_", job_model.__name__) or "Job"
    while name in components:
        name += "_"
    components[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}, components


def _servers(settings: Settings) -> dict[str, Any]:
    """NATS_URL's servers, host and port only (never credentials)."""
    servers: dict[str, Any] = {}
    for n, url in enumerate(settings.nats_url, 1):
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        scheme = parts.scheme or "nats"
        host = parts.hostname or "127.0.0.1"
        if ":" in host:  # IPv6
            host = f"[{host}]"
        websocket = scheme in ("ws", "wss")
        port = parts.port or (443 if scheme == "wss" else 80 if websocket else 4222)
        servers[f"nats{n}" if len(settings.nats_url) > 1 else "nats"] = {
            "host": f"{host}:{port}",
            "protocol": scheme if websocket else "nats",
            "description": "NATS with JetStream"
            + (" over TLS" if scheme in ("tls", "wss") else "")
            + (" (WebSocket)" if websocket else "")
            + "; the worker's NATS_URL when this document was written",
            "bindings": {"nats": {}},
        }
    return servers


def asyncapi(
    job_model: type[BaseModel], settings: Settings, *, worker: str, version: str, description: str
) -> dict[str, Any]:
    """The worker's AsyncAPI 3.0 document (a JSON-ready dict)."""
    names = settings.names
    payload, schemas = _hoisted(job_model)
    jetstream = {
        "stream": settings.stream_name,
        "dlqStream": settings.dlq_stream_name,
        "duplicateWindowSeconds": settings.duplicate_window,
        "maxDeliver": settings.max_deliver,
        "ackWaitSeconds": settings.ack_wait,
    }
    job_ref = {"$ref": "#/components/messages/job"}
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": f"urn:nats-worker:{worker}:{names.root}:{names.job_type}",
        "info": {
            "title": worker,
            "version": version,
            "description": f"{description}\n\nJobs of type `{names.job_type}` on NATS JetStream: "
            f"publish to `{names.ingress}` (or `{names.ingress}.<key>`, keyed by the job id, "
            "which keeps a job on one lane during a ramp), with `Nats-Msg-Id` set to the job "
            f"id. Jobs that cannot be handled go to `{names.dlq_subject}`.",
            "x-job-type": names.job_type,
            "x-lane": settings.lane,
        },
        "servers": _servers(settings),
        "defaultContentType": "application/json",
        "channels": {
            "jobs": {
                "address": names.ingress,
                "title": f"{names.job_type} jobs",
                "description": "The worker's ingress: what producers publish to. It never names "
                "a version; the stream routes each job to a lane.",
                "messages": {"job": job_ref},
                "x-nats-jetstream": jetstream,
            },
            "keyedJobs": {
                "address": names.ingress + ".{key}",
                "title": f"{names.job_type} jobs, keyed",
                "description": "The ingress with a routing key: jobs with one key land on one "
                "lane during a percentage ramp. The chassis's producers key every job by its id.",
                "parameters": {
                    "key": {
                        "description": "One subject token: the key itself when it is made of "
                        "letters, digits, '_', '=' and '-' (at most 64), else 'b64-' and its "
                        "unpadded base64url, or 'sha-' and 40 hex digits of its SHA-256 for a "
                        "long key.",
                        "examples": ["A-1"],
                    }
                },
                "messages": {"job": job_ref},
                "x-nats-jetstream": jetstream,
            },
            "deadLetters": {
                "address": names.dlq_subject,
                "title": "dead letters",
                "description": "Jobs that were invalid, rejected or out of attempts, each with "
                "the reason and the original message byte for byte (see the worker's 'dlq' "
                "commands). Large entries keep parts under '<address>.part'.",
                "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
                "x-nats-jetstream": {"stream": settings.dlq_stream_name},
            },
        },
        "operations": {
            "publishJob": {
                "action": "send",
                "channel": {"$ref": "#/channels/jobs"},
                "messages": [{"$ref": "#/channels/jobs/messages/job"}],
                "title": "Publish a job",
                "summary": "Producers: publish a job, with Nats-Msg-Id set to its id.",
            },
            "publishKeyedJob": {
                "action": "send",
                "channel": {"$ref": "#/channels/keyedJobs"},
                "messages": [{"$ref": "#/channels/keyedJobs/messages/job"}],
                "title": "Publish a keyed job",
                "summary": "Producers: publish a job under its routing key (sticky ramps).",
            },
            "processJob": {
                "action": "receive",
                "channel": {"$ref": "#/channels/jobs"},
                "messages": [{"$ref": "#/channels/jobs/messages/job"}],
                "title": "Process a job",
                "summary": "The worker: handles each job at least once, retrying with backoff.",
            },
            "processKeyedJob": {
                "action": "receive",
                "channel": {"$ref": "#/channels/keyedJobs"},
                "messages": [{"$ref": "#/channels/keyedJobs/messages/job"}],
                "title": "Process a keyed job",
            },
            "deadLetterJob": {
                "action": "send",
                "channel": {"$ref": "#/channels/deadLetters"},
                "messages": [{"$ref": "#/channels/deadLetters/messages/deadLetter"}],
                "title": "Dead-letter a job",
                "summary": "The worker: a job it gave up on, with the reason.",
            },
        },
        "components": {
            "messages": {
                "job": {
                    "name": "job",
                    "title": f"{names.job_type} job",
                    "contentType": "application/json",
                    "headers": job_headers_schema(settings.duplicate_window),
                    "payload": payload,
                    "correlationId": {
                        "description": "The job's deduplication key",
                        "location": "$message.header#/Nats-Msg-Id",
                    },
                },
                "deadLetter": {
                    "name": "deadLetter",
                    "title": "dead letter",
                    "contentType": "application/octet-stream",
                    "headers": dead_letter_headers_schema(),
                    "payload": {
                        "description": "Dlq-Format inline: the original payload, byte for byte; "
                        "blob: the original header block followed by it; empty for an entry "
                        "kept in parts."
                    },
                },
            },
            "schemas": schemas,
        },
    }


def document(
    fmt: str, job_model: type[BaseModel], settings: Settings, *, worker: str = "", version: str = ""
) -> dict[str, Any]:
    """``asyncapi`` or ``jsonschema``, with the package's name, version and description."""
    if fmt == "jsonschema":
        return json_schema(job_model)
    if fmt != "asyncapi":
        raise InputError(f"unknown contract format {fmt!r}: use {' or '.join(FORMATS)}")
    from .. import __version__
    from .names import DESCRIPTION, WORKER_NAME

    return asyncapi(
        job_model,
        settings,
        worker=worker or WORKER_NAME,
        version=version or __version__,
        description=DESCRIPTION,
    )
