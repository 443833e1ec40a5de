"""``dashboard``: the fleet view (``ecosystem.py``) as one live web page, read-only.

One HTML page with its script and style inline, served by asyncio's own server: no front-end
build, no Python dependency. The page opens ``/events`` (Server-Sent Events) and redraws on every
report; ``/api/fleet`` serves the latest report as JSON for anything else. The server reads the
fleet once per ``interval`` whatever the number of viewers, and it never writes to NATS.

It binds 127.0.0.1 by default and has no login. On a loopback address it also refuses requests
whose ``Host`` is not a loopback name (a web page elsewhere cannot read it through DNS
rebinding); bound wider, access control is the operator's (a proxy, a network policy).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import signal
import time
from typing import Any

from nats.aio.client import Client

from ..errors import EXIT_OK, InputError
from ..names import WORKER_NAME
from ..settings import Settings
from .ecosystem import collect_fleet

log = logging.getLogger(__name__)
KEEPALIVE = 15.0  # seconds between SSE comments on a quiet stream (proxies drop idle ones)
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request head
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


class Fleet:
    """The latest fleet report, refreshed in one place and shared by every viewer."""

    def __init__(self, nc: Client, settings: Settings, interval: float) -> None:
        self.nc, self.settings, self.interval = nc, settings, interval
        self.report: bytes = json.dumps({"at": None, "workers": [], "loading": True}).encode()
        self.version = 0
        self._changed = asyncio.Condition()

    async def refresh_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                report: dict[str, Any] = await collect_fleet(self.nc, self.settings)
            except Exception as exc:  # NATS away for a moment: say so, keep trying
                log.warning("fleet refresh failed: %s", exc)
                report = {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "workers": [],
                    "error": f"{type(exc).__name__}: {exc}",
                }
            report["viewer"] = {"worker": WORKER_NAME, "stream": self.settings.stream_name}
            async with self._changed:
                self.report = json.dumps(report).encode()
                self.version += 1
                self._changed.notify_all()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def next_after(self, version: int, within: float) -> tuple[int, bytes] | None:
        """The report after ``version``, or None when none came within ``within`` seconds."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.version != version), within
                )
            if self.version == version:
                return None
            return self.version, self.report


def _digest(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


STYLE = """
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --dim:#6b7385; --line:#e3e6ec;
  --current:#1a7f37; --ramping:#0969da; --draining:#bc4c00; --drained:#6e7781;
  --inactive:#afb8c1; --bad:#cf222e; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;
  background:var(--bg); color:var(--ink); }
header { display:flex; align-items:baseline; gap:16px; padding:14px 24px; background:#1d2330;
  color:#fff; }
header h1 { font-size:18px; margin:0; font-weight:600; }
header .meta { color:#c9d1d9; font-size:13px; }
#conn { margin-left:auto; font-size:13px; }
#conn.live::before { content:"\\25CF "; color:#3fb950; }
#conn.down::before { content:"\\25CF "; color:#f85149; }
main { padding:18px 24px; display:grid; gap:16px;
  grid-template-columns:repeat(auto-fill,minmax(520px,1fr)); }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px;
  padding:14px 16px; }
.card.self { border-color:#8c959f; }
.card h2 { margin:0; font-size:16px; }
.card .sub { color:var(--dim); font-size:12px; margin:2px 0 10px;
  font-family:ui-monospace,monospace; }
.stats { display:flex; gap:18px; margin-bottom:10px; }
.stat b { display:block; font-size:18px; }
.stat span { color:var(--dim); font-size:12px; }
.stat.bad b { color:var(--bad); }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th { text-align:left; color:var(--dim); font-weight:500; font-size:12px;
  border-bottom:1px solid var(--line); }
td, th { padding:4px 8px 4px 0; }
td.n, th.n { text-align:right; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; color:#fff; font-size:12px; }
.badge.current { background:var(--current); } .badge.ramping { background:var(--ramping); }
.badge.draining { background:var(--draining); } .badge.drained { background:var(--drained); }
.badge.inactive { background:var(--inactive); }
tr.changed td { background:#fff3b0; transition:background 1s; }
.changes { margin:10px 0 0; padding:0; list-style:none; color:var(--dim); font-size:12px;
  font-family:ui-monospace,monospace; }
.error { color:var(--bad); }
.empty { color:var(--dim); padding:24px; }
"""

SCRIPT = """
"use strict";
const main = document.getElementById("fleet");
const conn = document.getElementById("conn");
const stamp = document.getElementById("stamp");
const seen = new Map();  // worker/stream/lane -> state, to mark a change
const changedAt = new Map();  // worker/stream/lane -> when its state last changed (ms)
const MARKED_MS = 5000;  // how long a changed lane stays highlighted

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "-")));
  }
  return node;
}

function stat(label, value, bad) {
  return el("div", {class: bad ? "stat bad" : "stat"}, el("b", {}, value ?? "-"),
    el("span", {}, label));
}

function change(c) {
  const to = c.percent && c.percent !== 100 ? c.lane + " " + c.percent + "%" : c.lane;
  const at = String(c.at || "?").replace("T", " ").replace("Z", "");
  return el("li", {}, at + "  " + (c.previous || "-") + " \\u2192 " + to + "  by " + (c.by || "?"));
}

function card(w) {
  const key = w.worker + "/" + w.stream;
  const node = el("section", {class: w.self ? "card self" : "card", "data-worker": w.worker,
    "data-stream": w.stream});
  const ingress = w.ingress || (w.subject_root + ".jobs." + w.job_type);
  node.append(el("h2", {}, w.worker + (w.self ? " (this worker)" : "")));
  node.append(el("div", {class: "sub"}, "stream " + w.stream + "  \\u00b7  ingress " + ingress +
    "  \\u00b7  new work \\u2192 " + (w.split || (w.provisioned ? "?" : "not provisioned")) +
    (w.generation ? "  (g" + w.generation + ")" : "")));
  if (w.error) {
    node.append(el("div", {class: "error"}, "cannot read it: " + w.error));
    return node;
  }
  node.append(el("div", {class: "stats"}, stat("live instances", w.live),
    stat("backlog", w.backlog), stat("jobs/s", w.rate_per_s),
    stat("dead letters", w.dlq_messages, w.dlq_messages > 0)));
  const rows = (w.lanes || []).map((l) => {
    const id = key + "/" + l.lane;
    const before = seen.get(id);
    seen.set(id, l.state);
    if (before !== undefined && before !== l.state) changedAt.set(id, Date.now());
    const marked = Date.now() - (changedAt.get(id) || 0) < MARKED_MS;
    return el("tr", {"data-lane": l.lane, "data-state": l.state, class: marked ? "changed" : null},
      el("td", {}, l.lane), el("td", {}, el("span", {class: "badge " + l.state}, l.state)),
      el("td", {class: "n"}, l.percent + "%"), el("td", {class: "n"}, l.pending),
      el("td", {class: "n"}, l.in_flight), el("td", {class: "n"}, l.rate_per_s),
      el("td", {class: "n"}, l.p95_ms ?? "-"), el("td", {class: "n"}, l.instances));
  });
  if (rows.length) {
    node.append(el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "lane"),
      el("th", {}, "state"), el("th", {class: "n"}, "share"), el("th", {class: "n"}, "pending"),
      el("th", {class: "n"}, "in flight"), el("th", {class: "n"}, "jobs/s"),
      el("th", {class: "n"}, "p95 ms"), el("th", {class: "n"}, "live"))),
      el("tbody", {}, ...rows)));
  }
  const live = (w.instances || []).filter((i) => i.state !== "stopped");
  const who = live.map((i) => i.instance + " [" + i.lane + ", " + i.state + "]").join(", ");
  node.append(el("div", {class: "sub", "data-role": "instances"},
    live.length ? "instances: " + who : "no live instance"));
  const changes = (w.route_changes || []).slice(-3).reverse();
  if (changes.length) node.append(el("ul", {class: "changes"}, ...changes.map(change)));
  return node;
}

function draw(report) {
  const workers = report.workers || [];
  stamp.textContent = workers.length + " worker(s) \\u00b7 " + (report.at || "loading") +
    (report.viewer ? " \\u00b7 seen by " + report.viewer.worker : "");
  const cards = workers.map(card);
  if (report.error) cards.unshift(el("div", {class: "error"}, "NATS: " + report.error));
  if (!cards.length) cards.push(el("div", {class: "empty"}, report.loading ? "loading\\u2026" :
    "no worker found on this account"));
  main.replaceChildren(...cards);
  document.body.dataset.version = String(Number(document.body.dataset.version || 0) + 1);
}

function connect() {
  const events = new EventSource("events");
  events.onopen = () => { conn.className = "live"; conn.textContent = "live"; };
  events.onmessage = (e) => draw(JSON.parse(e.data));
  events.onerror = () => { conn.className = "down"; conn.textContent = "reconnecting"; };
}
connect();
"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fleet: workers on NATS</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>Fleet</h1><span class="meta" id="stamp">loading</span>
<span id="conn">connecting</span></header>
<main id="fleet"><div class="empty">loading\u2026</div></main>
<script>{SCRIPT}</script>
</body>
</html>
""".encode()

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src '{_digest(SCRIPT)}'; style-src '{_digest(STYLE)}'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _head(status: str, content_type: str, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in SECURITY_HEADERS.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class DashboardServer:
    """The HTTP side: ``/`` (the page), ``/events`` (SSE), ``/api/fleet`` (JSON)."""

    def __init__(self, fleet: Fleet, loopback_only: bool) -> None:
        self.fleet = fleet
        self.loopback_only = loopback_only
        self.open: set[asyncio.Task[Any]] = set()  # live connections, ended at shutdown

    def close_all(self) -> None:
        for task in self.open:
            task.cancel()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.open.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            await self._answer(head.decode("latin-1"), writer)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass  # a client that went away or sent no request: nothing to answer
        except asyncio.CancelledError:
            pass  # shutdown ends the open event streams (close_all): a normal end, not an error
        finally:
            if task is not None:
                self.open.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: str, writer: asyncio.StreamWriter) -> None:
        request, *header_lines = head.split("\r\n")
        parts = request.split(" ")
        if len(parts) != 3:
            return await self._send(writer, "400 Bad Request", b"bad request\n")
        method, target, _ = parts
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if self.loopback_only and not _loopback_host(headers.get("host", "")):
            return await self._send(writer, "421 Misdirected Request", b"use a loopback host\n")
        if method not in ("GET", "HEAD"):
            return await self._send(writer, "405 Method Not Allowed", b"read-only\n")
        path = target.split("?", 1)[0]
        if path == "/":
            ctype = "text/html; charset=utf-8"
            return await self._send(writer, "200 OK", PAGE, ctype, head_only=method == "HEAD")
        if path == "/api/fleet":
            body = self.fleet.report
            ctype = "application/json"
            return await self._send(writer, "200 OK", body, ctype, head_only=method == "HEAD")
        if path == "/events":
            return await self._events(writer)
        return await self._send(writer, "404 Not Found", b"not found\n")

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: str,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False,
    ) -> None:
        writer.write(_head(status, content_type, len(body)) + (b"" if head_only else body))
        await writer.drain()

    async def _events(self, writer: asyncio.StreamWriter) -> None:
        writer.write(_head("200 OK", "text/event-stream") + b"retry: 2000\n\n")
        version, report = self.fleet.version, self.fleet.report
        writer.write(b"data: " + report + b"\n\n")
        await writer.drain()
        while True:
            update = await self.fleet.next_after(version, KEEPALIVE)
            if update is None:
                writer.write(b": keepalive\n\n")
            else:
                version, report = update
                writer.write(b"data: " + report + b"\n\n")
            await writer.drain()


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in LOOPBACK_NAMES


async def serve_dashboard(
    nc: Client,
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8090,
    interval: float = 1.0,
) -> int:
    """Serve until SIGINT or SIGTERM; exit 0."""
    fleet = Fleet(nc, settings, interval)
    app = DashboardServer(fleet, loopback_only=host in ("127.0.0.1", "localhost", "::1"))
    try:
        server = await asyncio.start_server(app.handle, host, port, limit=64 * 1024)
    except OSError as exc:
        raise InputError(
            f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    refresher = asyncio.create_task(fleet.refresh_forever())
    bound = server.sockets[0].getsockname()
    shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
    # The address line is printed (not only logged) so a script can find the port it got.
    print(f"dashboard on http://{shown}:{bound[1]}/ (read-only; Ctrl-C stops it)", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        app.close_all()  # SSE streams never end by themselves
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return EXIT_OK
