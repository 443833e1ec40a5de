"""The chassis: everything a worker needs except its job model and handler.

Generated from the template and owned by it: a template update may rewrite any file in this
package, so keep business code in ``job.py`` and ``handler.py``.
"""

from .consume.context import JobContext
from .errors import Reject, Retry

__all__ = ["JobContext", "Reject", "Retry"]
