"""Your own settings, next to the chassis's. Edit this file.

Each field is read from the environment variable of its upper-case name (``payments_url`` ->
``PAYMENTS_URL``) or from ``.env``, like the chassis's own (``CONCURRENCY``, ``NATS_URL``, ...).
A bad value stops the worker at start-up with one line naming the variable (exit 78).
``resources.lifespan`` receives them; keep what the handler needs on ``Resources``.

Example::

    payments_url: str = "http://payments:8080"
    payments_timeout: float = Field(default=5.0, gt=0)
"""

from __future__ import annotations

from .runtime import WorkerSettings


class Settings(WorkerSettings):
    """The chassis's settings plus yours."""
