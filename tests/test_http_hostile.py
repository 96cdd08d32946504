"""The HTTP client against flaky or hostile suspect servers (real servers on 127.0.0.1): error bodies answered
with 200, redirects, compressed bombs, bodies that are not UTF-8."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from wmark.errors import UsageError
from wmark.serve import serve_in_background
from wmark.suspects.bodies import error_body
from wmark.suspects.http import HttpOptions, open_http_suspect

LOADING = {"error": "Model m is currently loading", "estimated_time": 0.3}
HF_LABEL_3 = [{"label": "LABEL_3", "score": 0.9}, {"label": "LABEL_1", "score": 0.1}]


def _scripted(answers: list[Any]) -> tuple[Starlette, dict[str, int]]:
    """A JSON endpoint at /m whose n-th answer is ``answers[n]`` (the last one repeats).

    An answer is a JSON-able document (sent with 200), a ``(status, document)`` pair, or a :class:`Response`.
    """
    calls = {"n": 0}

    async def answer(_: Request) -> Response:
        action = answers[min(calls["n"], len(answers) - 1)]
        calls["n"] += 1
        if isinstance(action, Response):
            return action
        status, doc = action if isinstance(action, tuple) else (200, action)
        return Response(json.dumps(doc), status_code=status, media_type="application/json")

    return Starlette(routes=[Route("/m", answer, methods=["POST"])]), calls


def _hf(url: str, **options: Any):
    return open_http_suspect(url=f"{url}/m", protocol="json", template=options.pop("template", "hf"), num_classes=4,
                             input_shape=(2,), options=HttpOptions(**{"backoff": 0.0, **options}), seed=0)


def test_an_error_body_answered_with_200_is_retried_after_its_estimated_time_never_recorded():
    """The Hugging Face Inference API's {"error": "Model x is currently loading", "estimated_time": 20.0} answered
    with 200 was stored as a malformed answer, reused on every resume and never retried."""
    app, calls = _scripted([(503, LOADING), LOADING, HF_LABEL_3])
    with serve_in_background(app) as server:
        suspect = _hf(server.url, retries=3)
        start = time.perf_counter()
        [(_, outcome)] = suspect.stream(np.zeros((1, 2), dtype=np.float32))
        elapsed = time.perf_counter() - start
        suspect.close()
    assert (outcome.status, outcome.label, outcome.attempts, calls["n"]) == ("ok", 3, 3, 3)
    assert elapsed >= 0.6  # both waits were the body's estimated_time, although the backoff is 0


def test_an_error_body_that_never_clears_fails_the_query_like_an_exhausted_503():
    endless = {"error": "Model m is currently loading", "estimated_time": 1e9, "warnings": ["cold start"]}
    app, calls = _scripted([HF_LABEL_3, endless])
    with serve_in_background(app) as server:
        suspect = _hf(server.url, retries=2, max_retry_after=0.2)
        start = time.perf_counter()
        outcomes = [o for _, o in suspect.stream(np.zeros((2, 2), dtype=np.float32))]
        elapsed = time.perf_counter() - start
        suspect.close()
    assert outcomes[0].label == 3
    failed = outcomes[1]
    assert (failed.status, failed.label, failed.answer, failed.http_status, failed.attempts) == \
        ("failed", -1, None, 200, 3)
    assert failed.error == "HTTP 200 error body: Model m is currently loading"
    assert calls["n"] == 4
    assert 0.4 <= elapsed < 2.0  # the estimate of 1e9 s was cut to max_retry_after, not obeyed nor fatal


def test_an_answer_read_from_an_error_member_is_an_answer(tmp_path):
    """A template reading its label from `error` must get its answers, however much they look like error bodies."""
    template = tmp_path / "t.json"
    template.write_text(json.dumps({"request": {"x": "$input_flat"}, "response": [{"label": "error"}]}))
    app, calls = _scripted([{"error": "LABEL_2"}])
    with serve_in_background(app) as server:
        suspect = _hf(server.url, template=str(template), retries=2)
        [(_, outcome)] = suspect.stream(np.zeros((1, 2), dtype=np.float32))
        suspect.close()
    assert (outcome.status, outcome.label, outcome.attempts, calls["n"]) == ("ok", 2, 1, 1)


def test_which_bodies_are_error_bodies():
    assert error_body(LOADING) == ("Model m is currently loading", 0.3)
    assert error_body({"error": ["bad input", " "], "warnings": [], "code": 7}) == ("bad input", None)
    assert error_body({"error": "x", "error_type": "overloaded", "estimated_time": "soon"}) == ("x", None)
    assert error_body({"error": "x", "estimated_time": 10**400}) == ("x", float("inf"))
    assert error_body({"error": "x", "estimated_time": -1}) == ("x", None)
    not_errors: list[Any] = [
        {"error": "x", "outputs": []}, {"error": "x", "label": 3}, {"error": "  "}, {"error": []},
        {"error": None}, {"error": 3}, {"error": {"message": "x"}}, {"error": ["x", 3]}, {"estimated_time": 2},
        [{"error": "x"}], "error", None,
    ]
    assert [error_body(doc) for doc in not_errors] == [None] * len(not_errors)


def test_a_redirect_is_refused_naming_its_target_and_the_token_never_follows():
    """A redirect came back as an answer that "is not JSON" (the metadata's "is this the right protocol?"), which
    named neither the redirect nor where it pointed; it is refused in one sentence, and nothing reaches the target."""
    from httpkit import v2_meta
    from starlette.responses import JSONResponse, RedirectResponse

    seen: list[str | None] = []

    async def elsewhere(request: Request) -> Response:
        seen.append(request.headers.get("authorization"))
        return JSONResponse({"outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}]})

    other = Starlette(routes=[Route("/{path:path}", elsewhere, methods=["GET", "POST"])])
    with serve_in_background(other) as target:
        async def meta(request: Request) -> Response:
            if request.path_params["model"] == "moved":
                return RedirectResponse(f"{target.url}/v2/models/moved?sig=abc", status_code=307)
            return JSONResponse(v2_meta("m", (2,), {"name": "label", "datatype": "INT64", "shape": [-1]}))

        async def infer(_: Request) -> Response:
            return RedirectResponse(f"{target.url}/v2/models/m/infer", status_code=308)

        app = Starlette(routes=[Route("/v2/models/{model}", meta),
                                Route("/v2/models/{model}/infer", infer, methods=["POST"])])
        with serve_in_background(app) as server:
            def connect(model: str):
                return open_http_suspect(url=server.url, protocol="v2", model_name=model, num_classes=4,
                                         input_shape=(2,), token="tok-123", options=HttpOptions(retries=2))

            with pytest.raises(UsageError, match=(
                    f"^{re.escape(server.url)}/v2/models/moved redirects to {re.escape(target.url)}/v2/models/moved "
                    r"\(HTTP 307\), and redirects are not followed so that the token goes nowhere else; give that URL "
                    "instead if you trust it.$")):
                connect("moved")
            suspect = connect("m")
            with pytest.raises(UsageError, match=r"/v2/models/m/infer redirects to .*/v2/models/m/infer \(HTTP 308\)"):
                suspect.query(np.zeros((1, 2), dtype=np.float32))
            suspect.close()
    assert seen == []


def test_a_redirect_without_a_location_is_refused_never_read_as_an_answer():
    """A 3xx with no Location header fell through to being read as an answer: with a prediction in its body it was
    recorded as the suspect's answer (or a malformed one, or a stop on the first query); it is refused like any
    redirect, in one sentence naming the status."""
    from httpkit import v2_meta
    from starlette.responses import JSONResponse

    async def meta(_: Request) -> Response:
        return JSONResponse(v2_meta("m", (2,), {"name": "label", "datatype": "INT64", "shape": [-1]}), status_code=300)

    app, calls = _scripted([HF_LABEL_3, (303, HF_LABEL_3)])
    app.routes.append(Route("/v2/models/{model}", meta))
    with serve_in_background(app) as server:
        suspect = _hf(server.url, retries=2)
        [(_, first)] = suspect.stream(np.zeros((1, 2), dtype=np.float32))
        assert first.ok and first.label == 3
        with pytest.raises(UsageError, match=(
                f"^{re.escape(server.url)}/m answered HTTP 303, a redirect that names no target \\(no Location "
                r"header\), so there is no answer to read; check the URL.$")):
            suspect.query(np.zeros((1, 2), dtype=np.float32))
        suspect.close()
        assert calls["n"] == 2  # refused at once, never retried
        with pytest.raises(UsageError, match=r"/v2/models/m answered HTTP 300, a redirect that names no target"):
            open_http_suspect(url=server.url, protocol="v2", model_name="m", num_classes=4, input_shape=(2,))


def _gzip_bomb(mebibytes: int) -> bytes:
    """A gzip body of that many MiB of zeros, about a thousandth of it on the wire."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(2**20)
    return b"".join(packer.compress(block) for _ in range(mebibytes)) + packer.flush()


def test_a_compressed_answer_is_inflated_only_up_to_the_answer_limit():
    """httpx inflated each network chunk whole: 64 KiB of gzip on the wire became 64 MiB in memory at once, before
    the answer limit was checked (brotli or zstd, when installed, far more); an encoding not asked for is refused."""
    import gzip
    import tracemalloc

    from wmark.suspects.bodies import MAX_ANSWER_BYTES

    gz = {"content-encoding": "gzip"}
    answers = [Response(gzip.compress(json.dumps(HF_LABEL_3).encode()), headers=gz, media_type="application/json"),
               Response(_gzip_bomb(256), headers=gz, media_type="application/json"),
               Response(b"\x1b\x00\x00", headers={"content-encoding": "br"}, media_type="application/json"),
               Response(b"\x1f\x8b not gzip", headers=gz, media_type="application/json")]
    app, _ = _scripted(answers)
    with serve_in_background(app) as server:
        suspect = _hf(server.url, retries=0)
        tracemalloc.start()
        try:
            outcomes = [o for _, o in suspect.stream(np.zeros((4, 2), dtype=np.float32))]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        suspect.close()
    assert (outcomes[0].status, outcomes[0].label) == ("ok", 3)
    assert peak < 2 * MAX_ANSWER_BYTES  # 142 MiB before
    assert [(o.status, o.answer) for o in outcomes[1:]] == [("malformed", "")] * 3
    assert [o.error for o in outcomes[1:]] == [
        f"malformed answer: an answer larger than {MAX_ANSWER_BYTES} bytes",
        "malformed answer: an answer in the content encoding 'br', which was not asked for",
        "malformed answer: an answer whose gzip data is corrupt"]


def test_answers_are_read_as_json_text_utf8_with_a_bom_or_utf16_and_other_bytes_refused(tmp_path):
    """A UTF-8 byte order mark made a good answer "not JSON" and UTF-16 was read as garbage; a Latin-1 body had its
    bad bytes replaced and was read on, its label "Caf\\ufffd" blamed on the key's class names."""
    from wmark.errors import RuntimeFailure

    template = tmp_path / "t.json"
    template.write_text(json.dumps({"request": {"inputs": "$input"}, "response": [{"topk": ""}],
                                    "labels": ["a", "b", "Café", "d"]}))
    doc = json.dumps([{"label": "Café", "score": 0.9}, {"label": "a", "score": 0.1}], ensure_ascii=False)
    bodies = [doc.encode("utf-8-sig"), doc.encode("utf-16"), doc.encode("latin-1")]
    app, _ = _scripted([Response(b, media_type="application/json") for b in bodies])
    with serve_in_background(app) as server:
        suspect = _hf(server.url, template=str(template), retries=0)
        outcomes = [o for _, o in suspect.stream(np.zeros((3, 2), dtype=np.float32))]
        suspect.close()
        fresh = _hf(server.url, template=str(template), retries=0)
        with pytest.raises(RuntimeFailure, match=r"answered the first query with something that is not JSON "
                                                 r"\(application/json, not UTF-8\); check the URL and the protocol\.$"):
            fresh.query(np.zeros((1, 2), dtype=np.float32))
        fresh.close()
    assert [(o.status, o.label) for o in outcomes] == [("ok", 2), ("ok", 2), ("malformed", -1)]
    assert outcomes[2].error == "malformed answer: the answer is not UTF-8 text, as JSON must be"
    assert outcomes[2].answer is not None and "Caf\ufffd" in outcomes[2].answer


@pytest.mark.parametrize(("meta", "error", "message"), [
    (b"[" * 100_000, "RuntimeFailure", r"/v2/models/m did not return JSON; is this the right protocol\?$"),
    (b'{"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, Infinity]}]}', "UsageError",
     r"/v2/models/m does not describe its inputs as the v2 protocol requires; is this a v2 server\?$"),
    (b'{"name": "m", "inputs": [], "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, Infinity]}]}', None,
     None),
])
def test_v2_metadata_too_deep_or_with_infinite_dimensions_is_refused_in_one_sentence(meta, error, message):
    """JSON nested 100,000 deep stopped the connection with a RecursionError traceback, and an Infinity dimension
    (Python's JSON reads it) with an OverflowError one."""
    from wmark import errors

    async def model(_: Request) -> Response:
        return Response(meta, media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/m", model)])
    with serve_in_background(app) as server:
        def connect():
            return open_http_suspect(url=server.url, protocol="v2", model_name="m", num_classes=4, input_shape=(2,),
                                     options=HttpOptions(retries=0))
        if error is None:  # an output of unreadable shape is not checked, as one of no shape
            connect().close()
        else:
            with pytest.raises(getattr(errors, error), match=message):
                connect()


class _RawServer:
    """A raw HTTP/1.1 server on 127.0.0.1 (threading + socket): it answers ``HF_LABEL_3`` at once, except that a
    request whose first input is 1.0 gets its status line and headers trickled a byte every 20 ms (3 s in all)."""

    def __init__(self) -> None:
        self.calls = {"fast": 0, "trickled": 0}
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,))
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            while len(body) < length:
                body += conn.recv(65536)
            answer = json.dumps(HF_LABEL_3).encode()
            if json.loads(body)["inputs"][0] != 1.0:
                self.calls["fast"] += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
                return
            self.calls["trickled"] += 1
            slow = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 100 + b"\r\nContent-Length: %d\r\n\r\n" % len(answer)
            try:
                for byte in slow:
                    if self._stop.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(0.02)
                conn.sendall(answer)
            except OSError:  # the client gave up and closed the connection, as it should
                return


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_server_trickling_its_headers_is_abandoned_at_the_timeout_and_retried(concurrency):
    """httpx's timeout bounds each read, so headers sent a byte at a time (each within the timeout) held a query
    with a 0.5 s timeout for 6.4 s, and without bound in general; the timeout now covers the whole exchange, for
    each request on its own when others share the client."""
    inputs = np.zeros((5, 2), dtype=np.float32)
    inputs[2, 0] = 1.0
    server = _RawServer()
    try:
        suspect = _hf(server.url, retries=1, timeout=0.3, concurrency=concurrency)
        start = time.perf_counter()
        outcomes = dict(suspect.stream(inputs))
        elapsed = time.perf_counter() - start
        suspect.close()
    finally:
        server.close()
    slow = outcomes.pop(2)
    assert (slow.status, slow.label, slow.answer, slow.error, slow.attempts) == \
        ("failed", -1, None, "no answer within 0.3 s", 2)
    assert [(o.status, o.label) for o in outcomes.values()] == [("ok", 3)] * 4
    assert server.calls == {"fast": 4, "trickled": 2}
    assert elapsed < 2 * (0.3 + 0.5)  # 6 s before


def test_408_request_timeout_is_retried_never_recorded_as_an_answer():
    """A 408 was recorded as a malformed answer (reused on every resume) or, on the first query, stopped the run
    as a rejected request; HTTP says the client may repeat it."""
    timed_out = (408, {"error": "request timed out"})
    app, calls = _scripted([timed_out, HF_LABEL_3, timed_out])
    with serve_in_background(app) as server:
        suspect = _hf(server.url, retries=1)
        outcomes = [o for _, o in suspect.stream(np.zeros((2, 2), dtype=np.float32))]
        suspect.close()
    assert [(o.status, o.label, o.attempts, o.http_status) for o in outcomes] == \
        [("ok", 3, 2, 200), ("failed", -1, 2, 408)]
    assert (outcomes[1].answer, outcomes[1].error, calls["n"]) == (None, "HTTP 408", 4)
