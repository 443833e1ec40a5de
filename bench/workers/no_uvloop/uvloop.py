"""Makes ``import uvloop`` fail, for the ``generated+asyncio`` variant (bench/benchlib/workers.py).

This directory goes on the worker's ``PYTHONPATH`` after its ``src`` and before site-packages, so
the worker's own ``try: import uvloop / except ImportError: asyncio.run(...)`` takes the plain
asyncio path. Nothing in the worker changes: this measures what uvloop is worth to it.
"""

raise ImportError("uvloop disabled by the benchmark (generated+asyncio variant)")
