"""The HTTP suspect client behind a proxy from the environment, against a real forward proxy on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import urllib.parse
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from servekit import unused_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wmark.errors import RuntimeFailure, UsageError
from wmark.serve import serve_in_background
from wmark.suspects.http import HttpOptions, open_http_suspect
from wmark.suspects.proxies import Proxies

HF_LABEL_3 = [{"label": "LABEL_3", "score": 0.9}, {"label": "LABEL_1", "score": 0.1}]
USER, PASSWORD = "alice", "s3cret/pw@corp"
CREDENTIALS = f"{USER}:{urllib.parse.quote(PASSWORD, safe='')}"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class _Server(ThreadingHTTPServer):
    block_on_close = False  # a kept-alive connection must not hold the test at close


class _ForwardProxy:
    """A forward proxy on 127.0.0.1 (http.server, a thread per connection) that records every request it gets.

    It forwards an absolute-form request (``POST http://127.0.0.1:PORT/m``) to its target and relays the answer
    (dropping ``Proxy-Authorization``, unless ``leaky``), answers 407 to a request without ``Proxy-Authorization:
    auth`` when ``auth`` is set, answers a ``CONNECT`` with 502 (it opens no tunnels), and with ``trickle`` sends
    its status line and headers a byte every 20 ms (3 s in all) instead of forwarding.
    """

    def __init__(self, *, auth: str | None = None, leaky: bool = False) -> None:
        self.seen: list[tuple[str, str, Message]] = []
        self.auth, self.leaky, self.trickle = auth, leaky, False
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                proxy._handle(self)

            do_GET = do_CONNECT = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        self.seen.append((h.command, h.path, h.headers))
        if self.auth is not None and h.headers.get("Proxy-Authorization") != self.auth:
            self._answer(h, 407, b"", [("Proxy-Authenticate", 'Basic realm="corp"')])
        elif h.command == "CONNECT":
            self._answer(h, 502, b"")
        elif self.trickle:
            try:
                for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 130 + b"\r\nContent-Length: 2\r\n\r\n[]":
                    if self._stop.is_set():
                        return
                    h.wfile.write(bytes([byte]))
                    h.wfile.flush()
                    time.sleep(0.02)
            except OSError:  # the client gave up and closed the connection, as it should
                h.close_connection = True
        else:
            target = urllib.parse.urlsplit(h.path)
            dropped = {"connection", "proxy-connection"} | (set() if self.leaky else {"proxy-authorization"})
            conn = http.client.HTTPConnection(target.hostname or "", target.port, timeout=5)
            conn.request(h.command, target.path, body, {k: v for k, v in h.headers.items() if k.lower() not in dropped})
            resp = conn.getresponse()
            self._answer(h, resp.status, resp.read(), [(k, v) for k, v in resp.getheaders()
                                                       if k.lower() not in ("connection", "content-length")])
            conn.close()

    @staticmethod
    def _answer(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
        h.send_response(status)
        for name, value in headers:
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


async def _answer(request: Request) -> Response:
    """An HF-style prediction, or at ``/echo`` a 400 that quotes the credentials it got (a debugging endpoint)."""
    if request.url.path == "/echo":
        quoted = f"{request.headers.get('proxy-authorization')} and {request.headers.get('authorization')}"
        return JSONResponse({"error": f"bad credentials {quoted}"}, status_code=400)
    return Response(json.dumps(HF_LABEL_3), media_type="application/json")


SUSPECT = Starlette(routes=[Route("/{path:path}", _answer, methods=["POST"])])


@pytest.fixture
def env(monkeypatch):
    """No proxy settings but the test's own (the machine running the tests may have some)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


@pytest.fixture
def proxy():
    server = _ForwardProxy()
    yield server
    server.close()


def _hf(url: str, **options: Any):
    return open_http_suspect(url=url, protocol="json", template="hf", num_classes=4, input_shape=(2,),
                             token=options.pop("token", "tok-123"),
                             options=HttpOptions(**{"backoff": 0.0, "retries": 0, **options}), seed=0)


def _ask(url: str, n: int = 1, **options: Any) -> list[Any]:
    suspect = _hf(url, **options)
    try:
        return [outcome for _, outcome in sorted(suspect.stream(np.zeros((n, 2), dtype=np.float32)))]
    finally:
        suspect.close()


@pytest.mark.parametrize("name", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_answers_arrive_through_the_proxy_the_environment_names(env, name):
    """The deadline transport made httpx ignore the environment's proxies: a suspect reachable only through a
    corporate proxy could not be probed. The http:// suspect's token goes to an http proxy, as httpx and curl send it."""
    proxy = _ForwardProxy(auth=BASIC)
    try:
        env.setenv(name, f"http://{CREDENTIALS}@127.0.0.1:{proxy.port}")
        with serve_in_background(SUSPECT) as server:
            outcomes = _ask(f"{server.url}/m", 3, concurrency=2)
    finally:
        proxy.close()
    assert [(o.status, o.label) for o in outcomes] == [("ok", 3)] * 3
    assert [(method, target) for method, target, _ in proxy.seen] == [("POST", f"{server.url}/m")] * 3
    assert {(h["Proxy-Authorization"], h["Authorization"]) for _, _, h in proxy.seen} == {(BASIC, "Bearer tok-123")}


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "*", "localhost, 127.0.0.0/8", "{port},127.0.0.1:{port}"])
def test_a_host_no_proxy_covers_is_reached_directly(env, proxy, no_proxy):
    with serve_in_background(SUSPECT) as server:
        env.setenv("HTTP_PROXY", proxy.url)
        env.setenv("NO_PROXY", no_proxy.format(port=server.url.rsplit(":", 1)[1]))
        outcomes = _ask(f"{server.url}/m", 2)
    assert [(o.status, o.label) for o in outcomes] == [("ok", 3)] * 2
    assert proxy.seen == []


def test_which_proxy_carries_a_request():
    proxies = Proxies({"http": "proxy:3128", "all": "http://all.example:8080", "https": "",
                       "no": "localhost,.internal.example, 10.0.0.0/8,[::1]:9000,api.example:8443"})

    def via(url: str) -> str | None:
        proxy = proxies.select(httpx.URL(url))
        return None if proxy is None else str(proxy.url)

    assert via("http://api.example/m") == "http://proxy:3128"
    assert via("https://api.example/m") == "http://all.example:8080"  # an empty setting is none
    assert via("https://api.example:8443/m") is None
    assert [via(f"http://{host}/m") for host in ("internal.example", "gpu.internal.example", "localhost",
                                                 "10.2.3.4", "[::1]:9000")] == [None] * 5
    assert {via(f"http://{host}/m") for host in ("xinternal.example", "11.2.3.4", "[::1]:9001")} == \
        {"http://proxy:3128"}
    with pytest.raises(UsageError, match=r"^The proxy set for https:// URLs \(socks5://socks.example:1080\) is not an "
                                         r"http:// or https:// proxy, the only kinds supported; set HTTPS_PROXY to one, "
                                         r"or add api.example to NO_PROXY\.$"):
        Proxies({"all": f"socks5://{CREDENTIALS}@socks.example:1080"}).select(httpx.URL("https://api.example/m"))


def test_a_proxy_trickling_its_headers_is_abandoned_at_the_timeout(env, proxy):
    env.setenv("HTTP_PROXY", proxy.url)
    proxy.trickle = True
    with serve_in_background(SUSPECT) as server:
        start = time.perf_counter()
        outcomes = _ask(f"{server.url}/m", timeout=0.3)
        elapsed = time.perf_counter() - start
    assert [(o.status, o.error) for o in outcomes] == [("failed", "no answer within 0.3 s")]
    assert len(proxy.seen) == 1
    assert elapsed < 1.5  # 3 s of trickled headers


def _must_not_leak(text: str) -> None:
    for secret in (PASSWORD, urllib.parse.quote(PASSWORD, safe=""), BASIC.split()[1], USER):
        assert secret not in text


def test_a_proxy_that_cannot_be_reached_is_named_without_its_credentials(env):
    port = unused_port()
    env.setenv("HTTP_PROXY", f"http://{CREDENTIALS}@127.0.0.1:{port}")
    with pytest.raises(RuntimeFailure, match=rf"^Cannot reach the suspect at http://127.0.0.1:9 \(cannot connect "
                                             rf"through the proxy http://127.0.0.1:{port} \(") as caught:
        _ask("http://127.0.0.1:9/m")
    _must_not_leak(str(caught.value))


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_refusing_its_credentials_stops_the_run_in_one_sentence_naming_none(env, scheme):
    proxy = _ForwardProxy(auth="Basic b3RoZXI6dXNlcg==")
    try:
        env.setenv(f"{scheme.upper()}_PROXY", f"http://{CREDENTIALS}@127.0.0.1:{proxy.port}")
        with pytest.raises(UsageError, match=rf"^The proxy {proxy.url} refused the credentials in its URL \(HTTP 407\); "
                                             rf"set {scheme.upper()}_PROXY to http://user:password@host:port with valid "
                                             r"ones\.$") as caught:
            _ask(f"{scheme}://127.0.0.1:9/m")
    finally:
        proxy.close()
    _must_not_leak(str(caught.value))
    assert len(proxy.seen) == 1


def test_an_https_suspect_is_tunnelled_so_the_proxy_never_sees_the_token(env, proxy):
    env.setenv("HTTPS_PROXY", proxy.url)
    with pytest.raises(RuntimeFailure, match=rf"^Cannot reach the suspect at https://127.0.0.1:9 \(no tunnel through "
                                             rf"the proxy {proxy.url} \(502 Bad Gateway\)\); check the URL"):
        _ask("https://127.0.0.1:9/m", retries=1)
    assert [(method, target) for method, target, _ in proxy.seen] == [("CONNECT", "127.0.0.1:9")] * 2
    assert all("Authorization" not in headers for _, _, headers in proxy.seen)


def test_proxy_credentials_a_suspect_echoes_are_scrubbed_from_its_answers(env):
    """A proxy that forwards Proxy-Authorization to a suspect quoting the headers it got must not put the
    proxy's password in the transcript or a message, as the bearer token never gets there."""
    proxy = _ForwardProxy(auth=BASIC, leaky=True)
    try:
        env.setenv("HTTP_PROXY", f"http://{CREDENTIALS}@127.0.0.1:{proxy.port}")
        with serve_in_background(SUSPECT) as server, \
                pytest.raises(UsageError, match=r"\(HTTP 400: bad credentials Basic \[proxy password\] and Bearer \[token\]\)") \
                as caught:
            _ask(f"{server.url}/echo")
    finally:
        proxy.close()
    _must_not_leak(str(caught.value))
