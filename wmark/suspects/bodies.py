"""Reading what a prediction API sent back: which bodies are an error object in place of an answer.

:mod:`wmark.suspects.http` uses these rules to decide whether a body is retried, read as an answer, or
refused; they touch no network themselves.
"""

from __future__ import annotations

import math
from typing import Any

ERROR_BODY_MEMBERS = frozenset({"error", "error_type", "estimated_time", "warnings", "code"})
"""The only members an error body may have: the envelopes of the Hugging Face Inference API, Text Generation
Inference, and the bare ``{"error": ...}`` of v2 and TF Serving servers."""


def error_body(doc: Any) -> tuple[str, float | None] | None:
    """The message and suggested wait (seconds) of an error object answered in place of a prediction, else ``None``.

    Some servers answer a transient failure with HTTP 200 and an error object, such as the Hugging Face
    Inference API's ``{"error": "Model x is currently loading", "estimated_time": 20.0}``. A decoded JSON body is
    an error body when it is an object whose ``error`` is a non-blank string (or a list of strings, not all
    blank) and whose other members are only those in ``ERROR_BODY_MEMBERS``. An object with any other member
    (``outputs``, ``predictions``, a label, a score) is not one, so an answer that carries a prediction beside
    an ``error`` is never taken for a failure. ``estimated_time`` is the wait when it is a number of seconds, at
    least 0 (the caller caps it); otherwise there is none.

    Args:
        doc: The decoded JSON body.
    """
    if not isinstance(doc, dict) or "error" not in doc or not set(doc) <= ERROR_BODY_MEMBERS:
        return None
    error = doc["error"]
    messages = [error] if isinstance(error, str) else error if isinstance(error, list) else []
    if not all(isinstance(m, str) for m in messages) or not any(m.strip() for m in messages):
        return None
    eta = doc.get("estimated_time")
    try:
        wait = float(eta) if isinstance(eta, (int, float)) and not isinstance(eta, bool) else math.nan
    except OverflowError:  # an integer beyond any float: as long a wait as infinity
        wait = math.inf
    return "; ".join(m.strip() for m in messages if m.strip()), wait if wait >= 0 else None
