"""The bearer token for a suspect's API: read from an environment variable or a file, never the command line.

The token goes to the suspect, who may be the thief, so what cannot be a token is refused before anything is
sent: a wmark key file given by mistake (its secret would reach the suspect) and a value no header can carry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from wmark.errors import UsageError
from wmark.keys import KEY_FORMAT


def read_token(*, env: str | None = None, file: str | os.PathLike[str] | None = None) -> str | None:
    """The bearer token from an environment variable or a file (never from the command line).

    Raises:
        UsageError: If both or neither-but-empty sources are given, the variable is unset or the file unreadable.
    """
    if env and file:
        raise UsageError("Give the token either from an environment variable or from a file, not both.")
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            raise UsageError(f"The environment variable {env} holding the token is unset or empty; export it first.")
        return _checked_token(value, f"The environment variable {env}")
    if file:
        try:
            value = Path(file).read_text().strip()
        except (OSError, UnicodeDecodeError):
            raise UsageError(f"Cannot read the token file {file}; check the path and its permissions.") from None
        if not value:
            raise UsageError(f"The token file {file} is empty; write the bearer token into it.")
        return _checked_token(value, f"The token file {file}")
    return None


def _checked_token(value: str, source: str) -> str:
    # The token goes to the suspect, who may be the thief: a key file given by mistake must never be sent, and a
    # value no header can carry must be refused here, since httpx's refusal quotes the header (the token) in full.
    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("format") == KEY_FORMAT:
        raise UsageError(f"{source} holds a wmark key, not a token; sending it would give the suspect the key's "
                         "secret, so give the bearer token instead.")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UsageError(f"{source} holds more than one line or control characters; a bearer token is one line.")
    return value
