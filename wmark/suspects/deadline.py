"""An httpx transport that holds a whole HTTP exchange to one deadline, not each socket operation to a timeout.

httpx's timeouts bound each connect, read and write: a server that trickles its status line and headers a byte at a
time, every byte inside the read timeout, holds a request for as long as it likes. :class:`DeadlineTransport` runs
httpcore's connection pool (its public ``network_backend`` hook) on streams whose every operation waits at most the
time left before the deadline of the request being served, so looking the host name up (on a thread of a
:class:`~wmark.suspects.lookup.Resolver`: the system's lookup takes no timeout), connecting, sending, the status
line, the headers and the body all fit in it, and a late one raises the timeout httpx would. The deadline travels
with its request (the :data:`DEADLINE` extension, a :func:`time.monotonic` instant), so concurrent requests
sharing the pool, each served on its caller's thread, keep their own.

Only what the suspect client needs is built: HTTP/1.1, directly or through the proxy that
:class:`~wmark.suspects.proxies.Proxies` selects for the request, whose connection holds to the deadline as well
(httpx reads no proxy from the environment for a client given its own transport: the caller passes
:meth:`~wmark.suspects.proxies.Proxies.from_environment`).

Example:
    >>> import httpx, time
    >>> with httpx.Client(transport=DeadlineTransport(verify=True, limits=httpx.Limits())) as client:
    ...     request = client.build_request("GET", "http://127.0.0.1:9/", extensions={DEADLINE: time.monotonic() + 5})
    >>> sorted(request.extensions)
    ['timeout', 'wmark.deadline']
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

from wmark.suspects.lookup import Resolver
from wmark.suspects.proxies import Proxies

DEADLINE = "wmark.deadline"
_LOOKUPS = 8  # name lookups at once when the pool's connections are unlimited

# Most specific first: an httpcore error becomes the first httpx error whose httpcore twin it is an instance of.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


class _Deadline(threading.local):
    """The deadline of the request this thread is serving (``None``: none, each operation keeps its timeout)."""

    at: float | None = None

    @contextlib.contextmanager
    def within(self, at: float | None) -> Iterator[None]:
        before, self.at = self.at, at
        try:
            yield
        finally:
            self.at = before

    def cap(self, timeout: float | None, late: type[httpcore.TimeoutException]) -> float | None:
        """``timeout`` cut to the time left; raises ``late`` once none is (a zero socket timeout would not block)."""
        if self.at is None:
            return timeout
        left = self.at - time.monotonic()
        if left <= 0:
            raise late("the request's deadline passed")
        return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.cap(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.cap(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, self._deadline.cap(timeout, httpcore.ConnectTimeout))
        return _Stream(inner, self._deadline)

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, deadline: _Deadline, resolver: Resolver) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline
        self._resolver = resolver

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        # The name is looked up here, under the deadline, and each address connected to in turn as
        # socket.create_connection would; TLS still checks the host name, which httpcore passes to start_tls.
        addresses = self._resolver.addresses(host, port, self._deadline.cap(timeout, httpcore.ConnectTimeout))
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            left = self._deadline.cap(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(address, port, left, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:  # the next address may answer
                failure = exc
                continue
            return _Stream(stream, self._deadline)
        raise failure or httpcore.ConnectError(f"{host} has no address")


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for raw, mapped in _ERRORS:
            if isinstance(exc, raw):
                raise mapped(str(exc)) from exc
        raise


class _Body(httpx.SyncByteStream):
    """A response body read under its request's deadline, one part at a time (the caller runs between parts)."""

    def __init__(self, parts: Iterable[bytes], deadline: _Deadline, at: float | None) -> None:
        self._parts = parts
        self._deadline = deadline
        self._at = at

    def __iter__(self) -> Iterator[bytes]:
        parts = iter(self._parts)
        while True:
            with self._deadline.within(self._at), _as_httpx_errors():
                part = next(parts, None)
            if part is None:
                return
            yield part

    def close(self) -> None:
        close = getattr(self._parts, "close", None)
        if close is not None:
            close()


class DeadlineTransport(httpx.BaseTransport):
    """HTTP/1.1 connections whose exchanges end by their request's :data:`DEADLINE`, when it has one.

    Args:
        verify: Check TLS certificates (``True``), not (``False``), or against this CA bundle path; an https://
            proxy is checked the same way.
        limits: Connection pool sizes (of each proxy's pool too); ``max_connections`` also bounds the host name
            lookups running at once, hung ones included.
        proxies: Which proxy carries a request (``None``: every request goes directly).
    """

    def __init__(self, *, verify: bool | str, limits: httpx.Limits, proxies: Proxies | None = None) -> None:
        self._deadline = _Deadline()
        # Shared by every pool, so a hung resolver holds at most this many threads, however many proxies there are.
        self._resolver = Resolver(bound=limits.max_connections or _LOOKUPS)
        self._verify = verify
        self._limits = limits
        self._proxies = proxies
        self._pool = httpcore.ConnectionPool(**self._pool_options())
        self._via: dict[tuple[str, tuple[bytes, bytes] | None], httpcore.HTTPProxy] = {}
        self._lock = threading.Lock()

    def proxy_for(self, url: httpx.URL) -> httpx.Proxy | None:
        """The proxy a request to ``url`` goes through, ``None`` when it goes directly (see :meth:`Proxies.select`)."""
        return None if self._proxies is None else self._proxies.select(url)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        at = request.extensions.get(DEADLINE)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                             target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        pool = self._pool_for(request.url)
        with self._deadline.within(at), _as_httpx_errors():
            resp = pool.handle_request(core)
        assert isinstance(resp.stream, Iterable)  # a sync pool's body, never an async one
        return httpx.Response(status_code=resp.status, headers=resp.headers,
                              stream=_Body(resp.stream, self._deadline, at), extensions=resp.extensions)

    def close(self) -> None:
        with self._lock:
            pools = [self._pool, *self._via.values()]
        for pool in pools:
            pool.close()

    def _pool_for(self, url: httpx.URL) -> httpcore.ConnectionPool:
        proxy = self.proxy_for(url)
        if proxy is None:
            return self._pool
        # Keyed by the credentials too: HTTP_PROXY and HTTPS_PROXY may name one proxy as two users.
        name = (str(proxy.url), proxy.raw_auth)
        with self._lock:
            if name not in self._via:
                https = proxy.url.scheme == "https"
                self._via[name] = httpcore.HTTPProxy(
                    proxy_url=httpcore.URL(scheme=proxy.url.raw_scheme, host=proxy.url.raw_host, port=proxy.url.port,
                                           target=proxy.url.raw_path),
                    proxy_auth=proxy.raw_auth,
                    proxy_ssl_context=httpx.create_ssl_context(verify=self._verify) if https else None,
                    **self._pool_options(),
                )
            return self._via[name]

    def _pool_options(self) -> dict[str, Any]:
        return {
            "ssl_context": httpx.create_ssl_context(verify=self._verify),
            "max_connections": self._limits.max_connections,
            "max_keepalive_connections": self._limits.max_keepalive_connections,
            "keepalive_expiry": self._limits.keepalive_expiry,
            "network_backend": _Backend(self._deadline, self._resolver),
        }
