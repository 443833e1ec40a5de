"""The peer a nats-py user would write: a pull loop with nats-py's documented ``fetch()`` API.

``fetch(batch=FETCH_BATCH)`` on the durable the generated worker provisions, one ``ack()`` per
message, uvloop when installed (as in ``shared/perf-notes.md``). The "handler" is a no-op: the
payload is not even parsed. Once called "the ceiling", it is not: ``fetch()`` creates a task, a
``uuid4`` and a ``wait_for`` per message and waits a round trip between batches; the floor is
``lean_worker.py``.

SIGTERM stops the loop at once (an outstanding fetch is abandoned; nothing fetched is left
unacked because a batch is always finished first). With ``BENCH_LATENCY_OUT`` set, the handler-start
time of every job (wall clock, ns) is appended there as ``<id> <ns>`` (one write per job, as in
``latency_handler.py``).

Env: NATS_URL, STREAM_NAME, DURABLE, FETCH_BATCH, BENCH_LATENCY_OUT (optional).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import nats
from nats.errors import TimeoutError as NatsTimeoutError


async def main() -> int:
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    stream = os.environ.get("STREAM_NAME", "BENCH_WORKER")
    durable = os.environ.get("DURABLE", "bench-worker-v1")
    batch = int(os.environ.get("FETCH_BATCH", "100"))
    latency_out = os.environ.get("BENCH_LATENCY_OUT")
    fd = os.open(latency_out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if latency_out else -1
    now_ns = time.time_ns

    nc = await nats.connect(url, pending_size=8 * 1024 * 1024)
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(durable=durable, stream=stream)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            fetch = asyncio.ensure_future(psub.fetch(batch=batch, timeout=5.0))
            await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                fetch.cancel()
                break
            try:
                msgs = fetch.result()
            except NatsTimeoutError:
                continue
            for msg in msgs:
                if fd >= 0:  # handler start, as the other workers record it
                    started = now_ns()
                    os.write(fd, f"{json.loads(msg.data)['id']} {started}\n".encode())
                await msg.ack()
    finally:
        stopped.cancel()
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
