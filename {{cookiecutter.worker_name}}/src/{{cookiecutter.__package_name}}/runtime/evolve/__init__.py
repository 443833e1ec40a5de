"""Versions side by side: lanes, the route and its generations, provisioning, the instance
registry, and retirement of drained lanes."""
