"""Exceptions that carry a user-facing sentence and the CLI exit code that goes with them.

The CLI maps :class:`UsageError` to exit code 2 and :class:`RuntimeFailure` to exit code 3 and prints only
the message, so every message must be one clear sentence that says what to do.
"""

from __future__ import annotations


class WmarkError(Exception):
    """Base class of every error wmark raises on purpose."""

    exit_code = 3


class UsageError(WmarkError):
    """The caller gave something unusable: a missing or corrupt file, a wrong option, a mismatched key."""

    exit_code = 2


class RuntimeFailure(WmarkError):
    """Something failed while running: a suspect that answers garbage, a server that dies."""

    exit_code = 3
