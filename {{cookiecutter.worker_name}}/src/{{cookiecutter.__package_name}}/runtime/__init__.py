"""The chassis: everything a worker needs except its job model and handler.

Generated from the template and owned by it: a template update may rewrite any file in this
package, so keep business code in the files you own: ``job.py``, ``handler.py``, ``resources.py``
and ``settings.py``.

The rooms: ``consume/`` is the hot path (pull, handle, settle, dead-letter); ``evolve/`` runs
versions side by side (lanes, routes, provisioning, the instance registry, retirement);
``observe/`` is traces, metrics, logs and health; ``operate/`` is the command line. At the top:
settings, names, errors, the connection, and ``app.py``, which puts one instance together.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .consume.context import JobContext
    from .errors import Reject, Retry
    from .settings import Settings as WorkerSettings

__all__ = ["JobContext", "Reject", "Retry", "WorkerSettings"]
_WHERE = {
    "JobContext": ("consume.context", "JobContext"),
    "Reject": ("errors", "Reject"),
    "Retry": ("errors", "Retry"),
    "WorkerSettings": ("settings", "Settings"),
}


def __getattr__(name: str) -> Any:
    """Imported on first use, so a command like ``--help`` does not load nats-py or pydantic."""
    if name not in _WHERE:
        raise AttributeError(name)
    from importlib import import_module

    module, attr = _WHERE[name]
    value = getattr(import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value
