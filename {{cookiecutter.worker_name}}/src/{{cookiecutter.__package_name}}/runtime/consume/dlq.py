"""The dead-letter queue: where jobs go when retrying cannot or did not help.

An entry keeps the original message *byte for byte*: its payload and its exact header block (read
back from the work stream by sequence, never from nats-py's parsed ``msg.headers``, which loses
bytes), next to ``Dlq-*`` headers that say where it came from and why it failed. The entry is
published (and confirmed by the DLQ stream) *before* the original is terminated, so a failed DLQ
publish leaves the original in the work queue: it is never lost.

Entry forms (the ``Dlq-Format`` header):

``inline``
    The body is the original payload. The original header block (``NATS/1.0`` line, every
    ``Name: value`` line as sent, duplicates and odd names included) is carried base64-encoded in
    ``Dlq-Original-Headers`` (absent when the original had none).
``blob``
    Used when the base64 header block does not fit JetStream's header limit. The body is the
    original header block followed by the payload; ``Dlq-Original-Headers-Size`` says how many
    leading bytes are the header block.
``part``
    A continuation on ``<DLQ subject>.part``, never listed on its own. When an entry does not fit
    ``max_payload`` as one message (a payload close to the limit plus the metadata), its content
    (the inline payload, or the blob) goes into part messages published first; the entry itself,
    published last, has an empty body and lists their DLQ sequences in ``Dlq-Parts``. Parts
    carry ``Nats-Msg-Id`` ``<entry id>:part:<i>``, so a retried dead letter reuses them.
(none)
    An entry written before ``Dlq-Format`` existed: original headers inline, next to ``Dlq-*``.

Every message is sized before it is sent: headers (as encoded on the wire) at most 65,535 bytes
(JetStream refuses more with err_code 10097) and headers plus body at most the server's
``max_payload`` (the server counts both; nats-py checks only the body, and closes the connection
for good when the server reports a violation). Reading the original back costs one API round
trip, on the dead-letter path only; the hot path never looks at raw headers.

Text headers written here (``Dlq-Error``, ``Dlq-Subject``, ``Dlq-Msg-Id``...) are ASCII on the
wire: ``%``, control characters and non-ASCII are percent-encoded as UTF-8 (RFC 3986 style), and
readers decode them (``entry.headers`` holds decoded text). A replay republishes the original
payload and header block unchanged, except for the bookkeeping it documents (see
:func:`replay_block`; an original too close to ``max_payload`` for it gets only the fresh
``Nats-Msg-Id``, or goes out unchanged). A header block nats-py cannot publish as is (a name
outside the HTTP token set, duplicate names, bytes that are not UTF-8, values with surrounding
blanks) is written with the protocol's ``HPUB`` on the same connection.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from ... import __version__
from ..errors import InputError, describe
from ..publish import publish_many
from ..settings import Settings
from .retrying import retry

if TYPE_CHECKING:
    from ..observe.telemetry import Telemetry

log = logging.getLogger(__name__)

H_REASON = "Dlq-Reason"  # invalid | rejected | exhausted | max_deliveries
H_SUBJECT = "Dlq-Subject"
H_STREAM = "Dlq-Stream"
H_SEQUENCE = "Dlq-Sequence"
H_DELIVERIES = "Dlq-Deliveries"
H_ERROR_TYPE = "Dlq-Error-Type"
H_ERROR = "Dlq-Error"
H_VERSION = "Dlq-Worker-Version"
H_LANE = "Dlq-Lane"
H_TIME = "Dlq-Time"
H_MSG_ID = "Dlq-Msg-Id"
H_REPLAYED_FROM = "Dlq-Replayed-From"
H_FORMAT = "Dlq-Format"  # inline | blob | part
H_ORIGINAL_HEADERS = "Dlq-Original-Headers"  # inline: base64 of the original header block
H_ORIGINAL_HEADERS_SIZE = "Dlq-Original-Headers-Size"  # blob: leading bytes that are headers
H_PAYLOAD_SIZE = "Dlq-Payload-Size"
H_PARTS = "Dlq-Parts"  # DLQ sequences of the parts, in order
H_PART_OF = "Dlq-Part-Of"  # on a part: the entry's Nats-Msg-Id
H_PART = "Dlq-Part"  # on a part: "i/n"
MSG_ID = "Nats-Msg-Id"
TRACE_HEADERS = ("traceparent", "tracestate")
TEXT_HEADERS = frozenset({H_SUBJECT, H_ERROR_TYPE, H_ERROR, H_LANE, H_MSG_ID})

DLQ_PATIENCE = 20.0  # seconds a DLQ publish is retried before the job is handed back
RESCUE_PATIENCE = 60.0  # seconds a max-deliveries rescue is retried
HEADER_LIMIT = 65535  # JetStream refuses a larger header block (err_code 10097)
ERROR_TEXT_LIMIT = 4096  # bytes of Dlq-Error on the wire (percent-encoded)
PREVIEW_BYTES = 200  # payload bytes in `dlq list --json`

_HDR_LINE = b"NATS/1.0"
_CRLF = b"\r\n"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # the names nats-py agrees to publish
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")  # kept as is when quoting


# --------------------------------------------------------------------------- header blocks


def wire_text(text: str) -> str:
    """Text as an ASCII header value: ``%``, controls and non-ASCII percent-encoded (UTF-8)."""
    return quote(text, safe=_SAFE).strip()


def read_text(value: str) -> str:
    """The inverse of :func:`wire_text`; a stray byte that is not UTF-8 becomes ``\\xNN``."""
    return unquote(value, errors="backslashreplace")


def header_lines(block: bytes) -> list[bytes]:
    """The ``Name: value`` lines of a raw header block, as sent (no status line, no CRLF)."""
    if not block:
        return []
    lines = block.split(_CRLF)
    return [line for line in lines[1:] if line]


def status_line(block: bytes) -> bytes:
    return block.split(_CRLF, 1)[0] if block else _HDR_LINE


def split_line(line: bytes) -> tuple[bytes, bytes]:
    """Name and value of one header line (the value without the blanks after the colon)."""
    name, _, value = line.partition(b":")
    return name, value.lstrip(b" \t")


def build_block(lines: Sequence[bytes], first: bytes = _HDR_LINE) -> bytes:
    if not lines:
        return b""
    return first + _CRLF + b"".join(line + _CRLF for line in lines) + _CRLF


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """The header block nats-py writes for ``headers`` (trimmed; it drops empty names)."""
    lines = [f"{k.strip()}: {v.strip()}".encode() for k, v in headers.items() if k.strip()]
    return build_block(lines) or b"NATS/1.0\r\n\r\n"


def as_dict(block: bytes) -> dict[str, str] | None:
    """``block`` as a dict that nats-py republishes byte for byte, or None when it cannot.

    An empty dict stands for no headers: pass ``None`` to nats-py then (for ``{}`` it would
    still send an empty ``NATS/1.0`` block, 12 bytes more than sized).
    """
    if not block:
        return {}
    if not header_lines(block):
        return None  # an empty block, sent as such: only HPUB keeps it
    out: dict[str, str] = {}
    for line in header_lines(block):
        name, sep, value = line.partition(b": ")
        try:
            key, text = name.decode("ascii"), value.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not sep or key in out or not _TOKEN.fullmatch(key) or text != text.strip():
            return None
        out[key] = text
    return out if encode_headers(out) == block else None


def show(raw: bytes | str) -> str:
    """One printable line: UTF-8 text as is, invalid bytes as ``\\xNN``, controls escaped."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


# --------------------------------------------------------------------------- stored messages


@dataclass(frozen=True)
class Stored:
    """A message as the stream stored it: subject, exact header block (b"" if none), payload."""

    seq: int
    subject: str
    headers: bytes
    data: bytes


def _nc(js: JetStreamContext) -> Client:
    return js._nc  # noqa: SLF001 - the context's own connection


async def get_stored(
    js: JetStreamContext, stream: str, seq: int, *, next_on: str | None = None, wait: float = 5.0
) -> Stored | None:
    """Read one stored message with its raw header bytes (None: no such message).

    nats-py's ``get_msg`` parses headers with the ``email`` package (non-ASCII turns into
    ``Header`` objects, invalid bytes into U+FFFD), so this asks the JetStream API itself and
    decodes the base64 ``hdrs``. ``next_on``: the first message at or after ``seq`` on
    that subject.
    """
    request: dict[str, Any] = {"seq": seq}
    if next_on:
        request["next_by_subj"] = next_on
    prefix = getattr(js, "_prefix", "$JS.API")
    reply = await _nc(js).request(
        f"{prefix}.STREAM.MSG.GET.{stream}", json.dumps(request).encode(), timeout=wait
    )
    response = json.loads(reply.data)
    error = response.get("error")
    if error:
        if error.get("code") == 404 and error.get("err_code") in (10037, None):
            return None  # no message (10037); a missing stream (10059) is an error
        raise APIError.from_error(error)
    message = response["message"]
    return Stored(
        seq=int(message["seq"]),
        subject=str(message.get("subject", "")),
        headers=base64.b64decode(message.get("hdrs") or ""),
        data=base64.b64decode(message.get("data") or ""),
    )


async def publish_exact(
    nc: Client, subject: str, block: bytes, data: bytes, *, wait: float = 5.0
) -> bool:
    """JetStream-publish an exact header block with ``HPUB``; True when it was a duplicate.

    For blocks nats-py's ``publish`` would refuse or change. Never writes more than the server's
    ``max_payload`` (a violation closes the connection for good).
    """
    if len(block) + len(data) > nc.max_payload or len(block) > HEADER_LIMIT:
        raise ValueError(
            f"{len(block)} header + {len(data)} payload bytes exceed the server's limits "
            f"(max_payload {nc.max_payload}, headers {HEADER_LIMIT})"
        )
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        size = len(block) + len(data)
        line = f"HPUB {subject} {inbox} {len(block)} {size}\r\n" if block else ""
        line = line or f"PUB {subject} {inbox} {size}\r\n"
        await nc._send_command(line.encode() + block + data + _CRLF)  # noqa: SLF001
        await nc.flush(math.ceil(wait))
        reply = await sub.next_msg(wait)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if not reply.data and reply.headers and reply.headers.get("Status") == "503":
        raise NoRespondersError
    response = json.loads(reply.data)
    if response.get("error"):
        raise APIError.from_error(response["error"])
    return bool(response.get("duplicate"))


# --------------------------------------------------------------------------- writing entries


@dataclass(frozen=True)
class Planned:
    """The messages of one entry: parts (in order), then the entry itself."""

    parts: list[tuple[dict[str, str], bytes]]
    head: tuple[dict[str, str], bytes]


def _size(headers: Mapping[str, str]) -> int:
    return len(encode_headers(headers))


def plan_entry(meta: Mapping[str, str], original: Stored, max_payload: int, msg_id: str) -> Planned:
    """Lay out an entry so that every message fits; raises ValueError when nothing can."""
    limit = min(HEADER_LIMIT, max_payload)
    inline = dict(meta)
    inline[H_FORMAT] = "inline"
    if original.headers:
        inline[H_ORIGINAL_HEADERS] = base64.b64encode(original.headers).decode()
    blob = dict(meta)
    blob[H_FORMAT] = "blob"
    blob[H_ORIGINAL_HEADERS_SIZE] = str(len(original.headers))
    forms = ((inline, original.data), (blob, original.headers + original.data))
    for headers, body in forms:
        size = _size(headers)
        if size <= limit and size + len(body) <= max_payload:
            return Planned([], (headers, body))
    for headers, content in forms:
        part_overhead = _size(_part_headers(msg_id, 10**6, 10**6)) + 16
        room = max_payload - part_overhead
        if room <= 0:
            continue
        count = max(1, math.ceil(len(content) / room))
        head = dict(headers)
        head[H_PARTS] = ",".join(["9" * 20] * count)  # the longest the sequences can be
        if _size(head) > limit:
            continue
        parts = [
            (_part_headers(msg_id, i + 1, count), content[i * room : (i + 1) * room])
            for i in range(count)
        ]
        return Planned(parts, (headers, b""))
    raise ValueError(f"a DLQ entry cannot fit max_payload {max_payload}")


def _part_headers(msg_id: str, index: int, count: int) -> dict[str, str]:
    return {
        MSG_ID: f"{msg_id}:part:{index}",
        H_FORMAT: "part",
        H_PART_OF: msg_id,
        H_PART: f"{index}/{count}",
    }


def entry_metadata(
    original: Stored,
    settings: Settings,
    *,
    reason: str,
    stream: str,
    deliveries: int,
    error_type: str,
    error: str,
    trace_headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``Dlq-*`` record of where the job came from and why, ASCII-safe."""
    while len(wire_text(error)) > ERROR_TEXT_LIMIT:
        error = error[: len(error) * 3 // 4] + "..."
    meta = {
        H_REASON: reason,
        H_SUBJECT: wire_text(original.subject),
        H_STREAM: stream,
        H_SEQUENCE: str(original.seq),
        H_DELIVERIES: str(deliveries),
        H_ERROR_TYPE: wire_text(error_type),
        H_ERROR: wire_text(error) or "-",
        H_VERSION: __version__,
        H_LANE: wire_text(settings.lane),
        H_TIME: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        H_PAYLOAD_SIZE: str(len(original.data)),
        # One DLQ entry per stored message: a retried DLQ publish is deduplicated, while
        # the same job failing after a replay (a new stream sequence) gets its own entry.
        MSG_ID: f"dlq:{stream}:{original.seq}",
    }
    original_id = first_value(original.headers, MSG_ID)
    if original_id is not None:
        meta[H_MSG_ID] = wire_text(show(original_id))[:1024] or "-"
    # The trace to link a replay to: the producer's, else the failed delivery's.
    for key in TRACE_HEADERS:
        value = first_value(original.headers, key)
        text = value.decode("ascii", "replace") if value is not None else ""
        if text and text.isprintable() and len(text) <= 512 and text == text.strip():
            meta[key] = text
        elif trace_headers and trace_headers.get(key):
            meta[key] = trace_headers[key]
    return meta


def first_value(block: bytes, name: str) -> bytes | None:
    wanted = name.lower().encode()
    for line in header_lines(block):
        key, value = split_line(line)
        if key.strip().lower() == wanted:
            return value.rstrip(b" \t")
    return None


async def publish_entry(
    js: JetStreamContext, settings: Settings, original: Stored, meta: Mapping[str, str]
) -> int:
    """Publish an entry (its parts first); returns its DLQ sequence."""
    msg_id = meta[MSG_ID]
    planned = plan_entry(meta, original, _nc(js).max_payload, msg_id)
    sequences = []
    for headers, body in planned.parts:  # deduplicated by their ids when retried
        ack = await js.publish(part_subject(settings), body, headers=headers, timeout=5.0)
        sequences.append(str(ack.seq))
    headers, body = planned.head
    if sequences:
        headers = {**headers, H_PARTS: ",".join(sequences)}
    ack = await js.publish(settings.names.dlq_subject, body, headers=headers, timeout=5.0)
    return int(ack.seq)


def _fallback(msg: Msg) -> Stored:
    """The delivered message, when the stream no longer has it (headers as nats-py parsed them)."""
    headers = {str(k): str(v) for k, v in (msg.headers or {}).items()}
    meta = msg.metadata
    lines = [f"{k}: {v}".encode("utf-8", "backslashreplace") for k, v in headers.items()]
    return Stored(meta.sequence.stream, msg.subject, build_block(lines), msg.data or b"")


async def dead_letter(
    js: JetStreamContext,
    settings: Settings,
    msg: Msg,
    *,
    reason: str,
    error: BaseException,
    deliveries: int,
    attempts: int = 3,
    trace_headers: Mapping[str, str] | None = None,
) -> bool:
    """Publish a DLQ entry, then terminate the original. False (and nothing acked) on failure.

    The original is read back from the stream by sequence for its exact header bytes.
    ``trace_headers`` (the failed delivery's trace context) fill in for a producer that sent
    none, so a replay can always link back to the failed run.
    """
    meta_seq = msg.metadata.sequence.stream
    stream = msg.metadata.stream
    # Ride out a leader election of the DLQ stream (~5-7 s after a node dies: "no responders"):
    # retry for up to DLQ_PATIENCE seconds, telling the server we still hold the job. Giving up
    # early is what strands a job on its final delivery (see tests/chaos).
    tries = 0
    original: Stored | None = None

    async def publish() -> None:
        nonlocal tries, original
        tries += 1
        if original is None:
            original = await get_stored(js, stream, meta_seq) or _fallback(msg)
        meta = entry_metadata(
            original,
            settings,
            reason=reason,
            stream=stream,
            deliveries=deliveries,
            error_type=type(error).__name__,
            error=describe(error),
            trace_headers=trace_headers,
        )
        await publish_entry(js, settings, original, meta)

    async def keep_the_job(_exc: Exception) -> None:
        with contextlib.suppress(Exception):
            await msg.in_progress()  # keep the job ours while the DLQ elects a leader

    try:  # timeouts, no responders during a leader election, ...
        await retry(publish, patience=DLQ_PATIENCE, min_attempts=attempts, between=keep_the_job)
    except Exception as exc:
        log.error(
            "DLQ publish failed %d times in %.0fs (%s: %s); leaving stream seq %s for redelivery",
            tries,
            DLQ_PATIENCE,
            type(exc).__name__,
            describe(exc, 200),
            meta_seq,
        )
        return False
    await msg.term()
    return True


# --------------------------------------------------------------------------- reading entries


@dataclass(frozen=True)
class DeadLetter:
    """One DLQ entry, decoded: what the ``dlq`` command shows and replays.

    ``headers`` are the entry's own headers as text (``Dlq-*`` percent-decoding undone);
    ``original_headers`` is the original's exact header block and ``data`` its exact payload.
    ``problem`` says why the original cannot be fully restored (a part is missing...).
    """

    seq: int
    data: bytes
    headers: dict[str, str]
    original_headers: bytes = b""
    form: str = "legacy"
    parts: tuple[int, ...] = ()
    problem: str | None = None
    subject: str = ""
    entry_headers: bytes = field(default=b"", repr=False)

    @property
    def original_msg_id(self) -> bytes | None:
        return first_value(self.original_headers, MSG_ID)

    @property
    def original_job_id(self) -> bytes | None:
        """``Job-Id`` when a move, rescue or replay set it, else the ``Nats-Msg-Id``."""
        return first_value(self.original_headers, "Job-Id") or self.original_msg_id

    def original_header_pairs(self) -> list[tuple[str, str]]:
        return [(show(k), show(v)) for k, v in map(split_line, header_lines(self.original_headers))]

    @property
    def summary(self) -> dict[str, object]:
        h = self.headers
        original_id = self.original_msg_id
        return {
            "dlq_seq": self.seq,
            "reason": h.get(H_REASON),
            "error_type": h.get(H_ERROR_TYPE),
            "error": h.get(H_ERROR),
            "deliveries": _int(h.get(H_DELIVERIES)),
            "subject": h.get(H_SUBJECT),
            "stream_seq": _int(h.get(H_SEQUENCE)),
            "msg_id": show(original_id) if original_id is not None else h.get(H_MSG_ID),
            # the job's identity through moves, rescues and replays (their ids differ)
            "job_id": show(job_id) if (job_id := self.original_job_id) else h.get(H_MSG_ID),
            "worker_version": h.get(H_VERSION),
            "lane": h.get(H_LANE),
            "time": h.get(H_TIME),
            "size": len(self.data),
            "format": self.form,
            "parts": list(self.parts),
            "problem": self.problem,
        }

    def as_json(self) -> dict[str, object]:
        """The summary plus a payload preview and the original headers (``dlq list --json``)."""
        out = self.summary
        head = self.data[:PREVIEW_BYTES]
        try:
            preview: dict[str, object] = {"text": head.decode("utf-8")}
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 3 and len(self.data) > PREVIEW_BYTES:  # cut mid-char
                preview = {"text": head[: exc.start].decode("utf-8")}
            else:
                preview = {"base64": base64.b64encode(head).decode()}
        preview["truncated"] = len(self.data) > PREVIEW_BYTES
        out["payload_preview"] = preview
        out["original_headers"] = [
            {"name": name, "value": value} for name, value in self.original_header_pairs()
        ]
        out["original_headers_base64"] = base64.b64encode(self.original_headers).decode()
        return out


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _entry_headers(block: bytes, *, decode: bool) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in header_lines(block):
        name, value = split_line(line)
        key, text = show(name.strip()), show(value.rstrip(b" \t"))
        if decode and key in TEXT_HEADERS:
            text = show(read_text(text))
        headers.setdefault(key, text)
    return headers


async def decode_entry(js: JetStreamContext, settings: Settings, stored: Stored) -> DeadLetter:
    """A stored DLQ message as an entry (parts fetched and joined)."""
    fmt = first_value(stored.headers, H_FORMAT)
    form = fmt.decode("ascii", "replace") if fmt is not None else "legacy"
    headers = _entry_headers(stored.headers, decode=fmt is not None)
    base = DeadLetter(
        seq=stored.seq,
        data=stored.data,
        headers=headers,
        subject=stored.subject,
        entry_headers=stored.headers,
    )
    if fmt is None:  # written before Dlq-Format: original headers inline, Dlq-* beside them
        lines = [
            line
            for line in header_lines(stored.headers)
            if not split_line(line)[0].strip().lower().startswith(b"dlq-")
            and split_line(line)[0].strip().lower() != MSG_ID.lower().encode()
        ]
        original_id = first_value(stored.headers, H_MSG_ID)
        if original_id is not None:
            lines.insert(0, MSG_ID.encode() + b": " + original_id)
        return replace(base, original_headers=build_block(lines))
    problem: str | None = None
    parts: tuple[int, ...] = ()
    content = stored.data
    if H_PARTS in headers:
        try:
            parts = tuple(int(p) for p in headers[H_PARTS].split(","))
        except ValueError:
            problem = f"unreadable {H_PARTS} header"
        chunks = [content]
        for part_seq in parts:
            part = await get_stored(js, settings.dlq_stream_name, part_seq)
            expected = headers.get(MSG_ID, "")
            if part is None or first_value(part.headers, H_PART_OF) != expected.encode():
                problem = f"part at DLQ seq {part_seq} is missing"
                break
            chunks.append(part.data)
        content = b"".join(chunks)
    original_headers, data = b"", content
    if form == "blob":
        size = _int(headers.get(H_ORIGINAL_HEADERS_SIZE))
        original_headers, data = content[:size], content[size:]
    elif headers.get(H_ORIGINAL_HEADERS):
        try:
            original_headers = base64.b64decode(headers[H_ORIGINAL_HEADERS], validate=True)
        except (binascii.Error, ValueError):
            problem = problem or f"unreadable {H_ORIGINAL_HEADERS} header"
    expected_size = headers.get(H_PAYLOAD_SIZE)
    if problem is None and expected_size is not None and _int(expected_size) != len(data):
        problem = f"payload is {len(data)} bytes, the entry says {expected_size}"
    return replace(
        base,
        data=data,
        original_headers=original_headers,
        form=form,
        parts=parts,
        problem=problem,
    )


def is_part(stored: Stored) -> bool:
    return first_value(stored.headers, H_FORMAT) == b"part"


async def iter_dead_letters(
    js: JetStreamContext, settings: Settings, limit: int | None = None
) -> AsyncIterator[DeadLetter]:
    """Walk the DLQ oldest first by direct sequence reads (no consumer is created)."""
    info = await js.stream_info(settings.dlq_stream_name)
    seq, last = info.state.first_seq, info.state.last_seq
    seen = 0
    while seq and seq <= last and (limit is None or seen < limit):
        stored = await get_stored(
            js, settings.dlq_stream_name, seq, next_on=settings.names.dlq_subject
        )
        if stored is None or stored.seq > last:
            return
        seq = stored.seq + 1
        if is_part(stored):
            continue
        yield await decode_entry(js, settings, stored)
        seen += 1


async def get_dead_letter(js: JetStreamContext, settings: Settings, seq: int) -> DeadLetter:
    """One entry by its DLQ sequence; InputError when there is none (or it is a part)."""
    stored = await get_stored(js, settings.dlq_stream_name, seq)
    if stored is None:
        raise InputError(f"no DLQ entry with seq {seq}: see 'dlq list'")
    if is_part(stored):
        owner = show(first_value(stored.headers, H_PART_OF) or b"?")
        raise InputError(f"DLQ seq {seq} is a part of entry {owner}, not an entry: see 'dlq list'")
    return await decode_entry(js, settings, stored)


# --------------------------------------------------------------------------- replay


def replay_block(
    entry: DeadLetter, trace: Mapping[str, str] | None = None, *, minimal: bool = False
) -> bytes:
    """The header block a replay publishes: the original's, line for line, except that

    * ``Nats-Msg-Id`` becomes ``<original id, or 'job'>:replay:<DLQ seq>`` (a fresh dedup key:
      the original id may still be inside the duplicate window, and replaying the same entry
      twice stays one job);
    * ``Job-Id: <original id>`` is added when there was an id and no ``Job-Id``;
    * ``Dlq-Replayed-From: <DLQ seq>`` is added;
    * with tracing on, ``traceparent``/``tracestate`` are replaced by the replay's own.

    ``minimal``: only the ``Nats-Msg-Id`` change, and only when the original had an id (for an
    original too close to ``max_payload`` to take the rest).
    """
    original = entry.original_msg_id
    if minimal and original is None:
        return entry.original_headers  # nothing to change
    trace = {} if minimal else dict(trace or {})
    drop = {MSG_ID.lower().encode()}
    if not minimal:
        drop.add(H_REPLAYED_FROM.lower().encode())
    if trace:
        drop |= {k.encode() for k in TRACE_HEADERS}
    lines = [
        line
        for line in header_lines(entry.original_headers)
        if split_line(line)[0].strip().lower() not in drop
    ]
    if original is not None or not minimal:
        fresh = (original or b"job") + f":replay:{entry.seq}".encode()
        lines.append(MSG_ID.encode() + b": " + fresh)
    if not minimal:
        if original and first_value(entry.original_headers, "Job-Id") is None:
            lines.append(b"Job-Id: " + original)
        lines.append(f"{H_REPLAYED_FROM}: {entry.seq}".encode())
        lines += [f"{k}: {v}".encode() for k, v in trace.items()]
    return build_block(lines, status_line(entry.original_headers))


def replay_message(
    entry: DeadLetter, trace: Mapping[str, str] | None, max_payload: int
) -> bytes | None:
    """The header block to replay with: the full bookkeeping (:func:`replay_block`) when it fits
    ``max_payload``; else only the fresh ``Nats-Msg-Id``; else the original block unchanged
    (its id may then be inside the duplicate window: see :func:`replay`). None: nothing fits."""
    for block in (
        replay_block(entry, trace),
        replay_block(entry, minimal=True),
        entry.original_headers,
    ):
        if len(block) <= HEADER_LIMIT and len(block) + len(entry.data) <= max_payload:
            return block
    return None


async def replay(
    js: JetStreamContext,
    settings: Settings,
    entries: list[DeadLetter],
    telemetry: Telemetry | None = None,
) -> int:
    """Republish entries to the ingress subject, then delete them from the DLQ.

    The payload and the original headers go out byte for byte, with the bookkeeping of
    :func:`replay_block`. A header block nats-py cannot publish as is goes out with ``HPUB``
    (:func:`publish_exact`). An entry that cannot be restored (a part is missing) or republished
    (over the server's limits; or sent unchanged and dropped as a duplicate of its original id)
    stays in the DLQ: after the others are replayed, an InputError names it.

    With tracing on, each replay starts a new trace whose PRODUCER span links to the dead
    letter's original trace, so the failed run and the replayed run lead to each other. The span
    covers preparing the message; the publishes themselves are pipelined afterwards.
    """
    subject = settings.names.ingress
    nc = _nc(js)
    plain: list[tuple[str, bytes, dict[str, str] | None]] = []
    plain_entries: list[tuple[DeadLetter, bytes]] = []
    exact: list[tuple[DeadLetter, bytes]] = []
    refused: list[str] = []
    for entry in entries:
        if entry.problem:
            refused.append(f"DLQ entry {entry.seq} stays in the DLQ: {entry.problem}")
            continue
        trace: dict[str, str] = {}
        if telemetry is not None:
            link = {**dict(entry.original_header_pairs()), **entry.headers}
            with telemetry.replaying(subject, trace, link):
                pass
        block = replay_message(entry, trace, nc.max_payload)
        if block is None:
            refused.append(
                f"DLQ entry {entry.seq} stays in the DLQ: {len(entry.original_headers)} header "
                f"and {len(entry.data)} payload bytes are over the server's limits "
                f"(max_payload {nc.max_payload})"
            )
            continue
        headers = as_dict(block)
        if headers is None:
            exact.append((entry, block))
        else:
            plain.append((subject, entry.data, headers or None))
            plain_entries.append((entry, block))
    results = [
        (entry, block, bool(ack.duplicate))
        for (entry, block), ack in zip(plain_entries, await publish_many(js, plain), strict=True)
    ]
    for entry, block in exact:
        duplicate = await retry(
            partial(publish_exact, nc, subject, block, entry.data),
            patience=DLQ_PATIENCE,
            should_retry=_no_responders,
        )
        results.append((entry, block, duplicate))
    replayed = 0
    for entry, block, duplicate in results:
        if duplicate and block == entry.original_headers and entry.original_msg_id is not None:
            refused.append(
                f"DLQ entry {entry.seq} stays in the DLQ: it is too close to max_payload for a "
                "fresh Nats-Msg-Id, and the stream dropped it as a duplicate of its original id "
                "(replay it again once the duplicate window has passed)"
            )
            continue
        await delete_entry(js, settings, entry)
        replayed += 1
    if refused:
        done = f"replayed {replayed} job(s) to {subject}; " if replayed else ""
        raise InputError(done + "; ".join(refused))
    return replayed


async def _no_responders(exc: Exception) -> bool:
    return isinstance(exc, NoRespondersError)


async def delete_entry(js: JetStreamContext, settings: Settings, entry: DeadLetter) -> None:
    await js.delete_msg(settings.dlq_stream_name, entry.seq)
    for part in entry.parts:
        with contextlib.suppress(NotFoundError):
            await js.delete_msg(settings.dlq_stream_name, part)


async def purge(js: JetStreamContext, settings: Settings) -> int:
    """Delete every entry; returns how many entries (not parts) there were."""
    info = await js.stream_info(settings.dlq_stream_name, subjects_filter=part_subject(settings))
    parts = sum((info.state.subjects or {}).values())
    await js.purge_stream(settings.dlq_stream_name)
    return int(info.state.messages) - parts


def part_subject(settings: Settings) -> str:
    """Where parts go: inside the DLQ stream, apart from the entries (``dlq list`` skips it)."""
    return settings.names.dlq_parts


class MaxDeliveriesRescue:
    """Dead-letter jobs the *server* gave up on.

    A job whose every delivery killed its worker (a poison message) exceeds the consumer's
    ``max_deliver`` without the chassis ever settling it; JetStream then stops delivering it and
    publishes a MAX_DELIVERIES advisory. Every instance listens; the first one copies the stored
    message to the DLQ (its dedup id makes the others' copies no-ops) and deletes it from the
    work stream, so it is neither lost nor stuck.
    """

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self.js = js
        self.settings = settings

    @property
    def subject(self) -> str:
        s = self.settings
        return s.names.max_deliveries_advisory()

    async def on_advisory(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable MAX_DELIVERIES advisory")
            return

        async def note_retry(exc: Exception) -> None:
            log.debug("max-deliveries rescue of seq %d: retrying (%s)", seq, describe(exc))

        try:  # the DLQ may be electing a leader, and the advisory comes only once
            await retry(
                lambda: self.rescue(seq, deliveries),
                patience=RESCUE_PATIENCE,
                between=note_retry,
                first_delay=0.5,
                max_delay=4.0,
            )
        except Exception as exc:  # the broker stayed busy for the whole patience
            log.error("max-deliveries rescue of seq %d failed: %s", seq, describe(exc))

    async def rescue(self, seq: int, deliveries: int) -> None:
        s = self.settings
        original = await get_stored(self.js, s.stream_name, seq)
        if original is None:
            return  # already rescued (or acknowledged in the meantime)
        meta = entry_metadata(
            original,
            s,
            reason="max_deliveries",
            stream=s.stream_name,
            deliveries=deliveries,
            error_type="MaxDeliveriesExceeded",
            error="no delivery settled (the worker died each time); JetStream stopped",
        )
        await publish_entry(self.js, s, original, meta)
        await self.js.delete_msg(s.stream_name, seq)
        log.warning(
            "job at stream seq %d dead-lettered after %d deliveries that never settled",
            seq,
            deliveries,
        )
