"""How a suspect's URL is named where others can read it: without the credentials it may carry.

A URL given for a suspect or a proxy may hold a user and password (``http://user:pw@host``) or a token in its query
string (``?api_key=…``); messages, logs, transcripts and reports name it by :func:`redact_url` or :func:`origin`.

Example:
    >>> redact_url("https://user:pw@api.example/v2/models/m/infer?api_key=s3cret")
    'https://api.example/v2/models/m/infer'
    >>> origin("http://user:pw@proxy.example:3128/")
    'http://proxy.example:3128'
"""

from __future__ import annotations

import httpx


def redact_url(url: str) -> str:
    """The URL without user info or query string, which may carry credentials (for logs and reports)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return url
    return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: where a request goes, without its path, query or credentials."""
    try:
        parsed = httpx.URL(url)
        return f"{parsed.scheme}://{parsed.host}" + (f":{parsed.port}" if parsed.port else "")
    except (httpx.InvalidURL, TypeError):
        return url
