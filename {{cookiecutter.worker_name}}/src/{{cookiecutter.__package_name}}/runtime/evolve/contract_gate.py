"""The schema gate: may new work go to a lane whose job model differs from the current lane's?

Every instance publishes its job model's JSON Schema (the registry's ``contract`` endpoint). A
lane may take over only if its model accepts every job the current lane's model accepts, since
the jobs already queued (and those producers still send) were written for the current model.
:func:`breaking_changes` compares the two schemas, for the subset pydantic emits:

* a new required field;
* a removed field;
* a narrowed type (``str`` -> ``int``; ``int | None`` -> ``int``; ``number`` -> ``integer``);
* a new or smaller enum (or ``const``/``Literal``);
* a tighter bound (``minimum``, ``maximum``, their exclusive forms, ``minLength``,
  ``maxLength``, ``minItems``, ``maxItems``), or a new or changed ``pattern``;
* extra fields forbidden where they were allowed.

Nested models (``$ref`` into ``$defs``), lists (``items``) and dicts (``additionalProperties``)
are compared recursively. A schema the walker does not understand is never called breaking.

:func:`check` also asks the new lane to validate a sample of the stored backlog with its own
model (the ``validate`` endpoint): the most faithful test of "will it crash on queued jobs?".
"""

from __future__ import annotations

import json
import logging
from typing import Any

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from ..settings import Settings
from .registry import discover

log = logging.getLogger(__name__)
Schema = dict[str, Any]
SAMPLE = 20  # stored jobs the new lane validates
ASK_TIMEOUT = 2.0
_NUMERIC = {"integer": {"integer"}, "number": {"integer", "number"}}
_LOWER = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def _resolve(schema: Schema, root: Schema) -> Schema:
    """Follow ``$ref`` (``#/$defs/X``) and a lone ``allOf`` wrapper pydantic emits."""
    seen = 0
    while seen < 32:
        seen += 1
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            continue
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], dict):
            schema = {**all_of[0], **{k: v for k, v in schema.items() if k != "allOf"}}
            continue
        return schema
    return schema


def _branches(schema: Schema, root: Schema) -> list[Schema]:
    schema = _resolve(schema, root)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            out: list[Schema] = []
            for option in options:
                if isinstance(option, dict):
                    out += _branches(option, root)
            return out
    return [schema]


def _types(schema: Schema) -> set[str] | None:
    """The JSON types a (resolved, single-branch) schema accepts; None: any."""
    if "const" in schema:
        return {_json_type(schema["const"])}
    if "enum" in schema and isinstance(schema["enum"], list):
        return {_json_type(v) for v in schema["enum"]}
    raw = schema.get("type")
    if raw is None:
        if "properties" in schema:
            return {"object"}
        return None
    names = set(raw) if isinstance(raw, list) else {str(raw)}
    if "number" in names:
        names.add("integer")
    return names


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _accepted(schema: Schema, root: Schema) -> set[str] | None:
    """Union of the types of every branch; None when any branch accepts anything."""
    out: set[str] = set()
    for branch in _branches(schema, root):
        types = _types(branch)
        if types is None:
            return None
        out |= types
    return out


def _values(schema: Schema) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return list(enum) if isinstance(enum, list) else None


def breaking_changes(
    old: Schema,
    new: Schema,
    *,
    path: str = "",
    old_root: Schema | None = None,
    new_root: Schema | None = None,
) -> list[str]:
    """What a job valid under ``old`` may fail under ``new``, one line each, naming the field.

    Empty when ``new`` accepts (at least, as far as the walker can tell) everything ``old`` does.
    """
    old_root = old if old_root is None else old_root
    new_root = new if new_root is None else new_root
    where = path or "the job"
    problems: list[str] = []
    old_types = _accepted(old, old_root)
    new_types = _accepted(new, new_root)
    if new_types is not None:
        lost = (old_types or {"any type"}) - new_types
        if lost and not (lost == {"integer"} and "number" in new_types):
            problems.append(f"{where}: type narrowed from {_show(old_types)} to {_show(new_types)}")
            return problems
    old_branches = _branches(old, old_root)
    new_branches = _branches(new, new_root)
    if len(old_branches) != 1 or len(new_branches) != 1:
        # Unions: compare the non-null branches when each side has exactly one.
        old_real = [b for b in old_branches if b.get("type") != "null"]
        new_real = [b for b in new_branches if b.get("type") != "null"]
        if len(old_real) != 1 or len(new_real) != 1:
            return problems
        old_branches, new_branches = old_real, new_real
    o, n = old_branches[0], new_branches[0]
    new_values, old_values = _values(n), _values(o)
    if new_values is not None and (
        old_values is None or any(v not in new_values for v in old_values)
    ):
        problems.append(
            f"{where}: now restricted to {json.dumps(new_values)}"
            + (f" (was {json.dumps(old_values)})" if old_values is not None else "")
        )
    for key in _LOWER:
        if key in n and (key not in o or n[key] > o[key]):
            problems.append(f"{where}: {key} tightened to {n[key]} (was {o.get(key, 'none')})")
    for key in _UPPER:
        if key in n and (key not in o or n[key] < o[key]):
            problems.append(f"{where}: {key} tightened to {n[key]} (was {o.get(key, 'none')})")
    if "pattern" in n and n.get("pattern") != o.get("pattern"):
        problems.append(f"{where}: must now match the pattern {n['pattern']!r}")
    problems += _object_changes(o, n, path, old_root, new_root)
    if isinstance(o.get("items"), dict) and isinstance(n.get("items"), dict):
        problems += breaking_changes(
            o["items"], n["items"], path=f"{path}[]", old_root=old_root, new_root=new_root
        )
    return problems


def _object_changes(
    o: Schema, n: Schema, path: str, old_root: Schema, new_root: Schema
) -> list[str]:
    problems: list[str] = []
    old_props: dict[str, Any] = o.get("properties") or {}
    new_props: dict[str, Any] = n.get("properties") or {}
    if not old_props and not new_props:
        return problems
    old_required = set(o.get("required") or ())
    new_required = set(n.get("required") or ())
    for name in sorted(new_required - old_required):
        problems.append(f"{_join(path, name)}: new required field")
    for name in sorted(set(old_props) - set(new_props)):
        problems.append(f"{_join(path, name)}: field removed")
    for name in sorted(set(old_props) & set(new_props)):
        if isinstance(old_props[name], dict) and isinstance(new_props[name], dict):
            problems += breaking_changes(
                old_props[name],
                new_props[name],
                path=_join(path, name),
                old_root=old_root,
                new_root=new_root,
            )
    if n.get("additionalProperties") is False and o.get("additionalProperties") is not False:
        problems.append(f"{path or 'the job'}: extra fields are now forbidden")
    return problems


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(types: set[str] | None) -> str:
    if types is None:
        return "any"
    shown = sorted(types - {"integer"} if "number" in types else types)
    return " | ".join(shown)


# ------------------------------------------------------------------------------ on the wire


async def _ask(nc: Client, subject: str, payload: bytes = b"") -> dict[str, Any] | None:
    try:
        reply = await nc.request(subject, payload, timeout=ASK_TIMEOUT)
        if reply.headers and reply.headers.get("Nats-Service-Error-Code"):
            return None
        answer: dict[str, Any] = json.loads(reply.data)
        return answer
    except Exception as exc:  # an older instance without the endpoint, or gone meanwhile
        log.debug("no answer from %s: %s", subject, exc)
        return None


async def live_instance(nc: Client, settings: Settings, lane: str) -> str | None:
    """One live instance of ``lane`` (an id), or None."""

    def of_lane(info: dict[str, Any]) -> bool:
        return info.get("lane") == lane and info.get("state") in ("starting", "running")

    for info in await discover(nc, settings, enough=of_lane):
        if of_lane(info) and info.get("instance"):
            return str(info["instance"])
    return None


async def contract_of(nc: Client, settings: Settings, lane: str) -> dict[str, Any] | None:
    """The contract a live instance of ``lane`` publishes; None when none answers."""
    instance = await live_instance(nc, settings, lane)
    if instance is None:
        return None
    return await _ask(nc, settings.names.instance_endpoint(instance, "contract"))


async def stored_sample(
    nc: Client, settings: Settings, limit: int = SAMPLE
) -> list[tuple[int, str]]:
    """Up to ``limit`` stored jobs (sequence, payload text), read without consuming them."""
    js = nc.jetstream()
    subject = f"{settings.names.root}.{settings.job_type}.>"
    try:
        info = await js.stream_info(settings.stream_name)
    except NotFoundError:
        return []
    first, last, count = info.state.first_seq, info.state.last_seq, info.state.messages
    if not count:
        return []
    stride = max(1, (last - first + 1) // limit)
    out: list[tuple[int, str]] = []
    seq = first
    while seq <= last and len(out) < limit:
        try:
            msg = await js.get_msg(settings.stream_name, seq, next=True, subject=subject)
        except NotFoundError:
            break
        if msg.seq is None:
            break
        if not msg.subject or ".parked." not in msg.subject:  # smoke jobs are not the backlog
            out.append((msg.seq, (msg.data or b"").decode("utf-8", "replace")))
        seq = msg.seq + stride
    return out


async def check(nc: Client, settings: Settings, current: str, lane: str) -> list[str]:
    """Why ``lane`` may not take over from ``current``: breaking schema changes, and stored jobs
    its model rejects. Empty when it may (or when no instance answers: nothing to compare)."""
    if lane == current:
        return []
    new = await contract_of(nc, settings, lane)
    if new is None or new.get("schema") is None:
        log.info("no contract from lane %s: schema gate skipped", lane)
        return []
    problems: list[str] = []
    old = await contract_of(nc, settings, current)
    if old is not None and old.get("schema") is not None:
        problems += [
            f"lane {lane} breaks lane {current}'s job contract: {p}"
            for p in breaking_changes(old["schema"], new["schema"])
        ]
    sample = await stored_sample(nc, settings)
    instance = await live_instance(nc, settings, lane)
    if sample and instance is not None:
        body = json.dumps({"payloads": [text for _, text in sample]}).encode()
        answer = await _ask(nc, settings.names.instance_endpoint(instance, "validate"), body)
        for rejected in (answer or {}).get("rejected", [])[:3]:
            seq = sample[int(rejected["index"])][0]
            problems.append(
                f"lane {lane} rejects stored job seq {seq}: {rejected.get('error', '?')}"
            )
    return problems
