"""The chassis: everything a worker needs except its job model and handler.

Generated from the template and owned by it: a template update may rewrite any file in this
package, so keep business code in the files you own: ``job.py``, ``handler.py``, ``resources.py``
and ``settings.py``.

The rooms: ``consume/`` is the hot path (pull, handle, settle, dead-letter); ``evolve/`` runs
versions side by side (lanes, routes, provisioning, the instance registry, retirement);
``observe/`` is traces, metrics, logs and health; ``operate/`` is the command line. At the top:
settings, names, errors, the connection, and ``app.py``, which puts one instance together.
"""

from .consume.context import JobContext
from .errors import Reject, Retry
from .settings import Settings as WorkerSettings

__all__ = ["JobContext", "Reject", "Retry", "WorkerSettings"]
