"""The proxy, if any, that carries the requests to a suspect, read from the environment as httpx and curl read it.

``HTTP_PROXY`` and ``HTTPS_PROXY`` name the proxy for http:// and https:// suspects, ``ALL_PROXY`` the one for
either when its own is not set, and ``NO_PROXY`` the hosts reached directly: comma-separated domains (each
covers its subdomains; a leading dot changes nothing), IP addresses or networks (``10.0.0.0/8``), any of them
with a ``:port``, or ``*`` for every host. The standard library reads the variables
(:func:`urllib.request.getproxies`, which falls back on the system settings on macOS and Windows): lower-case
names win over upper-case ones, an empty lower-case name turns a proxy off, and ``HTTP_PROXY`` is ignored while
``REQUEST_METHOD`` is set (in a CGI script, a client's ``Proxy:`` header sets it). A proxy URL without a scheme
is an http:// one, as in httpx.

An http:// suspect is asked through the proxy in absolute form (``POST http://host/path``), so the proxy reads the
whole request, bearer token included, as every router on the way to a plain HTTP server can: httpx and curl do
the same. An https:// suspect is reached through a ``CONNECT`` tunnel with TLS to the suspect inside it, so the
proxy sees the host and port only, never the token. Credentials in a proxy URL (``http://user:pass@proxy:3128``)
go to that proxy as ``Proxy-Authorization`` and nowhere else: a proxy is named by its URL without them, and
:meth:`Proxies.secrets` lists the forms an answer is scrubbed of.

Example:
    >>> proxies = Proxies({"http": "user:pw@proxy.example:3128", "no": "localhost,.internal.example"})
    >>> str(proxies.select(httpx.URL("http://api.example/v2")).url)
    'http://proxy.example:3128'
    >>> proxies.select(httpx.URL("http://gpu.internal.example/v2")) is None
    True
"""

from __future__ import annotations

import base64
import ipaddress
import urllib.request
from collections.abc import Mapping

import httpx

from wmark.errors import UsageError

_DEFAULT_PORTS = {"http": 80, "https": 443}


class Proxies:
    """Proxy settings, scheme by scheme, read once (as httpx reads them when a client is made).

    Args:
        settings: What :func:`urllib.request.getproxies` returns: a proxy URL per scheme (``http``, ``https``,
            ``all``), and the ``NO_PROXY`` list under ``no``.
    """

    def __init__(self, settings: Mapping[str, str]) -> None:
        self._settings = {scheme: value for scheme, value in settings.items() if value}

    @classmethod
    def from_environment(cls) -> Proxies:
        """The settings of this process's environment (and system, on macOS and Windows)."""
        return cls(urllib.request.getproxies())

    def select(self, url: httpx.URL) -> httpx.Proxy | None:
        """The proxy that carries a request to ``url``, or ``None`` to connect directly.

        Raises:
            UsageError: When the proxy named for ``url`` is not an http:// or https:// URL.
        """
        raw = self._settings.get(url.scheme) or self._settings.get("all")
        if raw is None or self._bypassed(url):
            return None
        proxy = _parse(raw)
        if proxy is None or proxy.scheme not in ("http", "https") or not proxy.host:
            named = "not a URL" if proxy is None else str(proxy.copy_with(username=None, password=None))
            raise UsageError(
                f"The proxy set for {url.scheme}:// URLs ({named}) is not an http:// or https:// proxy, the only kinds "
                f"supported; set {url.scheme.upper()}_PROXY to one, or add {url.host} to NO_PROXY."
            )
        return httpx.Proxy(proxy)

    def secrets(self) -> set[str]:
        """Every form of every proxy password that must not appear in an answer, a message or a report."""
        forms: set[str] = set()
        for scheme in ("http", "https", "all"):
            proxy = _parse(self._settings.get(scheme, ""))
            if proxy is None or not proxy.password:
                continue
            sent = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()  # Proxy-Authorization
            for secret in (proxy.password, proxy.userinfo.decode("ascii").partition(":")[2], sent):
                forms |= {secret, secret.replace("/", "\\/")}
        return forms

    def _bypassed(self, url: httpx.URL) -> bool:
        host, port = url.host.lower(), url.port or _DEFAULT_PORTS.get(url.scheme, 0)
        return any(_covers(entry.strip().lower(), host, port) for entry in self._settings.get("no", "").split(","))


def _covers(entry: str, host: str, port: int) -> bool:
    """Whether one ``NO_PROXY`` entry covers ``host:port``.

    An entry is ``*``, an IP address or network (``10.0.0.0/8``), or a domain (covering its subdomains), any of
    them with an optional ``:port``.
    """
    if entry == "*":
        return True
    name, colon, wanted = entry.rpartition(":")
    if colon and wanted.isdigit() and _network(entry) is None:  # "::1" is an address, not "::" and a port
        if int(wanted) != port:
            return False
        entry = name
    entry = entry.strip("[]").lstrip(".")
    network = _network(entry)
    if network is None:
        return bool(entry) and (host == entry or host.endswith("." + entry))
    try:
        return ipaddress.ip_address(host) in network
    except ValueError:  # a host name: only a name entry covers it
        return False


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


def _parse(raw: str) -> httpx.URL | None:
    """The URL a proxy setting names (no scheme: http://), or ``None`` when it is none."""
    if not raw:
        return None
    try:
        return httpx.URL(raw if "://" in raw else f"http://{raw}")
    except (httpx.InvalidURL, TypeError):
        return None
