"""Verifying over HTTP against real uvicorn servers on 127.0.0.1: detection, faults, bad input."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import torch
from httpkit import Counting, faulty_v2_app, independent_model, memorising_model, v2_meta
from servekit import unused_port

from wmark.errors import RuntimeFailure, UsageError
from wmark.keys import generate_key
from wmark.schemes.trigger_set import generate_triggers
from wmark.serve import build_app, serve_in_background
from wmark.suspects.http import HttpOptions, open_http_suspect, parse_retry_after, redact_url
from wmark.suspects.tokens import read_token
from wmark.verify import verify_blackbox

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def key():
    return generate_key(owner="Test Owner", num_classes=10, input_shape=SHAPE, num_triggers=40)


@pytest.fixture(scope="module")
def copy_model(key):
    return memorising_model(key)


def _open(url: str, key, **options):
    return open_http_suspect(url=url, protocol="v2", model_name=options.pop("model_name", "m"),
                             num_classes=key.num_classes, input_shape=SHAPE, token=options.pop("token", None),
                             options=HttpOptions(**{"backoff": 0.01, **options}), seed=0)


def test_stolen_copy_served_label_only_is_detected_and_independent_is_not(marked_digits, digits):
    from wmark.attacks import finetune

    key, marked, independent = marked_digits
    attacker = digits.split(owner_fraction=0.5, seed=0)[1]
    stolen = finetune(copy.deepcopy(marked), x=attacker.x_train, y=attacker.y_train, epochs=1, lr=1e-3, seed=3)
    for model, expected in ((stolen, "detected"), (independent, "not_detected")):
        counter = Counting()
        app = build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, labels_only=True, on_infer=counter)
        with serve_in_background(app) as server:
            suspect = _open(server.url, key)
            verdict = verify_blackbox(key=key, suspect=suspect, alpha=1e-6)
            suspect.close()
        assert verdict.decision == expected
        assert counter.total == verdict.tests[0].queries
        if expected == "detected":
            assert verdict.tests[0].queries <= 20
        else:
            assert verdict.tests[0].queries == len(generate_triggers(key))


def test_scores_output_and_concurrency_give_the_same_answers(key, copy_model):
    app = build_app(model=copy_model, name="m", num_classes=10, input_shape=SHAPE, labels_only=False)
    triggers = generate_triggers(key).inputs.numpy()
    with serve_in_background(app) as server:
        one = _open(server.url, key)
        eight = _open(f"{server.url}/v2/models/m", key, model_name=None, concurrency=8)
        a, b = one.query(triggers), eight.query(triggers)
        one.close()
        eight.close()
    expected = copy_model(torch.from_numpy(triggers)).argmax(1).numpy()
    np.testing.assert_array_equal(a.labels, expected)
    np.testing.assert_array_equal(b.labels, expected)
    assert a.scores is not None and a.scores.shape == (40, 10)
    np.testing.assert_allclose(a.scores.sum(1), 1.0, rtol=1e-5)


def test_failed_answers_are_abstentions_never_matches(key, copy_model):
    app, calls = faulty_v2_app(copy_model, name="m", shape=SHAPE, behaviour=lambda n: 500)
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, retries=2)
        verdict = verify_blackbox(key=key, suspect=suspect, mode="fixed", max_queries=5)
        suspect.close()
    test = verdict.tests[0]
    assert (test.queries, test.abstentions, test.matches) == (5, 5, 0)
    assert calls["requests"] == 5 * 3
    assert verdict.status == "inconclusive" and verdict.decision == "not_detected"


def test_transient_500s_are_retried_and_detection_still_happens(key, copy_model):
    app, calls = faulty_v2_app(copy_model, name="m", shape=SHAPE, behaviour=lambda n: 503 if n % 2 == 0 else None)
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, retries=2)
        verdict = verify_blackbox(key=key, suspect=suspect)
        suspect.close()
    assert verdict.detected
    assert verdict.tests[0].abstentions == 0
    assert calls["requests"] == 2 * calls["answered"]
    assert suspect.stats.retries == calls["answered"]


def test_garbage_answers_are_malformed_abstentions(key, copy_model):
    bodies = [b"not json at all", b'{"outputs": []}', b'{"outputs": [{"datatype": "INT64", "data": ["x"]}]}',
              b'{"outputs": [{"datatype": "FP32", "data": [NaN, 1, 2, 3, 4, 5, 6, 7, 8, 9]}]}']
    # The first answer is good, so later mismatches count as malformed rather than stopping the run.
    app, _ = faulty_v2_app(copy_model, name="m", shape=SHAPE,
                           behaviour=lambda n: None if n == 0 else bodies[(n - 1) % len(bodies)])
    triggers = generate_triggers(key).inputs.numpy()[:9]
    with serve_in_background(app) as server:
        suspect = _open(server.url, key)
        outcomes = [o for _, o in sorted(suspect.stream(triggers), key=lambda p: p[0])]
        suspect.close()
    assert outcomes[0].status == "ok"
    assert [o.status for o in outcomes[1:]] == ["malformed"] * 8
    assert all(o.label == -1 and o.answer_sha256 for o in outcomes[1:])


def test_timeouts_become_abstentions(key, copy_model):
    app, _ = faulty_v2_app(copy_model, name="m", shape=SHAPE, behaviour=lambda n: None if n == 0 else 1.0)
    triggers = generate_triggers(key).inputs.numpy()[:2]
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, timeout=0.2, retries=1)
        answers = suspect.query(triggers)
        suspect.close()
    assert answers.labels[0] >= 0 and answers.labels[1] == -1


def test_429_retry_after_is_honoured(key, copy_model):
    app, calls = faulty_v2_app(copy_model, name="m", shape=SHAPE,
                               behaviour=lambda n: (429, {"Retry-After": "1"}) if n == 0 else None)
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, backoff=0.0, retries=2)
        start = time.perf_counter()
        answers = suspect.query(generate_triggers(key).inputs.numpy()[:1])
        elapsed = time.perf_counter() - start
        suspect.close()
    assert answers.labels[0] >= 0
    assert calls["requests"] == 2
    assert elapsed >= 1.0


def test_credentials_in_the_url_never_reach_reports():
    assert redact_url("https://u:pw@h.example:8443/v1/models/m:predict?api_key=abc") == \
        "https://h.example:8443/v1/models/m:predict"


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_too_long_retry_after_stops_saying_whether_the_answers_so_far_are_kept(key, copy_model, tmp_path):
    """The message promised that "the transcript resumes" even when no transcript was kept: it says what is true."""
    from wmark.keys import save_key
    from wmark.remote import verify_remote

    app, _ = faulty_v2_app(copy_model, name="m", shape=SHAPE,
                           behaviour=lambda n: None if n < 2 else (503, {"Retry-After": "3600"}))
    save_key(key, tmp_path / "owner.key")
    lost = (r"^The suspect asks to wait 3600 s before the next request \(HTTP 503 Retry-After\); answers so far are "
            r"lost: re-run the same command later, with --transcript to keep them next time\.$")
    kept = (r"^The suspect asks to wait 3600 s before the next request \(HTTP 503 Retry-After\); answers so far are "
            r"kept: re-run the same command later, with the same transcript, to resume\.$")
    with serve_in_background(app) as server:
        run = {"key": tmp_path / "owner.key", "url": server.url, "model_name": "m", "retries": 0}
        with pytest.raises(RuntimeFailure, match=lost):
            verify_remote(**run)
        with pytest.raises(RuntimeFailure, match=kept):
            verify_remote(**run, transcript=tmp_path / "t.sqlite")
        suspect = _open(server.url, key)
        with pytest.raises(RuntimeFailure, match=lost):
            suspect.query(generate_triggers(key).inputs.numpy()[:1])
        suspect.close()


def test_server_dying_mid_run_is_a_clear_error(key, copy_model):
    app = build_app(model=copy_model, name="m", num_classes=10, input_shape=SHAPE, labels_only=True)
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, retries=1)
        first = suspect.query(generate_triggers(key).inputs.numpy()[:3])
    assert (first.labels >= 0).all()
    with pytest.raises(RuntimeFailure, match="stopped answering.*; answers so far are lost: re-run the same "
                       "verification once it is back, with --transcript to keep them next time\\.$"):
        suspect.query(generate_triggers(key).inputs.numpy()[3:6])
    suspect.close()


def test_unreachable_host(key):
    with pytest.raises(RuntimeFailure, match="Cannot reach the suspect"):
        _open(f"http://127.0.0.1:{unused_port()}", key, retries=0)


def test_tls_error_is_named(key, copy_model):
    app = build_app(model=copy_model, name="m", num_classes=10, input_shape=SHAPE)
    with serve_in_background(app) as server, pytest.raises(RuntimeFailure, match="TLS"):
        _open(server.url.replace("http://", "https://"), key, retries=0)


def test_wrong_model_name(key, copy_model):
    app = build_app(model=copy_model, name="m", num_classes=10, input_shape=SHAPE)
    with serve_in_background(app) as server, pytest.raises(UsageError, match="HTTP 404.*the model name"):
        _open(server.url, key, model_name="other")


def test_refused_or_missing_token(key, copy_model, monkeypatch):
    app = build_app(model=copy_model, name="m", num_classes=10, input_shape=SHAPE, token="s3cret-token")
    with serve_in_background(app) as server:
        with pytest.raises(UsageError, match="token was refused") as refused:
            _open(server.url, key, token="wrong-token")
        assert "wrong-token" not in str(refused.value)
        with pytest.raises(UsageError, match="needs a bearer token"):
            _open(server.url, key)
        monkeypatch.setenv("WMARK_TEST_TOKEN", "s3cret-token")
        suspect = _open(server.url, key, token=read_token(env="WMARK_TEST_TOKEN"))
        assert "s3cret" not in repr(suspect)
        assert suspect.query(generate_triggers(key).inputs.numpy()[:2]).labels.min() >= 0
        suspect.close()


def test_token_sources(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text("abc\n")
    assert read_token(file=path) == "abc"
    monkeypatch.delenv("WMARK_NO_SUCH_VAR", raising=False)
    with pytest.raises(UsageError, match="WMARK_NO_SUCH_VAR.*unset"):
        read_token(env="WMARK_NO_SUCH_VAR")
    with pytest.raises(UsageError, match="not both"):
        read_token(env="X", file=path)
    assert read_token() is None


def test_a_key_file_or_a_multi_line_token_is_never_sent(tmp_path, monkeypatch, capsys):
    """`--token-file owner.key` used to send the key (secret and all) to the suspect as the bearer token, and a
    token no header can carry stopped the run with httpx's message quoting the whole header, token included."""
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.keys import load_key, save_key

    key_file = tmp_path / "owner.key"
    save_key(generate_key(owner="o", num_classes=10, input_shape=SHAPE, num_triggers=10), key_file)
    secret = load_key(key_file).secret.hex()
    one_line = tmp_path / "compact.key"
    one_line.write_text(json.dumps(json.loads(key_file.read_text())))
    for path in (key_file, one_line):
        with pytest.raises(UsageError, match=rf"^The token file {path} holds a wmark key, not a token; sending it "
                                             "would give the suspect the key's secret"):
            read_token(file=path)
    two_lines = tmp_path / "token"
    two_lines.write_text("tok-part-one\ntok-part-two\n")
    with pytest.raises(UsageError, match="holds more than one line or control characters; a bearer token is one line"):
        read_token(file=two_lines)
    monkeypatch.setenv("WMARK_TEST_TOKEN", "abc\rdef")
    with pytest.raises(UsageError, match="^The environment variable WMARK_TEST_TOKEN holds more than one line"):
        read_token(env="WMARK_TEST_TOKEN")
    for token_file in (key_file, two_lines):
        result = CliRunner().invoke(main, ["verify", "api", "--key", str(key_file), "--suspect",
                                           "http://127.0.0.1:9/v2/models/m", "--token-file", str(token_file)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1
        assert secret not in result.stderr and "tok-part" not in result.stderr


def test_classes_that_do_not_fit_the_key(key):
    seven = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))
    app = build_app(model=seven, name="m", num_classes=7, input_shape=SHAPE, labels_only=False)
    with serve_in_background(app) as server, pytest.raises(UsageError, match="7 scores per input.*10 classes"):
        _open(server.url, key)

    # A label-only server whose first answer is outside the key's classes.
    twelve = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12))
    with torch.no_grad():
        twelve[1].bias[11] = 100.0
    app = build_app(model=twelve, name="m", num_classes=12, input_shape=SHAPE, labels_only=True)
    with serve_in_background(app) as server:
        suspect = _open(server.url, key)
        with pytest.raises(UsageError, match="label 11, outside the key's 10 classes"):
            suspect.query(generate_triggers(key).inputs.numpy()[:1])
        suspect.close()


def test_wrong_input_shape(key, copy_model):
    app = build_app(model=independent_model(generate_key(owner="x", input_shape=(1, 28, 28))), name="m",
                    num_classes=10, input_shape=(1, 28, 28))
    with serve_in_background(app) as server, pytest.raises(UsageError, match=r"inputs shaped \[-1, 1, 28, 28\]"):
        _open(server.url, key)


def test_rate_limit_spaces_requests(key, copy_model):
    app = build_app(model=copy_model, name="m", num_classes=10, input_shape=SHAPE, labels_only=True)
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, rate=20.0, concurrency=4)
        start = time.perf_counter()
        suspect.query(generate_triggers(key).inputs.numpy()[:11])
        elapsed = time.perf_counter() - start
        suspect.close()
    assert elapsed >= 10 / 20.0 * 0.95


@pytest.mark.parametrize(("options", "message"), [
    ({"timeout": float("nan")}, "The timeout must be a positive finite number of seconds, got nan."),
    ({"timeout": float("inf")}, "The timeout must be a positive finite number of seconds, got inf."),
    ({"timeout": 0.0}, "The timeout must be a positive finite number of seconds, got 0.0."),
    ({"rate": float("nan")}, "The request rate must be positive, got nan."),
    ({"rate": -1.0}, "The request rate must be positive, got -1.0."),
])
def test_transport_settings_no_request_can_use_are_refused(options, message):
    """A NaN or infinite timeout crashed inside httpx (exit 3); a NaN rate silently sent with no limit at all."""
    with pytest.raises(UsageError, match=f"^{message}$"):
        HttpOptions(**options)


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), 0.0, -1.0, 1e19])
def test_a_cover_ratio_no_draw_can_use_is_refused(ratio):
    """1e19 is finite but numpy's Poisson draw fails on it naming no option."""
    from wmark.suspects.probe import CoverTraffic

    message = f"The cover ratio must be a number above 0 and at most 1000, got {ratio}."
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        CoverTraffic(np.zeros((4, *SHAPE), dtype=np.float32), ratio=ratio, seed=0)


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "nan"], "The timeout must be a positive finite number of seconds, got nan."),
    (["--timeout", "inf"], "The timeout must be a positive finite number of seconds, got inf."),
    (["--cover-data", "digits", "--cover-ratio", "inf"], "The cover ratio must be a number above 0 and at most 1000, got inf."),
    (["--cover-ratio", "5"], "--cover-ratio does not apply without --cover-data."),
])
def test_bad_transport_options_exit_2_before_any_request(tmp_path, args, message):
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.keys import save_key

    key_file = tmp_path / "k.key"
    save_key(generate_key(owner="o", num_classes=10, input_shape=SHAPE, num_triggers=10), key_file)
    # port 9 (discard) answers nothing: the options must be refused before the suspect is contacted
    result = CliRunner().invoke(main, ["verify", "api", "--key", str(key_file), "--suspect",
                                       "http://127.0.0.1:9/v2/models/m", *args])
    assert (result.exit_code, result.stderr) == (2, f"error: {message}\n")


def test_an_html_page_answered_with_200_stops_at_the_first_query(tmp_path):
    """A JSON endpoint URL that answers an HTML page with HTTP 200 (a login page, a proxy) was asked every trigger
    of the budget, each a malformed abstention, showing the page's owner all the triggers for "no usable answer";
    the first such answer now stops the run (exit 3) with one sentence."""
    from click.testing import CliRunner
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from wmark.cli import main
    from wmark.keys import save_key

    calls = {"n": 0}

    async def page(_: Request) -> HTMLResponse:
        calls["n"] += 1
        return HTMLResponse("<html><body>Please log in</body></html>")

    key_file = tmp_path / "k.key"
    save_key(generate_key(owner="o", num_classes=10, input_shape=SHAPE, num_triggers=20), key_file)
    with serve_in_background(Starlette(routes=[Route("/m", page, methods=["POST"])])) as server:
        result = CliRunner().invoke(main, ["verify", "api", "--key", str(key_file), "--suspect", f"{server.url}/m",
                                           "--protocol", "json", "--template", "hf", "--retries", "0",
                                           "--transcript", str(tmp_path / "t.sqlite")])
    assert result.exit_code == 3, result.output
    assert result.stderr == (f"error: The suspect at {server.url}/m answered the first query with something that is "
                             "not JSON (text/html); check the URL and the protocol.\n")
    assert calls["n"] == 1


@pytest.mark.parametrize("value", ["Wed Oct 21 07:28:00 2015", "Wed, 21 Oct 2015 07:28:00 -0000"])
def test_retry_after_dates_without_a_zone_are_gmt_whatever_the_local_time_zone(value, monkeypatch):
    """The asctime HTTP date and a "-0000" zone parse as naive datetimes, read as local time: in New York a
    10 s Retry-After became 4 hours (and stopped the run as too long a wait), east of UTC no wait at all."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after(value, now=1445412470.0) == pytest.approx(10.0)
    finally:
        monkeypatch.undo()
        time.tzset()


def _streaming_v2_app(body: Callable[[int], AsyncIterator[bytes]]):
    """A label-only v2 server whose n-th inference answer is the byte stream ``body(n)`` (200, JSON)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    calls = {"n": 0}

    async def meta(_):
        return JSONResponse(v2_meta("m", SHAPE, {"name": "label", "datatype": "INT64", "shape": [-1]}))

    async def infer(_):
        calls["n"] += 1
        return StreamingResponse(body(calls["n"] - 1), media_type="application/json")

    return Starlette(routes=[Route("/v2/models/{model}", meta),
                             Route("/v2/models/{model}/infer", infer, methods=["POST"])]), calls


_LABEL_3 = b'{"outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}]}'


def test_an_answer_trickling_in_past_the_timeout_is_abandoned(key):
    """httpx's timeout bounds each read, not the answer: a server sending a byte every 50 ms held a query with
    --timeout 0.5 for 4 s (and one sending a byte every few seconds, forever)."""
    async def trickle(n: int) -> AsyncIterator[bytes]:
        if n == 0:
            yield _LABEL_3
            return
        for b in _LABEL_3:
            yield bytes([b])
            await asyncio.sleep(0.05)

    app, calls = _streaming_v2_app(trickle)
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, timeout=0.5, retries=1)
        start = time.perf_counter()
        outcomes = [o for _, o in suspect.stream(generate_triggers(key).inputs.numpy()[:2])]
        elapsed = time.perf_counter() - start
        suspect.close()
    assert outcomes[0].label == 3
    assert (outcomes[1].status, outcomes[1].error, outcomes[1].attempts) == ("failed", "no answer within 0.5 s", 2)
    assert calls["n"] == 3 and elapsed < 2.0


def test_a_huge_answer_is_malformed_and_never_held_whole(key):
    """An answer of any size used to be read whole into memory before it was even parsed."""
    from wmark.suspects.bodies import MAX_ANSWER_BYTES

    async def huge(n: int) -> AsyncIterator[bytes]:
        if n == 0:
            yield _LABEL_3
            return
        yield b'{"outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [3], "pad": "'
        for _ in range(MAX_ANSWER_BYTES // 2**16 + 2):
            yield b"x" * 2**16
        yield b'"}]}'

    app, calls = _streaming_v2_app(huge)
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, retries=2)
        outcomes = [o for _, o in suspect.stream(generate_triggers(key).inputs.numpy()[:2])]
        suspect.close()
    assert outcomes[0].label == 3
    assert (outcomes[1].status, outcomes[1].label, outcomes[1].answer) == ("malformed", -1, "")
    assert outcomes[1].error == f"malformed answer: an answer larger than {MAX_ANSWER_BYTES} bytes"
    assert calls["n"] == 2


def test_a_suspect_echoing_the_token_never_gets_it_into_the_transcript_or_a_message(key, tmp_path):
    """An answer or error quoting the request's headers (a debug endpoint, a verbose error) went into the
    transcript's answer and error columns and into the run's error message with the bearer token in full."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from wmark.suspects.probe import ProbeSuspect
    from wmark.transcript import Transcript

    token = "tok/abc+def=="
    calls = {"n": 0}

    async def meta(_):
        return JSONResponse(v2_meta("m", SHAPE, {"name": "label", "datatype": "INT64", "shape": [-1]}))

    async def infer(request: Request):
        calls["n"] += 1
        auth = request.headers["authorization"]
        if calls["n"] == 1:
            return JSONResponse({"outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}],
                                 "echo": auth})
        if calls["n"] == 2:
            return Response(json.dumps({"outputs": [], "echo": auth}).replace("/", "\\/"), media_type="application/json")
        return JSONResponse({"error": f"bad request with headers authorization={auth}"}, status_code=400)

    app = Starlette(routes=[Route("/v2/models/{model}", meta), Route("/v2/models/{model}/infer", infer, methods=["POST"])])
    path = tmp_path / "t.sqlite"
    with serve_in_background(app) as server:
        suspect = _open(server.url, key, token=token, retries=0)
        record = Transcript(path, key_commitment="a" * 64, suspect=suspect.description, protocol="v2")
        ProbeSuspect(suspect, transcript=record).query(generate_triggers(key).inputs.numpy()[:3])
        record.close()
        suspect.close()
        fresh = _open(server.url, key, token=token, retries=0)
        with pytest.raises(UsageError, match=r"rejected the first query \(HTTP 400: bad request with headers "
                                             r"authorization=Bearer \[token\]\)") as refused:
            fresh.query(generate_triggers(key).inputs.numpy()[:1])
        fresh.close()
    assert "abc" not in str(refused.value)
    stored = path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("t.sqlite-*"))
    assert b"abc+def" not in stored and b"[token]" in stored


def test_ctrl_c_at_concurrency_keeps_the_answers_already_in_flight(key, copy_model):
    """Ctrl-C while concurrent requests were in flight waited for their answers, then dropped them: the transcript
    kept them pending and a resumed run sent those queries again."""
    import os
    import signal
    import threading

    app, calls = faulty_v2_app(copy_model, name="m", shape=SHAPE, behaviour=lambda n: None if n == 0 else 0.6)
    got: list[int] = []
    # a run started in the background by a shell without job control inherits SIGINT ignored; Ctrl-C is the default
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with serve_in_background(app) as server:
            suspect = _open(server.url, key, concurrency=4)
            suspect.query(generate_triggers(key).inputs.numpy()[:1])
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            with pytest.raises(KeyboardInterrupt):
                for i, outcome in suspect.stream(generate_triggers(key).inputs.numpy()[:12]):
                    assert outcome.ok
                    got.append(i)
            suspect.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls["requests"] == 1 + 4
    assert sorted(got) == [0, 1, 2, 3]
