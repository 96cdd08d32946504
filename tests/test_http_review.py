"""Findings of a review of the HTTP suspect client, each against a real server on 127.0.0.1."""

from __future__ import annotations

import pytest
from httpkit import v2_meta
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wmark.errors import UsageError
from wmark.keys import generate_key
from wmark.schemes.trigger_set import generate_triggers
from wmark.serve import serve_in_background
from wmark.suspects.http import HttpOptions, open_http_suspect
from wmark.suspects.probe import ProbeSuspect
from wmark.transcript import Transcript

SHAPE = (1, 8, 8)
TOKEN = 'tok/abc+def"=='


@pytest.fixture(scope="module")
def key():
    return generate_key(owner="Test Owner", num_classes=10, input_shape=SHAPE, num_triggers=40)


def _escaped(text: str) -> str:
    """``text`` as a JSON string body with every character written as a ``\\uXXXX`` escape."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def test_a_token_echoed_in_json_unicode_escapes_never_reaches_the_transcript_or_a_message(key, tmp_path):
    calls = {"n": 0}

    async def meta(_: Request) -> JSONResponse:
        return JSONResponse(v2_meta("m", SHAPE, {"name": "label", "datatype": "INT64", "shape": [-1]}))

    async def infer(request: Request) -> Response:
        calls["n"] += 1
        echo = _escaped(request.headers["authorization"])
        outputs = '[{"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}]' if calls["n"] == 1 else "[]"
        if calls["n"] <= 2:
            return Response(f'{{"outputs": {outputs}, "echo": "{echo}"}}', media_type="application/json")
        return Response(f'{{"error": "bad request from {echo}"}}', status_code=400, media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/{model}", meta),
                            Route("/v2/models/{model}/infer", infer, methods=["POST"])])
    path = tmp_path / "t.sqlite"

    def suspect_at(url: str):
        return open_http_suspect(url=url, protocol="v2", model_name="m", num_classes=10, input_shape=SHAPE,
                                 token=TOKEN, options=HttpOptions(retries=0))

    with serve_in_background(app) as server:
        suspect = suspect_at(server.url)
        record = Transcript(path, key_commitment="a" * 64, suspect=suspect.description, protocol="v2")
        answers = ProbeSuspect(suspect, transcript=record).query(generate_triggers(key).inputs.numpy()[:3])
        record.close()
        suspect.close()
        fresh = suspect_at(server.url)
        with pytest.raises(UsageError, match=r"HTTP 400: bad request from Bearer \[token\]") as refused:
            fresh.query(generate_triggers(key).inputs.numpy()[:1])
        fresh.close()
    assert answers.labels[0] == 3  # the answer is still read
    assert "abc" not in str(refused.value)
    stored = path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("t.sqlite-*"))
    assert b"abc" not in stored and _escaped("abc").encode() not in stored and b"[token]" in stored


def test_an_empty_token_file_is_refused_with_the_fix(tmp_path):
    from wmark.suspects.tokens import read_token

    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(UsageError, match=r"^The token file .*token is empty; write the bearer token into it\.$"):
        read_token(file=empty)
