"""Which job model, handler and resources a worker runs: the user's, or the chassis's demo.

The chassis imports the user's modules (``job``, ``handler``, ``resources``, ``settings``) here
and nowhere else, so the rest of the chassis, and its tests, never depend on the user's model.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the CLI's --help must not pay for pydantic
    from pydantic import BaseModel

    from .settings import Settings

PACKAGE = __package__.rsplit(".", 1)[0]  # the worker's package, above runtime/
APPS = ("user", "demo")

Handler = Callable[[Any, Any], Awaitable[None]]
Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


@asynccontextmanager
async def no_resources(_settings: Settings) -> AsyncIterator[None]:
    yield None


@dataclass(frozen=True)
class WorkerApp:
    """What the chassis runs: a job model, a handler and the lifespan of their resources."""

    name: str
    job_model: type[BaseModel]
    handler: Handler
    lifespan: Lifespan = no_resources


def _user_module(name: str) -> Any | None:
    """The user's ``<package>.<name>``; None when the project has no such file."""
    qualified = f"{PACKAGE}.{name}"
    try:
        return importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name == qualified:
            return None
        raise  # the user's module exists but imports something missing: show it


def load_app(name: str = "user") -> WorkerApp:
    """``user``: job.py, handler.py and resources.py. ``demo``: the chassis's demo job."""
    if name == "demo":
        from .operate import demo

        return WorkerApp("demo", demo.DemoJob, demo.handle)
    job, handler, resources = (_user_module(n) for n in ("job", "handler", "resources"))
    if job is None or handler is None:
        raise ModuleNotFoundError(f"{PACKAGE}.job and {PACKAGE}.handler are required")
    lifespan = getattr(resources, "lifespan", no_resources) if resources else no_resources
    return WorkerApp("user", job.Job, handler.handle, lifespan)


def settings_class() -> type[Settings]:
    """The user's ``settings.Settings`` (the chassis's plus theirs), or the chassis's alone."""
    from .settings import Settings

    module = _user_module("settings")
    cls = getattr(module, "Settings", Settings) if module is not None else Settings
    if not (isinstance(cls, type) and issubclass(cls, Settings)):
        raise TypeError(f"{PACKAGE}.settings.Settings must subclass the chassis's Settings")
    return cls
