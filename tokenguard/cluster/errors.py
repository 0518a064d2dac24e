"""The supervisor's errors: each says why the cluster cannot run as asked, and what
to change. The command line answers :class:`StateDirBusy` and :class:`StateDirUnsafe`
with exit status 2 (a usage error), any other :class:`SupervisorError` with 1.
"""

from __future__ import annotations


class SupervisorError(Exception):
    """The cluster cannot run as asked; the message says why and what to change."""


class StateDirBusy(SupervisorError):
    """Another supervisor (or a child of one, still stopping) holds the state directory."""


class StateDirUnsafe(SupervisorError):
    """The state directory is another user's, or others may write it."""


class ChildStartError(SupervisorError):
    """A child's first process exited, or never passed its probe, during startup."""
