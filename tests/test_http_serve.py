"""`wmark serve` as a real process, its v2 routes and errors, and `wmark verify --suspect URL` exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from servekit import start_serve, trickle, unused_port, wait_ready

from wmark.errors import UsageError
from wmark.io import save_model
from wmark.keys import generate_key, save_key
from wmark.models import build_model

SHAPE = (1, 8, 8)
TOKEN = "serve-test-token"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from wmark.cli import main; main()", *args]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An independent digits-shaped MLP served label-only with a token by `wmark serve`."""
    tmp = tmp_path_factory.mktemp("serve")
    weights = tmp / "m.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=0), weights,
               metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    key = generate_key(owner="Test Owner", num_classes=10, input_shape=SHAPE, num_triggers=30)
    save_key(key, tmp / "owner.key")
    env = dict(os.environ, WMARK_SERVE_TOKEN=TOKEN)
    proc, url, _ = start_serve("--arch", "fmnist-mlp", "--weights", str(weights), "--name", "digits", "--labels-only",
                               "--token-env", "WMARK_SERVE_TOKEN", "--max-body-bytes", "300000", "--body-timeout", "2",
                               "--header-timeout", "1", env=env)
    wait_ready(proc, url)
    yield url, tmp, int(url.rsplit(":", 1)[1])
    proc.terminate()
    proc.wait(timeout=10)


def test_v2_routes_and_errors(served):
    url, _, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    meta = httpx.get(f"{url}/v2/models/digits", headers=auth).json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8] and meta["outputs"][0]["datatype"] == "INT64"
    assert httpx.get(f"{url}/v2/models/digits").status_code == 401
    assert httpx.get(f"{url}/v2/models/other", headers=auth).status_code == 404
    body = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 128}]}
    answer = httpx.post(f"{url}/v2/models/digits/infer", json=body, headers=auth).json()
    assert answer["outputs"][0]["shape"] == [2] and all(0 <= v < 10 for v in answer["outputs"][0]["data"])
    bad_bodies = [b"{", b'{"inputs": []}',
                  b'{"inputs": [{"shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}',
                  b'{"inputs": [{"shape": [1, 64], "datatype": "FP32", "data": [1, 2]}]}',
                  b'{"inputs": [{"shape": [1, 64], "datatype": "STRING", "data": []}]}']
    for raw in bad_bodies:
        resp = httpx.post(f"{url}/v2/models/digits/infer", content=raw, headers=auth)
        assert resp.status_code == 400 and resp.json()["error"], raw



def test_the_versioned_routes_answer_the_served_version_only(served):
    """`/v2/models/{name}/versions/{version}/...` were no routes (404 "Not Found"), so a v2 client pinned to a version
    could not talk to `wmark serve`."""
    import numpy as np

    from wmark.suspects.http import HttpSuspect
    from wmark.suspects.protocols import V2Protocol

    url, _, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    base, versioned, other = (f"{url}/v2/models/digits{v}" for v in ("", "/versions/1", "/versions/2"))
    assert httpx.get(versioned, headers=auth).json() == httpx.get(base, headers=auth).json()
    assert httpx.get(f"{versioned}/ready", headers=auth).json() == {"name": "digits", "ready": True}
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    answer = httpx.post(f"{versioned}/infer", json=body, headers=auth).json()
    assert answer["model_version"] == "1" and answer["outputs"][0]["shape"] == [1]
    assert httpx.get(versioned).status_code == 401
    for resp in (httpx.get(other, headers=auth), httpx.get(f"{other}/ready", headers=auth),
                 httpx.post(f"{other}/infer", json=body, headers=auth)):
        assert resp.status_code == 404 and resp.json() == {
            "error": "model 'digits' has no version '2'; this server serves version '1'"}
    pinned = HttpSuspect(protocol=V2Protocol(url=f"{url}/v2/models/digits", model_name=None, num_classes=10,
                                             input_shape=SHAPE, version="1"), token=TOKEN)
    try:
        pinned.connect()
        assert (pinned.query(np.full((3, *SHAPE), 0.5, dtype=np.float32)).labels >= 0).all()
    finally:
        pinned.close()


@pytest.mark.parametrize("data, message, datatype", [
    ([[0.5] * 32, [0.5]], "nested lists of equal lengths", "FP32"),  # ragged: numpy's ValueError was a 500
    ([["a"] * 64], "nested lists of equal lengths", "FP32"),
    # NumPy read these as 0.5, 1 and NaN: answered as numbers, or refused as "NaN or infinite values"
    (["0.5"] + [0] * 63, "must be numbers (not strings, booleans or null)", "FP32"),
    ([[0.5] * 8] * 7 + [[0.5] * 7 + [True]], "must be numbers (not strings, booleans or null)", "FP32"),
    ([None] + [0] * 63, "must be numbers (not strings, booleans or null)", "FP32"),
    ([False] + [0] * 63, "must be numbers (not strings, booleans or null)", "UINT8"),
    ([10 ** 400] + [0] * 63, "must be numbers a float can hold", "FP32"),  # beyond a float: OverflowError, a 500
    ([1e39] + [0] * 63, "beyond FP32's range", "FP32"),  # finite in JSON, inf in FP32: NaN scores failed to serialise
    ([-5] + [0] * 63, "whole numbers from 0 to 255", "UINT8"),  # was divided by 255 into a silently wrong image
    ([256] + [0] * 63, "whole numbers from 0 to 255", "INT32"),
    ([0.5] + [0] * 63, "whole numbers from 0 to 255", "UINT8"),
])
def test_malformed_input_values_get_400_not_500(served, data, message, datatype):
    url, _, _ = served
    raw = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": datatype, "data": data}]})
    resp = httpx.post(f"{url}/v2/models/digits/infer", content=raw, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 400 and message in resp.json()["error"]

@pytest.mark.parametrize("shape, data, message", [
    ([2 ** 32, 2 ** 32], [], "must be shaped [N, 1, 8, 8]"),  # int64 wrapped to 0: answered with shape [0]
    ([1, 2] + [1] * 100, [0.5] * 2, "got [1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ...]"),
    # a product of more digits than str() prints was a 500, after minutes of the event loop for thousand-digit ones
    ([10 ** 99] * 50, [], "must be shaped [N, 1, 8, 8], got [1" + "0" * 74 + "...]"),
    ([int("9" * 4000)] * 60, [], "must be shaped [N, 1, 8, 8]"),
    ([2000, 64], [0.5] * 64, "at most 1024 inputs per request"),
    ([2, 32], [0.5] * 64, "must be shaped [N, 1, 8, 8]"),  # two rows of 32 answered as one input
    ([64, 1], [0.5] * 64, "must be shaped [N, 1, 8, 8]"),
    ([True, 64], [0.5] * 64, "a \"shape\" of positive integers"),
])
def test_a_shape_that_is_not_n_inputs_gets_400(served, shape, data, message):
    url, _, _ = served
    raw = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}]})
    resp = httpx.post(f"{url}/v2/models/digits/infer", content=raw, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 400 and message in resp.json()["error"]


@pytest.mark.parametrize("request_id", [b"NaN", b"-Infinity", b"1e400", b"7", b'{"a": NaN}'])
def test_an_id_that_is_not_a_string_gets_400_before_it_is_answered(served, request_id):
    """The id is echoed in the answer: NaN or 1e400 (inf) there failed to serialise, a 500 after the model had
    answered (and the query was counted)."""
    url, _, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    tensor = b'[{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [' + b", ".join([b"0.5"] * 64) + b"]}]"
    resp = httpx.post(f"{url}/v2/models/digits/infer", content=b'{"id": ' + request_id + b', "inputs": ' + tensor + b"}",
                      headers=auth)
    assert resp.status_code == 400 and resp.json() == {"error": "the request's \"id\" must be a string, as the v2 protocol says"}
    echoed = httpx.post(f"{url}/v2/models/digits/infer", content=b'{"id": "q-1", "inputs": ' + tensor + b"}", headers=auth)
    assert echoed.status_code == 200 and echoed.json()["id"] == "q-1"


def test_an_unknown_route_or_method_gets_a_json_error(served):
    """They were plain-text "Not Found" / "Method Not Allowed", which v2 clients fail to decode as an error."""
    url, _, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    missing = httpx.post(f"{url}/v2/models/digits/explain", json={}, headers=auth)
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong = httpx.get(f"{url}/v2/models/digits/infer", headers=auth)
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"}
    assert wrong.headers["allow"] == "POST"


def test_json_nested_thousands_deep_gets_400_not_500(served):
    """json.loads raises RecursionError, not ValueError, on arrays nested thousands deep: it was a 500."""
    url, _, _ = served
    raw = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = httpx.post(f"{url}/v2/models/digits/infer", content=raw, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 400 and "nests JSON too deeply" in resp.json()["error"]


def test_a_body_over_the_limit_gets_413_whether_declared_or_chunked(served):
    """A body of any size was read and parsed whole before the 1024-input cap was checked."""
    url, _, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = b'{"inputs": []}' + b" " * 300_000
    declared = httpx.post(f"{url}/v2/models/digits/infer", content=big, headers=auth)
    chunked = httpx.post(f"{url}/v2/models/digits/infer", content=iter([big[:150_000], big[150_000:]]), headers=auth)
    for resp in (declared, chunked):
        assert resp.status_code == 413 and resp.json() == {
            "error": "the request body is larger than this server's limit of 300000 bytes; send fewer inputs per request"}
    at_limit = httpx.post(f"{url}/v2/models/digits/infer", content=big[:300_000], headers=auth)
    assert at_limit.status_code == 400 and "one input tensor" in at_limit.json()["error"]


def test_a_body_trickled_slower_than_its_deadline_gets_408_and_its_connection_closed(served):
    """uvicorn sets no deadline for a body: a client sending a byte every few seconds held a connection, and the body
    so far, indefinitely (slowloris)."""
    url, _, port = served
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n").encode()
    answer = trickle("127.0.0.1", port, head)  # returns once the server has closed the connection
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408 ") and b"connection: close" in status.lower()
    assert json.loads(body) == {"error": "the request body did not arrive within 2 seconds; send it faster or in "
                                         "smaller requests"}
    fine = httpx.post(f"{url}/v2/models/digits/infer", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})
    assert fine.status_code == 200
    from wmark.serve import build_app

    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(UsageError, match="body deadline must be a positive number of seconds"):
            build_app(model=build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE), name="m", num_classes=10,
                      input_shape=SHAPE, body_timeout=bad)


def test_headers_trickled_past_the_header_timeout_get_408_and_the_connection_closed(served):
    """uvicorn sets no deadline for a request line and headers: a client trickling them held a connection
    indefinitely (slowloris); `--header-timeout` now closes it."""
    _, _, port = served
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert time.monotonic() - start < 2.5
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408 ") and b"connection: close" in status.lower()
    assert json.loads(body) == {"error": "the request line and headers did not arrive within 1 seconds; send them "
                                         "at once"}


def test_a_small_request_is_answered_while_a_large_body_is_parsed(monkeypatch):
    """A body of tens of megabytes was parsed and decoded on the event loop, so no other request was answered for
    about a second. Here the large body's parse is held until the small request is answered: on the event loop,
    it would hold that answer too (the small request times out)."""
    import threading

    import numpy as np

    from wmark import serve_input
    from wmark.serve import build_app, serve_in_background

    started, released, parse = threading.Event(), threading.Event(), serve_input._parse

    def held(body, decode, *, yielding):
        if yielding:  # the worker thread's parse of a body over PARSE_ON_LOOP_BYTES
            started.set()
            assert released.wait(60)
        return parse(body, decode, yielding=yielding)

    monkeypatch.setattr(serve_input, "_parse", held)
    x = np.random.default_rng(0).random((1024, 64)).round(6)
    large = {"inputs": [{"name": "input", "shape": [1024, *SHAPE], "datatype": "FP32", "data": x.tolist()}]}
    assert len(json.dumps(large)) > serve_input.PARSE_ON_LOOP_BYTES
    small = {"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * 64}]}
    app = build_app(model=build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE), name="m", num_classes=10,
                    input_shape=SHAPE)
    answers: list[httpx.Response] = []
    with serve_in_background(app) as server:
        sender = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{server.url}/v2/models/m/infer", json=large, timeout=120)))
        sender.start()
        try:
            assert started.wait(60)
            quick = httpx.post(f"{server.url}/v2/models/m/infer", json=small, timeout=10)
        finally:
            released.set()
            sender.join(120)
    assert quick.status_code == 200 and quick.json()["outputs"][0]["shape"] == [1, 10]
    assert answers[0].status_code == 200 and answers[0].json()["outputs"][0]["shape"] == [1024, 10]


def test_a_large_body_is_parsed_handing_the_interpreter_to_other_threads():
    """json.loads holds the interpreter lock until it returns, so parsing in a worker thread alone still stopped the
    event loop's thread; a Python call per number lets other threads run every switch interval (5 ms)."""
    import threading
    import time

    import numpy as np

    from wmark.serve_input import _parse

    values = np.random.default_rng(0).random(400_000)
    body = json.dumps({"data": values.tolist(), "n": 7}).encode()  # 8 MB: ~0.2 s in the C parser alone
    started, parsed = threading.Event(), []

    def work() -> None:
        started.set()
        parsed.append(_parse(body, None, yielding=True))

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    turns = 0
    while worker.is_alive():  # without the hooks this thread gets a turn or two before the parse returns
        turns += 1
        time.sleep(0.001)
    worker.join()
    assert turns >= 5 and parsed[0]["n"] == 7 and np.array_equal(parsed[0]["data"], values)


@pytest.mark.parametrize("kind", ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=x"])
def test_a_body_sent_as_another_type_than_json_gets_415(kind):
    """A web page may POST these cross-site without a preflight; they were answered, so any page a user opened
    could put queries into an open server's query log and quotas."""
    from wmark.serve import build_app, serve_in_background

    raw = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})
    app = build_app(model=build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE), name="m", num_classes=10,
                    input_shape=SHAPE)
    with serve_in_background(app) as server:
        refused = httpx.post(f"{server.url}/v2/models/m/infer", content=raw, headers={"Content-Type": kind})
        assert refused.status_code == 415 and refused.json() == {
            "error": "the request body must be JSON, sent with Content-Type: application/json "
                     f"(not {kind.split(';')[0]})"}
        for taken in ({"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "application/vnd.x+json"},
                      {}):
            assert httpx.post(f"{server.url}/v2/models/m/infer", content=raw, headers=taken).status_code == 200


def test_a_chunked_body_is_read_no_further_than_the_limit():
    import asyncio

    from starlette.requests import Request

    from wmark.serve_input import read_json

    pulled: list[int] = []

    async def receive() -> dict:
        pulled.append(1)
        return {"type": "http.request", "body": b" " * 1000, "more_body": len(pulled) < 10_000}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": []}
    refused = asyncio.run(read_json(Request(scope, receive), 5000))
    assert refused.status_code == 413 and len(pulled) == 6


def test_a_client_that_leaves_mid_body_is_no_error_of_the_server():
    """Starlette's ClientDisconnect went uncaught: uvicorn logged a traceback ("Exception in ASGI application") for
    every client that hung up mid-request."""
    import asyncio

    from starlette.requests import Request

    from wmark.serve_input import read_json

    messages = iter([{"type": "http.request", "body": b'{"inp', "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": []}
    left = asyncio.run(read_json(Request(scope, receive), 5000))
    assert left.status_code == 400 and json.loads(left.body) == {"error": "the client left before sending the whole body"}


def test_the_default_body_limit_admits_the_largest_request_json_writers_produce():
    import numpy as np

    from wmark.serve import build_app
    from wmark.serve_input import MAX_BATCH, default_body_limit, text_char_limit

    longest = np.full((MAX_BATCH, *SHAPE), -2.2250738585072014e-308).tolist()  # float64's longest repr
    doc = {"id": "x" * 1000, "inputs": [{"name": "input", "shape": [MAX_BATCH, *SHAPE], "datatype": "FP32",
                                         "data": longest}]}
    limit = default_body_limit(input_size=64)
    assert max(len(json.dumps(doc, indent=indent)) for indent in (None, 2, 4)) <= limit
    texts = {"inputs": ["\U0001f600" * text_char_limit(32)] * MAX_BATCH}  # escaped as 12 bytes per character
    assert len(json.dumps(texts)) <= default_body_limit(input_size=32, text_max_length=32)
    with pytest.raises(UsageError, match="body limit must be a positive number of bytes, got 0"):
        build_app(model=build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE), name="m", num_classes=10,
                  input_shape=SHAPE, max_body_bytes=0)


def test_served_answers_are_the_local_suspects_and_non_finite_outputs_get_400():
    """The bare model's labels were its logits' argmax, not its scores' as LocalSuspect's: logits 1e-9 apart (equal
    scores) gave label 1 label-only but 0 from the scores and from the file; and inputs near FP32's limit, whose
    scores are NaN, got HTTP 500 (NaN is no JSON), or label 0 when label-only."""
    import numpy as np
    import torch

    from wmark.serve import build_app, serve_in_background
    from wmark.suspects import LocalSuspect

    tie = torch.nn.Linear(2, 2)
    with torch.no_grad():
        tie.weight.zero_()
        tie.bias.copy_(torch.tensor([0.0, 1e-9]))
    local = LocalSuspect(tie, input_shape=(2,)).query(np.zeros((1, 2), dtype=np.float32))
    body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0.0, 0.0]}]}
    extreme = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [3e38, -3e38]}]}
    blowup = torch.nn.Linear(2, 2)  # logits [inf, -inf] on the extreme input
    with torch.no_grad():
        blowup.weight.copy_(10 * torch.eye(2))
        blowup.bias.zero_()
    for labels_only in (True, False):
        with serve_in_background(build_app(model=tie, name="m", num_classes=2, input_shape=(2,),
                                           labels_only=labels_only)) as server:
            out = httpx.post(f"{server.url}/v2/models/m/infer", json=body).json()["outputs"][0]
        assert (out["data"][0] if labels_only else int(np.argmax(out["data"]))) == local.labels[0] == 0
        with serve_in_background(build_app(model=blowup, name="m", num_classes=2, input_shape=(2,),
                                           labels_only=labels_only)) as server:
            resp = httpx.post(f"{server.url}/v2/models/m/infer", json=extreme)
        assert resp.status_code == 400 and "NaN or infinite" in resp.json()["error"]


def test_cli_verify_over_http_and_an_exhausted_budget(served):
    url, tmp, _ = served
    base = ["verify", "api", "--key", str(tmp / "owner.key"), "--suspect", f"{url}/v2/models/digits",
            "--token-env", "WMARK_SERVE_TOKEN"]
    env = dict(os.environ, WMARK_SERVE_TOKEN=TOKEN)
    done = subprocess.run(_cli(*base), env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "not_detected" in done.stdout
    short = subprocess.run(_cli(*base, "--budget", "3", "--report", str(tmp / "r.html")), env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert short.returncode == 1
    assert "raise the query budget" in short.stdout and "in 3 queries" in short.stdout
    assert TOKEN not in short.stdout + short.stderr + (tmp / "r.html").read_text() + (tmp / "r.json").read_text()


def test_cli_errors_are_one_sentence(served):
    from click.testing import CliRunner

    from wmark.cli import main

    url, tmp, port = served
    key = str(tmp / "owner.key")
    runner = CliRunner()
    refused = runner.invoke(main, ["verify", "api", "--key", key, "--suspect", url, "--model-name", "digits"])
    assert refused.exit_code == 2 and "needs a bearer token" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    gone = runner.invoke(main, ["verify", "api", "--key", key, "--suspect", f"http://127.0.0.1:{unused_port()}",
                                "--model-name", "digits", "--retries", "0"])
    assert gone.exit_code == 3 and "Cannot reach the suspect" in gone.output
    busy = runner.invoke(main, ["serve", "--arch", "fmnist-mlp", "--weights", str(tmp / "m.safetensors"), "--name",
                                "x", "--port", str(port)])
    assert busy.exit_code == 2 and "pick another port" in busy.output
    no_arch = runner.invoke(main, ["verify", "file", "--key", key, "--suspect", str(tmp / "m.safetensors")])
    assert no_arch.exit_code == 2 and "--arch" in no_arch.output


@pytest.mark.parametrize("mark", ["tiebreak", "flip"])
def test_serve_logs_each_client_of_either_marked_api(tmp_path, mark):
    """`wmark serve --mark tiebreak|flip --clients --log`: each token's queries land under its client's name."""
    import json

    import numpy as np
    import torch

    from wmark import api
    from wmark.io import save_tensors
    from wmark.keys import load_key
    from wmark.schemes.querylog import QueryLog
    from wmark.suspects.http import open_http_suspect

    weights, key = tmp_path / "m.safetensors", tmp_path / "owner.key"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=0), weights,
               metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    save_key(generate_key(owner="Owner", num_classes=10, input_shape=SHAPE), key)
    x = torch.rand(600, *SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (600,), generator=torch.Generator().manual_seed(1))
    save_tensors({"x": x, "y": y, "x_test": x[:50].clone(), "y_test": y[:50].clone()}, tmp_path / "owner.safetensors")
    api.build_tiebreak(key=key, arch="fmnist-mlp", weights=weights, data=str(tmp_path / "owner.safetensors"),
                       out=tmp_path / "rule.safetensors", components=8, references=[], verify_count=100)
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"thief": "thief-token", "honest": "honest-token"}))
    clients.chmod(0o600)
    # the rule names the served model: no --arch/--weights for the tie-break mark
    served = (["--rule", str(tmp_path / "rule.safetensors")] if mark == "tiebreak"
              else ["--arch", "fmnist-mlp", "--weights", str(weights), "--rate", "0.2"])
    proc, url, announced = start_serve("--name", "m", "--labels-only", "--mark", mark, "--key", str(key), *served,
                                       "--clients", str(clients), "--log", str(tmp_path / "served.sqlite"))
    try:
        wait_ready(proc, url)
        for client, n in (("thief", 300), ("honest", 40)):
            remote = open_http_suspect(url=f"{url}/v2/models/m", protocol="v2", num_classes=10, input_shape=SHAPE,
                                       token=f"{client}-token")
            try:
                assert (remote.query(np.random.default_rng(n).random((n, *SHAPE), dtype=np.float32)).labels >= 0).all()
            finally:
                remote.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # the served scale is the rule's (1 unless `tiebreak build --max-cost` chose another)
    assert (", tiebreak marked at beta 1, logging to" if mark == "tiebreak" else ", flip marked, logging to") in announced
    with QueryLog(tmp_path / "served.sqlite", key=load_key(key)) as log:
        counts = log.clients()
        assert log.mark == mark
        assert {c: v["queries"] for c, v in counts.items()} == {"thief": 300, "honest": 40}
        assert 0 < counts["thief"]["kept"] <= 300 and len(log.inputs("thief")) == counts["thief"]["kept"]
        if mark == "flip":
            assert all(r["label"] in r["candidates"] for r in log.records("thief"))
    # the third command reads the log the server wrote; the served model itself never learned its own marks
    from click.testing import CliRunner

    from wmark.cli import main

    res = CliRunner().invoke(main, ["verify", "extraction", "--key", str(key), "--suspect", str(weights), "--arch",
                                    "fmnist-mlp", "--log", str(tmp_path / "served.sqlite"), "--client", "thief",
                                    "--json", *served[:2 if mark == "tiebreak" else 0]])
    doc = json.loads(res.stdout)
    assert res.exit_code == 1, res.output
    assert [t["name"] for t in doc["tests"]] == (["trigger-set", "api-tiebreak", "api-tiebreak-log"]
                                                if mark == "tiebreak" else ["trigger-set", "api-mark"])


def test_serve_on_port_0_announces_the_port_it_listens_on(tmp_path):
    """`--port 0` (any free port) used to announce http://127.0.0.1:0/..., a URL no client can reach."""
    import re

    weights = tmp_path / "m.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=0), weights,
               metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    proc = subprocess.Popen(_cli("serve", "--arch", "fmnist-mlp", "--weights", str(weights), "--name", "m",
                                 "--port", "0"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        found = re.fullmatch(r"serving m \(scores\) on (http://127\.0\.0\.1:(\d+))/v2/models/m\n", line)
        assert found is not None and int(found[2]) != 0, line
        wait_ready(proc, found[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class _Announced(Exception):
    """Raised by the announce callback below to stop `serve` before it runs uvicorn."""


def test_serve_holds_the_port_it_announces_until_uvicorn_listens(tmp_path):
    """`wmark serve` bound a probe socket to learn its port, closed it, and only then let uvicorn bind the port:
    another process could take it in between, and with `--port 0` the announced port was free for anyone."""
    from wmark.serve import serve

    weights = tmp_path / "m.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=0), weights,
               metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    ports: list[int] = []

    def announce(line: str) -> None:
        ports.append(int(line.rsplit(":", 1)[1].split("/")[0]))
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", ports[0]))
        raise _Announced

    with pytest.raises(_Announced):
        serve(name="m", arch="fmnist-mlp", weights=weights, port=0, device="cpu", announce=announce)
    assert len(ports) == 1 and ports[0] != 0
    with socket.socket() as after:  # and it lets the port go when it stops
        after.bind(("127.0.0.1", ports[0]))


class _Breaks(torch.nn.Module):
    """A model that raises once told to (after the server's start-up probe), with a message that must not leak."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.broken = False

    def forward(self, *args, **kwargs):
        if self.broken:
            raise RuntimeError("CUDA out of memory at /srv/secret/model.py")
        return self.inner(*args, **kwargs)


def test_a_model_that_raises_answers_a_json_500_naming_only_the_exception_type():
    # Starlette answered a plain-text 500 and re-raised, and uvicorn dropped the connection: a client read a
    # network failure and retried
    from wmark.serve import build_app, serve_in_background

    model = _Breaks(torch.nn.Linear(2, 2))
    body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0.0, 0.0]}]}
    with serve_in_background(build_app(model=model, name="m", num_classes=2, input_shape=(2,))) as server:
        model.broken = True
        resp = httpx.post(f"{server.url}/v2/models/m/infer", json=body)
        model.broken = False
        again = httpx.post(f"{server.url}/v2/models/m/infer", json=body)
    assert resp.status_code == 500 and "RuntimeError" in resp.json()["error"] and "secret" not in resp.text
    assert again.status_code == 200
