"""Benchmark handler for the bench's I/O-bound copy (never the template's handler.py).

``bench/run.py --io`` generates a copy of the template and overwrites its ``handler.py`` with this
file: every job awaits ``BENCH_IO_SLEEP_S`` seconds (an ``asyncio.sleep``, standing in for a
database or HTTP call) and returns. The job's own fields are not used, so the sweep keeps working
whatever the template's ``Job`` model carries. Everything around the handler (pull, parse,
validation, ack, concurrency) is the chassis under test, unchanged.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

_SLEEP_S = float(os.environ.get("BENCH_IO_SLEEP_S") or 0.0)
_sleep = asyncio.sleep


async def handle(job: Any, ctx: Any = None, *args: Any, **kwargs: Any) -> None:
    await _sleep(_SLEEP_S)
