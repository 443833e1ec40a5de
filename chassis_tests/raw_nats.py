"""A minimal NATS client that speaks the wire protocol over a plain socket.

For tests that must send what nats-py would refuse or rewrite: header names outside the HTTP
token set, duplicate names, values with leading blanks or bytes that are not UTF-8, a message a
few bytes under ``max_payload``. Nothing is validated or normalised here: header blocks are
bytes, sent as given. Plain TCP, no auth, no TLS, no reconnect: loopback test servers only.

    async with await RawNats.connect("nats://127.0.0.1:4222") as raw:
        block = header_block([(b"X-Odd(name)/@=", b"caf\\xc3\\xa9")])
        ack = await raw.js_publish("orders.jobs.order", b"payload", block)   # the PubAck JSON
        msg = await raw.request("$JS.API.STREAM.MSG.GET.ORDERS", b'{"seq": 1}')

``stored_message`` reads a stream's message back with its exact header bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

CRLF = b"\r\n"


def header_block(pairs: list[tuple[bytes, bytes]], status: bytes = b"NATS/1.0") -> bytes:
    """``NATS/1.0\\r\\nName: value\\r\\n...\\r\\n`` exactly as given (b"" for no headers)."""
    if not pairs:
        return b""
    return status + CRLF + b"".join(n + b": " + v + CRLF for n, v in pairs) + CRLF


def header_pairs(block: bytes) -> list[tuple[bytes, bytes]]:
    """The inverse of :func:`header_block` (a value keeps everything after ``": "``)."""
    if not block:
        return []
    pairs = []
    for line in block.split(CRLF)[1:]:
        if line:
            name, _, value = line.partition(b": ")
            pairs.append((name, value))
    return pairs


@dataclass(frozen=True)
class RawMsg:
    subject: str
    reply: str
    headers: bytes  # the exact header block, b"" for MSG
    data: bytes


class RawNats:
    """One connection: ``connect``, ``publish``, ``subscribe``/``next_msg``, ``request``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.info: dict[str, Any] = {}
        self.errors: list[str] = []  # -ERR lines the server sent
        self._queues: dict[int, asyncio.Queue[RawMsg]] = {}
        self._pongs: asyncio.Queue[None] = asyncio.Queue()
        self._sids = itertools.count(1)
        self._inbox = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def connect(cls, url: str, wait: float = 5.0) -> RawNats:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait)
        client = cls(reader, writer)
        line = await asyncio.wait_for(reader.readline(), wait)
        assert line.startswith(b"INFO "), line
        client.info = json.loads(line[5:])
        connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True}
        writer.write(b"CONNECT " + json.dumps(connect).encode() + CRLF)
        client._task = asyncio.create_task(client._read_loop())
        await client.ping(wait)
        return client

    @property
    def max_payload(self) -> int:
        return int(self.info.get("max_payload", 1024 * 1024))

    async def __aenter__(self) -> RawNats:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    # -- reading

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    return
                op, _, rest = line.rstrip(CRLF).partition(b" ")
                op = op.upper()
                if op in (b"MSG", b"HMSG"):
                    await self._read_msg(op, rest.split())
                elif op == b"PING":
                    self.writer.write(b"PONG" + CRLF)
                elif op == b"PONG":
                    self._pongs.put_nowait(None)
                elif op == b"-ERR":
                    self.errors.append(rest.decode(errors="replace"))
                elif op == b"INFO":
                    self.info.update(json.loads(rest))
        finally:
            self.closed.set()

    async def _read_msg(self, op: bytes, args: list[bytes]) -> None:
        # MSG <subject> <sid> [reply] <size> / HMSG <subject> <sid> [reply] <hdr> <total>
        fixed = 3 if op == b"MSG" else 4
        reply = args[2] if len(args) > fixed else b""
        total = int(args[-1])
        hdr_len = int(args[-2]) if op == b"HMSG" else 0
        body = await self.reader.readexactly(total + 2)
        queue = self._queues.get(int(args[1]))
        if queue is not None:
            msg = RawMsg(args[0].decode(), reply.decode(), body[:hdr_len], body[hdr_len:total])
            queue.put_nowait(msg)

    # -- writing

    async def ping(self, wait: float = 5.0) -> None:
        """Round trip: everything written before has been processed by the server."""
        self.writer.write(b"PING" + CRLF)
        await self.writer.drain()
        await asyncio.wait_for(self._pongs.get(), wait)

    async def publish(
        self, subject: str, data: bytes, headers: bytes = b"", reply: str = ""
    ) -> None:
        """PUB, or HPUB when ``headers`` is given; the bytes go out exactly as given."""
        target = f"{subject} {reply}".strip()
        if headers:
            line = f"HPUB {target} {len(headers)} {len(headers) + len(data)}"
        else:
            line = f"PUB {target} {len(data)}"
        self.writer.write(line.encode() + CRLF + headers + data + CRLF)
        await self.writer.drain()

    async def subscribe(self, subject: str) -> int:
        sid = next(self._sids)
        self._queues[sid] = asyncio.Queue()
        self.writer.write(f"SUB {subject} {sid}".encode() + CRLF)
        await self.writer.drain()
        return sid

    async def unsubscribe(self, sid: int) -> None:
        self._queues.pop(sid, None)
        self.writer.write(f"UNSUB {sid}".encode() + CRLF)
        await self.writer.drain()

    async def next_msg(self, sid: int, wait: float = 5.0) -> RawMsg:
        return await asyncio.wait_for(self._queues[sid].get(), wait)

    async def request(
        self, subject: str, data: bytes, headers: bytes = b"", wait: float = 5.0
    ) -> RawMsg:
        inbox = f"_INBOX.raw.{id(self)}.{next(self._inbox)}"
        sid = await self.subscribe(inbox)
        try:
            await self.publish(subject, data, headers, reply=inbox)
            return await self.next_msg(sid, wait)
        finally:
            await self.unsubscribe(sid)

    async def js_publish(
        self, subject: str, data: bytes, headers: bytes = b"", wait: float = 5.0
    ) -> dict[str, Any]:
        """Publish to a stream; returns the PubAck (or ``{"error": ...}``) as JSON."""
        msg = await self.request(subject, data, headers, wait)
        if not msg.data and b" 503" in msg.headers[:16]:
            return {"error": {"code": 503, "description": "no responders"}}
        result: dict[str, Any] = json.loads(msg.data)
        return result


async def stored_message(raw: RawNats, stream: str, seq: int) -> RawMsg | None:
    """A stored message with its exact header bytes (STREAM.MSG.GET), None when there is none."""
    reply = await raw.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode())
    response = json.loads(reply.data)
    if "error" in response:
        if response["error"].get("code") == 404:
            return None
        raise AssertionError(f"MSG.GET {stream} {seq}: {response['error']}")
    message = response["message"]
    return RawMsg(
        subject=message["subject"],
        reply="",
        headers=base64.b64decode(message.get("hdrs") or ""),
        data=base64.b64decode(message.get("data") or ""),
    )
