"""The one exception type for mistakes a user can fix."""

from __future__ import annotations


class HpcRolloutError(Exception):
    """A user-facing error: the CLI prints ``error: <message>`` and exits non-zero, no traceback.

    Messages say what went wrong, where (file, row, dotted config key) and the next step.
    Anything else raised inside hpcrollout is a bug and keeps its traceback.
    """


class WriteError(HpcRolloutError, OSError):
    """A run file could not be written (disk full, quota, read-only, permission): the path and the way out.

    Also an OSError, so code that rides out filesystem hiccups (lease renewals) still catches it.
    """
