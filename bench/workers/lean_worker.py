"""The floor: the leanest nats-py pull loop we know, with no framework and no chassis.

What nats-py's ``fetch()`` does per message (a task, a ``uuid4``, a ``wait_for``, a round trip
between batches) is left out:

* one core **callback** subscription on one inbox, for the whole run;
* pull requests published by hand to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`` with
  ``{"batch": n, "expires": ns, "idle_heartbeat": ns}`` and that inbox as reply subject, so
  credit stays **outstanding**: a new request for the free credit as soon as half of ``CREDIT``
  is free (as nats.go's ``Consume()`` does);
* status messages (``404``/``408``/``409``, and ``100`` heartbeats) hand back the credit their
  request did not use (``Nats-Pending-Messages``); if nothing at all (not even a heartbeat)
  arrives for two heartbeat periods, the credit is assumed lost and asked for again;
* one ack per message: an empty publish to the message's reply subject (what ``msg.ack()``
  sends, minus its checks), uvloop when installed. No parsing: a no-op "handler".

SIGTERM stops it at once: unsubscribe, flush the acks, close, exit 0 (nothing is in flight: every
message is acked inside its callback). With ``BENCH_LATENCY_OUT`` set, the handler-start time of
every job (wall clock, ns) is appended there as ``<id> <ns>`` (one write per job, as in
``latency_handler.py``).

Env: NATS_URL, STREAM_NAME, DURABLE, CREDIT (default FETCH_BATCH, else 100), BENCH_LATENCY_OUT.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import nats
from nats.aio.msg import Msg

EXPIRES_S = 30.0
HEARTBEAT_S = 5.0


async def main() -> int:
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    stream = os.environ.get("STREAM_NAME", "BENCH_WORKER")
    durable = os.environ.get("DURABLE", "bench-worker-v1")
    credit = int(os.environ.get("CREDIT") or os.environ.get("FETCH_BATCH") or 100)
    latency_out = os.environ.get("BENCH_LATENCY_OUT")
    fd = os.open(latency_out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if latency_out else -1
    now_ns = time.time_ns

    nc = await nats.connect(url, pending_size=8 * 1024 * 1024, skip_subject_validation=True)
    publish = nc.publish
    inbox = nc.new_inbox()
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
    expires_ns, heartbeat_ns = int(EXPIRES_S * 1e9), int(HEARTBEAT_S * 1e9)
    threshold = max(1, credit // 2)
    low_water = credit - threshold  # pull again once outstanding credit is down to this
    outstanding = 0  # messages requested and not yet delivered (nor handed back)
    received = 0  # anything on the inbox: the lost-credit watchdog's sign of life

    async def pull() -> None:
        nonlocal outstanding
        free = credit - outstanding
        if free >= threshold:
            outstanding += free
            body = {"batch": free, "expires": expires_ns, "idle_heartbeat": heartbeat_ns}
            await publish(next_subject, json.dumps(body).encode(), reply=inbox)

    async def on_msg(msg: Msg) -> None:
        nonlocal outstanding, received
        received += 1
        reply = msg.reply
        if reply:  # a job
            if fd >= 0:  # handler start, as the other workers record it
                started = now_ns()
                os.write(fd, f"{json.loads(msg.data)['id']} {started}\n".encode())
            await publish(reply)  # the ack: an empty message to the ack subject
            outstanding -= 1
        else:  # a status message: 100 heartbeat, 404/408/409 end of (part of) a request
            headers = msg.headers
            pending = headers.get("Nats-Pending-Messages") if headers else None
            if pending:
                outstanding = max(0, outstanding - int(pending))
        if outstanding <= low_water:
            await pull()

    sub = await nc.subscribe(inbox, cb=on_msg)
    await pull()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    seen = received
    try:
        while not stop.is_set():  # lost-credit watchdog (the server restarted, a request vanished)
            try:
                await asyncio.wait_for(stop.wait(), 2 * HEARTBEAT_S)
            except TimeoutError:
                if received == seen:  # not even a heartbeat for two heartbeat periods
                    outstanding = 0
                    await pull()
                seen = received
    finally:
        await sub.unsubscribe()
        await nc.flush(timeout=2)
        await nc.close()
        if fd >= 0:
            os.close(fd)
    return 0


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        raise SystemExit(asyncio.run(main())) from None
    raise SystemExit(uvloop.run(main()))
