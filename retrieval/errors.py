"""The one error the retrieval commands report as a single line (no traceback)."""

from __future__ import annotations


class UsageError(Exception):
    """Something the user can fix (a missing file, a bad URI, another model's collection...).

    The message says what is wrong and what to do; the command prints it and exits 1."""
