"""Reading what a prediction API sent back: its body within a size limit, and which bodies are an error object.

:mod:`wmark.suspects.http` uses these to decide whether a body is retried, read as an answer, or refused; they
touch no network themselves.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from typing import Any

MAX_ANSWER_BYTES = 4 * 2**20
"""The largest answer read (after content decoding); a larger one is a malformed answer, never held whole."""

ACCEPT_ENCODING = "gzip, deflate"
"""The content encodings asked for, and the only ones :class:`BoundedBody` decodes."""

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



def decode_body(raw: bytes) -> tuple[str, bool]:
    """The body as text, and whether it is text at all: JSON is UTF-8 (RFC 8259).

    A UTF-8 byte order mark and UTF-16 or UTF-32 (which :func:`json.loads` detects in bytes) are decoded too; a
    body that does not decode comes back with U+FFFD in place of its bad bytes, for the record, and ``False``:
    reading it as JSON would read names (labels) the server never sent.
    """
    try:
        return raw.decode(json.detect_encoding(raw)), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def server_message(text: str, reason: str) -> str:
    """The short message of an error answer: its ``error`` member when it is a JSON object with one, else its text."""
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])[:200]
    except (ValueError, RecursionError):
        pass
    return (text or reason or "no message")[:200].strip() or "no message"


def scrubbed(text: str, secrets: Sequence[tuple[str, str]]) -> str:
    """``text`` with each secret (the token, a proxy password) replaced by its placeholder, in any JSON spelling.

    JSON may write any character as ``\\uXXXX``: a suspect echoing the token so would slip past its literal
    forms, so a JSON text that holds a secret once decoded is kept as its canonical spelling, scrubbed.

    Args:
        secrets: ``(form, placeholder)`` pairs, longest form first (one may hold another).
    """
    for form, placeholder in secrets:
        text = text.replace(form, placeholder)
    if not secrets or "\\u" not in text:
        return text
    try:
        canonical = json.dumps(json.loads(text), ensure_ascii=False)
    except (ValueError, RecursionError):
        return text
    if not any(form in canonical for form, _ in secrets):
        return text
    for form, placeholder in secrets:
        canonical = canonical.replace(form, placeholder)
    return canonical


class BoundedBody:
    """An answer's body, decoded from its content encoding chunk by chunk and never held past ``limit`` bytes.

    httpx inflates each network chunk whole: 64 KiB of gzip can hold 64 MiB of answer, in memory at once before
    any limit is checked. Here inflating stops one byte past the limit. Decodes identity, gzip and deflate (zlib
    format); a body in another encoding, or whose compressed data is corrupt, is not read.

    Args:
        encoding: The ``Content-Encoding`` header's value.
        limit: The most decoded bytes kept.

    Attributes:
        problem: Why the body is not readable (it is too large, in an encoding not asked for, or corrupt), else ``""``.
    """

    def __init__(self, encoding: str, limit: int = MAX_ANSWER_BYTES) -> None:
        self.name = encoding.strip().lower()
        self.limit = limit
        self.problem = ""
        self._chunks: list[bytes] = []
        self._size = 0
        self._inflater = None
        if self.name in ("gzip", "x-gzip", "deflate"):
            self._inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # reads a gzip or a zlib header
        elif self.name not in ("", "identity"):
            self.problem = f"an answer in the content encoding {encoding.strip()[:40]!r}, which was not asked for"

    def feed(self, data: bytes) -> bool:
        """Add raw bytes from the wire; ``False`` once the body is not readable (stop reading then)."""
        if self.problem:
            return False
        if self._inflater is None:
            return self._keep(data)
        try:
            while data:
                # Small pieces: inflating a large one at once holds it twice (zlib's blocks, then the joined bytes).
                if not self._keep(self._inflater.decompress(data, min(self.limit + 1 - self._size, 2**16))):
                    return False
                data = self._inflater.unconsumed_tail
        except zlib.error:
            self.problem = f"an answer whose {self.name} data is corrupt"
            return False
        return True

    @property
    def content(self) -> bytes:
        """The decoded body; empty when it is not readable."""
        return b"" if self.problem else b"".join(self._chunks)

    def _keep(self, piece: bytes) -> bool:
        self._size += len(piece)
        if self._size > self.limit:
            self.problem, self._chunks = f"an answer larger than {self.limit} bytes", []
            return False
        self._chunks.append(piece)
        return True
