"""Host name lookups under the timeout of the HTTP suspect client, with a resolver that hangs on one name.

Every ``*.invalid`` name resolves to 127.0.0.1, where real servers run; ``slow.invalid`` only after the test ends
(or 10 s), as a resolver that never answers would.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_http_proxy import HF_LABEL_3, SUSPECT, _ask, _ForwardProxy

from wmark.errors import RuntimeFailure
from wmark.serve import serve_in_background
from wmark.suspects.lookup import Resolver


class _Names:
    """A resolver for ``*.invalid`` names (all 127.0.0.1), hanging on ``slow.invalid`` until ``release``.

    It counts the lookups of each name, and how many hang at once; other names go to the system's resolver.
    """

    def __init__(self, system: Callable[..., Any]) -> None:
        self._system = system
        self.release = threading.Event()
        self.asked: Counter[str] = Counter()
        self.hanging = 0
        self._lock = threading.Lock()

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(host, str) and host.endswith(".invalid")):
            return self._system(host, port, *args, **kwargs)
        with self._lock:
            self.asked[host] += 1
        if host == "slow.invalid":
            with self._lock:
                self.hanging += 1
            self.release.wait(10)
            with self._lock:
                self.hanging -= 1
        return self._system("127.0.0.1", port, *args, **kwargs)


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Names]:
    fake = _Names(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield fake
    fake.release.set()  # the lookups given up on end, and their threads with them


@pytest.fixture
def suspect_port() -> Iterator[int]:
    with serve_in_background(SUSPECT) as server:
        yield int(server.url.rsplit(":", 1)[1])


def test_a_hung_name_lookup_ends_at_the_timeout_and_is_retried(names, suspect_port):
    """getaddrinfo takes no timeout, and httpcore called it before any of its own started: a resolver that hung
    held a query for as long as it hung, whatever the timeout said."""
    started = time.monotonic()
    outcomes = _ask(f"http://slow.invalid:{suspect_port}/m", timeout=0.5, retries=1)
    took = time.monotonic() - started
    assert [(o.status, o.error, o.attempts) for o in outcomes] == [("failed", "no answer within 0.5 s", 2)]
    assert names.asked["slow.invalid"] == 2
    assert took < 2.5  # two attempts of 0.5 s, no backoff, and room for a busy machine (a hung lookup: 10 s each)


def test_a_name_that_resolves_in_time_reaches_its_server(names, suspect_port):
    outcomes = _ask(f"http://fast.invalid:{suspect_port}/m", 2, timeout=5.0)
    assert [(o.status, o.label) for o in outcomes] == [("ok", 3)] * 2
    assert names.asked["fast.invalid"] >= 1


def test_hung_lookups_hold_no_more_threads_than_the_pool_has_connections(names, suspect_port):
    """A lookup given up on cannot be stopped: at most concurrency + 2 of them hang (the pool's connections, here
    3); the queries after them time out waiting for a free one instead of starting a fourth thread."""
    outcomes = _ask(f"http://slow.invalid:{suspect_port}/m", 5, timeout=0.3)
    assert [(o.status, o.error) for o in outcomes] == [("failed", "no answer within 0.3 s")] * 5
    assert names.asked["slow.invalid"] == names.hanging == 3


def test_the_proxy_name_is_looked_up_under_the_timeout_too(names, suspect_port, monkeypatch):
    proxy = _ForwardProxy()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://fast.invalid:{proxy.port}")
        through = _ask(f"http://127.0.0.1:{suspect_port}/m", timeout=5.0)
        monkeypatch.setenv("HTTP_PROXY", f"http://slow.invalid:{proxy.port}")
        started = time.monotonic()
        late = _ask(f"http://127.0.0.1:{suspect_port}/m", timeout=0.5)
        took = time.monotonic() - started
    finally:
        proxy.close()
    assert [(o.status, o.label) for o in through] == [("ok", 3)]
    assert [(method, target) for method, target, _ in proxy.seen] == [("POST", f"http://127.0.0.1:{suspect_port}/m")]
    assert [(o.status, o.error) for o in late] == [("failed", "no answer within 0.5 s")]
    assert took < 1.5


def _tls_server(directory: Path) -> tuple[ThreadingHTTPServer, Path]:
    """An HTTPS server on 127.0.0.1 answering ``HF_LABEL_3``, certified for ``fast.invalid`` by a CA it returns."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def certify(subject: str, key: Any, issuer: str, signer: Any, *, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                                  critical=False)
                   .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                                                decipher_only=False), critical=True))
        if not ca:
            builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_pem = directory / "ca.pem"
    ca_pem.write_bytes(certify("wmark test CA", ca_key, "wmark test CA", ca_key, ca=True)
                       .public_bytes(serialization.Encoding.PEM))
    leaf_pem, key_pem = directory / "leaf.pem", directory / "leaf.key"
    leaf_pem.write_bytes(certify("fast.invalid", leaf_key, "wmark test CA", ca_key, ca=False)
                         .public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps(HF_LABEL_3).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.block_on_close = False
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(leaf_pem, key_pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server, ca_pem


def test_tls_checks_the_host_name_not_the_address_it_resolved_to(names, tmp_path, monkeypatch):
    """The client connects to the address a lookup found, but the handshake still names and checks the host."""
    server, ca_pem = _tls_server(tmp_path)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem))
        port = server.server_address[1]
        outcomes = _ask(f"https://fast.invalid:{port}/m", timeout=5.0)
        with pytest.raises(RuntimeFailure, match=rf"^The TLS handshake with https://other.invalid:{port} failed "
                                                 r"\(.*Hostname mismatch.*'other\.invalid'"):
            _ask(f"https://other.invalid:{port}/m", timeout=5.0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert [(o.status, o.label) for o in outcomes] == [("ok", 3)]


def test_an_address_is_not_looked_up(names):
    assert Resolver(bound=1).addresses("127.0.0.1", 80, timeout=0.1) == ["127.0.0.1"]
    assert Resolver(bound=1).addresses("::1", 80, timeout=0.1) == ["::1"]
    assert names.asked == Counter()


def test_a_name_without_an_address_is_a_connect_error(monkeypatch):
    def unknown(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(httpcore.ConnectError, match="Name or service not known"):
        Resolver(bound=1).addresses("nowhere.invalid", 80, timeout=1.0)
