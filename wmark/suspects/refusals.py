"""The answers and failures of an HTTP suspect that no retry can fix, each said in the one sentence that stops a run.

:class:`~wmark.suspects.http.HttpSuspect` retries timeouts, dropped connections, 408, 429 and 5xx. These are the
rest: a refused token (401/403), an unknown model (404), a redirect (never followed, so the token goes to no other
address), a proxy refusing its credentials (407) and a failed TLS handshake or connection. Every message names the
suspect by its origin or redacted URL (:mod:`wmark.suspects.urls`), never with the credentials a URL may carry.

Example:
    >>> short_reason(OSError("[Errno 111] Connection refused\\nmore detail"))
    '[Errno 111] Connection refused'
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import httpx

from wmark.errors import RuntimeFailure, UsageError
from wmark.suspects.urls import origin, redact_url


def refusal(resp: httpx.Response, url: str, *, has_token: bool, scrub: Callable[[str], str]) -> UsageError | None:
    """The error for an answer that refuses the request for good (401, 403, 404, a redirect), else ``None``.

    Args:
        resp: The answer to a request to ``url``.
        url: The URL asked.
        has_token: Whether a bearer token was sent (a 401 or 403 then means it was refused, else that one is needed).
        scrub: Removes the secrets from text the server chose (a redirect's target may echo the token).
    """
    code = resp.status_code
    if code in (401, 403):
        hint = "the token was refused" if has_token else "it needs a bearer token"
        return UsageError(
            f"The suspect at {origin(url)} answered HTTP {code}: {hint}; pass a valid token from an "
            "environment variable or a file."
        )
    if code == 404:
        return UsageError(
            f"{redact_url(url)} does not exist on the server (HTTP 404); check the URL, the model name and "
            "version."
        )
    if 300 <= code < 400:
        # Following would send the token to wherever the suspect points, another host included; a 3xx
        # naming no target is no answer either, whatever its body says.
        if "location" not in resp.headers:
            return UsageError(f"{redact_url(url)} answered HTTP {code}, a redirect that names no target "
                              "(no Location header), so there is no answer to read; check the URL.")
        try:
            target = redact_url(str(resp.request.url.join(resp.headers["location"])))
        except (httpx.InvalidURL, ValueError):
            target = "an invalid URL"
        target = scrub(target)[:200]
        return UsageError(f"{redact_url(url)} redirects to {target} (HTTP {code}), and redirects are not "
                          "followed so that the token goes nowhere else; give that URL instead if you trust it.")
    return None


def proxy_refusal(url: str, proxy: httpx.Proxy | None) -> UsageError:
    """The error for HTTP 407 (the proxy wants credentials): only the proxy URL in the environment can fix it."""
    named = "" if proxy is None else f" {origin(str(proxy.url))}"
    what = "refused the credentials in its URL" if proxy is not None and proxy.auth else "needs credentials"
    return UsageError(f"The proxy{named} {what} (HTTP 407); set {httpx.URL(url).scheme.upper()}_PROXY to "
                      "http://user:password@host:port with valid ones.")


def tls_failure(exc: BaseException, url: str, *, handshake: bool) -> RuntimeFailure | None:
    """The error for a failed TLS handshake (``handshake``) or TLS connection to ``url``; ``None`` if not TLS's."""
    if not is_tls(exc):
        return None
    if handshake:
        return RuntimeFailure(f"The TLS handshake with {origin(url)} failed ({short_reason(exc)}); check the https "
                              "URL, or the server's certificate.")
    return RuntimeFailure(f"The TLS connection to {origin(url)} failed ({short_reason(exc)}).")


def is_tls(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from (ten deep at most), is a TLS error."""
    seen: BaseException | None = exc
    depth = 0
    while seen is not None and depth < 10:
        if isinstance(seen, ssl.SSLError) or "SSL" in type(seen).__name__ or "CERTIFICATE" in str(seen).upper():
            return True
        seen = seen.__cause__ or seen.__context__
        depth += 1
    return False


def short_reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), at most 160 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
