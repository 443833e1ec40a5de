"""The chassis's own CPU per job, without NATS: the real slots fed from an in-memory inbox.

The server-backed bench (run.py) shares two cores between the worker, nats-server and the
harness, so a 1 µs change per job is inside its noise. This script times only what the chassis
does per delivery: the generated worker's real ``Worker._run_slot`` loop, the user's job model
(``job.Job``) and a no-op handler, with the client replaced by the write buffer the acks go to
(the attributes ``consume/acks.py`` uses; nothing is sent). Deliveries arrive in bursts of
``--burst`` (as a pull request's messages do) and every variant runs interleaved, ``--rounds``
times; the table gives the median µs per job.

    python bench/slot_cost.py                       # the worker built by run.py (bench/.build/gen)
    python bench/slot_cost.py --src /tmp/x/order-processor/src

Variants: ``worker`` (defaults), ``worker-msg.ack`` (acks through nats-py's ``msg.ack()`` path
on a stub client: the cost before acks were batched), and ``floor`` (pop a delivery, queue its
ack: the least any consumer does).
"""

# ruff: noqa: SLF001 - it drives the worker's own slots and the client's write buffer
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PAYLOAD = {"id": "job-000000", "item": "x" * 200, "quantity": 3}  # 256 bytes, as run.py's jobs


class StubClient:
    """What the ack batch writes to: nats-py's pending buffer, its flusher queue and flags."""

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._pending_data_size = 0
        self._flush_queue: asyncio.Queue[Any] = asyncio.Queue()
        self._flusher_task: asyncio.Task[None] | None = None
        self.is_connected = True
        self.is_closed = False
        self.stats = {"out_msgs": 0, "out_bytes": 0}

    async def flusher(self) -> None:
        while True:
            future = await self._flush_queue.get()
            self._pending = []
            self._pending_data_size = 0
            if not future.done():
                future.set_result(None)

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None
    ) -> None:
        """nats-py's publish, minus the socket: what ``msg.ack()`` costs on the client side."""
        from nats.protocol.command import pub_cmd

        cmd = pub_cmd(subject, reply, payload)
        self.stats["out_msgs"] += 1
        self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        if self._flush_queue.empty():
            await self._flush_queue.put(asyncio.get_running_loop().create_future())


def load(src: Path) -> tuple[Any, Any, Any, Any]:
    sys.path.insert(0, str(src))
    package = next(p.parents[2].name for p in src.glob("*/runtime/consume/worker.py"))
    worker = importlib.import_module(f"{package}.runtime.consume.worker")
    settings = importlib.import_module(f"{package}.runtime.settings")
    job = importlib.import_module(f"{package}.job")
    acks = importlib.import_module(f"{package}.runtime.consume.acks")
    return worker, settings, job, acks


def deliveries(nc: StubClient, n: int) -> list[Any]:
    """``n`` JetStream deliveries of the bench's job, as nats-py builds them."""
    from nats.aio.msg import Msg

    data = json.dumps(PAYLOAD).encode()
    return [
        Msg(_client=nc, subject="root.type.g1.0.0.0.0.type", data=data, headers=None,  # type: ignore[arg-type]
            reply=f"$JS.ACK.STREAM.consumer.1.{i}.{i}.1700000000000000000.0")
        for i in range(n)
    ]  # fmt: skip


async def time_worker(mods: tuple[Any, Any, Any, Any], n: int, burst: int, batched: bool) -> float:

    worker_mod, settings_mod, job_mod, acks_mod = mods
    nc = StubClient()
    nc._flusher_task = asyncio.create_task(nc.flusher())

    async def handler(job: Any, ctx: Any) -> None:
        return None

    worker = worker_mod.Worker(
        settings_mod.load_settings(_env_file=None), job_mod.Job, handler,
        install_signal_handlers=False,
    )  # fmt: skip
    worker.nc = nc
    worker._acks = acks_mod.AckBatch(nc, asyncio.get_running_loop()) if batched else None
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    msgs = deliveries(nc, n)
    tasks = [asyncio.create_task(worker._run_slot(slot, inbox)) for slot in worker._slots]
    for _ in range(10):
        await asyncio.sleep(0)
    done = worker.counters
    started = time.perf_counter()
    for i in range(0, n, burst):
        for msg in msgs[i : i + burst]:
            inbox.put_nowait(msg)
        while done.processed < min(n, i + burst):  # noqa: ASYNC110 - no event per job
            await asyncio.sleep(0)
    took = time.perf_counter() - started
    worker.stopping.set()
    for task in [*tasks, nc._flusher_task]:
        task.cancel()
    await asyncio.gather(*tasks, nc._flusher_task, return_exceptions=True)
    return took / n


async def time_floor(n: int, burst: int) -> float:
    """A callback-style consumer's least work per delivery: take it, queue its ack."""

    nc = StubClient()
    nc._flusher_task = asyncio.create_task(nc.flusher())
    msgs = deliveries(nc, n)
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    count = 0

    async def consume() -> None:
        nonlocal count
        while True:
            msg = await inbox.get()
            await nc.publish(msg.reply)
            count += 1

    task = asyncio.create_task(consume())
    started = time.perf_counter()
    for i in range(0, n, burst):
        for msg in msgs[i : i + burst]:
            inbox.put_nowait(msg)
        while count < min(n, i + burst):  # noqa: ASYNC110 - as above
            await asyncio.sleep(0)
    took = time.perf_counter() - started
    for t in (task, nc._flusher_task):
        t.cancel()
    await asyncio.gather(task, nc._flusher_task, return_exceptions=True)
    return took / n


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--src", type=Path, default=HERE / ".build" / "gen" / "bench-worker" / "src")
    p.add_argument("--n", type=int, default=50_000, help="deliveries per measurement (50,000)")
    p.add_argument("--burst", type=int, default=50, help="deliveries per burst (50)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (7)")
    p.add_argument("--asyncio", action="store_true", help="plain asyncio instead of uvloop")
    args = p.parse_args()
    mods = load(args.src)
    variants = {
        "worker": lambda: time_worker(mods, args.n, args.burst, batched=True),
        "worker-msg.ack": lambda: time_worker(mods, args.n, args.burst, batched=False),
        "floor": lambda: time_floor(args.n, args.burst),
    }
    runner: Any = asyncio.run
    if not args.asyncio:
        import uvloop

        runner = uvloop.run
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for key, make in variants.items():
            results[key].append(runner(make()) * 1e6)
    floor = statistics.median(results["floor"])
    print(f"{'variant':16} {'µs/job median':>14} {'min':>6} {'max':>6} {'over floor':>11}")
    for key, values in results.items():
        med = statistics.median(values)
        print(f"{key:16} {med:14.2f} {min(values):6.2f} {max(values):6.2f} {med - floor:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
