"""Black-box verification of a text classifier over HTTP: a Hugging Face style endpoint and `wmark serve`."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch
from click.testing import CliRunner
from servekit import start_serve, trickle, wait_ready
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from textkit import TextMemoriser, hf_bert, text_key

from wmark.cli import main
from wmark.errors import UsageError
from wmark.io import save_model
from wmark.keys import load_key, save_key
from wmark.remote import verify_remote
from wmark.serve import build_app, serve_in_background
from wmark.text import TextInputs


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("textkey") / "owner.key"
    save_key(text_key(num_classes=4, num_triggers=24, max_length=32), path)
    return path


def _app(model, key, *, labels_only: bool):
    return build_app(model=model, name="m", num_classes=key.num_classes, input_shape=tuple(key.input_shape),
                     labels_only=labels_only, text=TextInputs.from_key(key))


@pytest.mark.parametrize("labels_only", [False, True])
def test_a_served_copy_is_detected_and_an_independent_model_is_not(key_file, tmp_path, labels_only):
    key = load_key(key_file)
    with serve_in_background(_app(TextMemoriser(key), key, labels_only=labels_only)) as server:
        verdict = verify_remote(key=key_file, url=f"{server.url}/hf/models/m", protocol="json", template="hf",
                                transcript=tmp_path / "t.sqlite")
    assert verdict.detected and verdict.tests[0].queries <= 20
    with serve_in_background(_app(hf_bert(4, seed=2), key, labels_only=labels_only)) as server:
        innocent = verify_remote(key=key_file, url=f"{server.url}/hf/models/m", protocol="json", template="hf",
                                 mode="fixed")
    assert not innocent.detected and innocent.tests[0].queries == 24


def test_the_text_endpoint_answers_like_hugging_face_and_refuses_bad_input(key_file):
    key = load_key(key_file)
    with serve_in_background(_app(hf_bert(4), key, labels_only=False)) as server:
        url = f"{server.url}/hf/models/m"
        one = httpx.post(url, json={"inputs": "a short fortune"}).json()
        assert [set(item) for item in one] == [{"label", "score"}] * 4 and one[0]["label"].startswith("LABEL_")
        assert one[0]["score"] >= one[-1]["score"]
        two = httpx.post(url, json={"inputs": ["one", "two"]}).json()
        assert len(two) == 2 and len(two[0]) == 4
        too_long = httpx.post(url, json={"inputs": "word " * 100})
        assert too_long.status_code == 400 and "more than the key's maximum of 32" in too_long.json()["error"]
        for body in ({"inputs": 3}, {"inputs": []}, {"text": "x"}):
            assert httpx.post(url, json=body).status_code == 400
        plain = httpx.post(url, content=b'{"inputs": "x"}', headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415 and "Content-Type: application/json" in plain.json()["error"]
        v2 = httpx.post(f"{server.url}/v2/models/m/infer", json={"inputs": []})
        assert v2.status_code == 400 and "/hf/models/m" in v2.json()["error"]



def test_the_text_endpoint_refuses_too_many_texts_and_lone_surrogates(key_file):
    """5000 strings were all answered at once (the v2 endpoint caps a request at 1024 inputs), and a lone surrogate,
    valid JSON, failed inside the tokenizer with a 500."""
    key = load_key(key_file)
    with serve_in_background(_app(hf_bert(4), key, labels_only=False)) as server:
        url = f"{server.url}/hf/models/m"
        many = httpx.post(url, json={"inputs": ["hi"] * 1025}, timeout=30)
        assert many.status_code == 400 and "at most 1024 inputs per request" in many.json()["error"]
        assert httpx.post(url, json={"inputs": ["hi"] * 1024}, timeout=30).status_code == 200
        surrogate = httpx.post(url, content=b'{"inputs": ["fine", "\\ud800"]}')
        assert surrogate.status_code == 400 and "valid Unicode" in surrogate.json()["error"]

def test_the_text_endpoint_refuses_a_body_over_its_limit_and_a_text_longer_than_its_tokens_can_hold(key_file):
    """The body was read whole whatever its size, and a text of millions of characters was tokenized whole (under
    the lock every text request waits on) before its length in tokens was checked."""
    key = load_key(key_file)
    with serve_in_background(build_app(model=hf_bert(4), name="m", num_classes=4, input_shape=(32,),
                                       text=TextInputs.from_key(key), max_body_bytes=10_000)) as server:
        url = f"{server.url}/hf/models/m"
        over = httpx.post(url, json={"inputs": "word " * 2000})
        assert over.status_code == 413 and "limit of 10000 bytes" in over.json()["error"]
        assert httpx.post(url, json={"inputs": "word " * 20}).status_code == 200
    with serve_in_background(_app(hf_bert(4), key, labels_only=True)) as server:
        long = httpx.post(f"{server.url}/hf/models/m", json={"inputs": ["fine", " " * 1025]})
    assert long.status_code == 400 and long.json() == {
        "error": "an input text is 1025 characters long, more than the 1024 this server takes; shorten it"}


def test_the_text_endpoint_gives_a_trickled_body_408(key_file):
    key = load_key(key_file)
    with serve_in_background(build_app(model=hf_bert(4), name="m", num_classes=4, input_shape=(32,),
                                       text=TextInputs.from_key(key), body_timeout=0.5)) as server:
        head = (b"POST /hf/models/m HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n")
        status, _, body = trickle(server.host, server.port, head).partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408 ") and "within 0.5 seconds" in json.loads(body)["error"]


def test_the_text_endpoint_refuses_json_nested_thousands_deep(key_file):
    """json.loads raises RecursionError, not ValueError, on arrays nested thousands deep: it was a 500."""
    key = load_key(key_file)
    with serve_in_background(_app(hf_bert(4), key, labels_only=False)) as server:
        raw = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        resp = httpx.post(f"{server.url}/hf/models/m", content=raw)
        assert resp.status_code == 400 and "nests JSON too deeply" in resp.json()["error"]


@pytest.mark.parametrize("answer, message", [
    ([{"label": "positive", "score": 0.9}, {"label": "negative", "score": 0.1}], "not a class index"),
    ([{"label": "LABEL_7", "score": 1.0}], "outside the key's 4 classes"),
    # the top label fits the key, a lower one does not
    ([{"label": "LABEL_1", "score": 0.9}, {"label": "LABEL_99", "score": 0.1}], "label 99, outside the key's 4"),
])
def test_an_endpoint_answering_another_label_set_is_refused(key_file, answer, message):
    app = Starlette(routes=[Route("/predict", lambda _: JSONResponse(answer), methods=["POST"])])
    with serve_in_background(app) as server, pytest.raises(UsageError, match=message):
        verify_remote(key=key_file, url=f"{server.url}/predict", protocol="json", template="hf")


def test_cli_keygen_makes_a_text_key_and_refuses_half_a_request(tmp_path):
    runner = CliRunner()
    out = tmp_path / "t.key"
    done = runner.invoke(main, ["keygen", "--owner", "ACME", "--out", str(out), "--classes", "8", "--modality",
                                "text", "--tokenizer", "all-MiniLM-L6-v2", "--max-length", "48", "--json"])
    assert done.exit_code == 0, done.output
    info = json.loads(done.output)
    assert info["modality"]["max_length"] == 48 and info["input_shape"] == [48]
    assert load_key(out).schemes["trigger"]["pattern"] == "words"
    half = runner.invoke(main, ["keygen", "--owner", "ACME", "--out", str(tmp_path / "u.key"), "--modality", "text"])
    assert half.exit_code == 2 and "needs --tokenizer" in half.output and not (tmp_path / "u.key").exists()
    missing = runner.invoke(main, ["keygen", "--owner", "ACME", "--out", str(tmp_path / "v.key"), "--modality", "text",
                                   "--tokenizer", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nor a local directory holding a tokenizer" in missing.output
    assert not (tmp_path / "v.key").exists()


def test_wmark_serve_serves_a_text_classifier_that_cli_verify_clears(key_file, tmp_path):
    from wmark.models import build_model

    key = load_key(key_file)
    weights = tmp_path / "bert.safetensors"
    save_model(build_model("tiny-bert", num_classes=4, input_shape=(32,), seed=3), weights,
               metadata={"arch": "tiny-bert", "num_classes": 4, "input_shape": [32], "modality": key.modality})
    proc, url, _ = start_serve("--arch", "tiny-bert", "--weights", str(weights), "--name", "fortunes", "--labels-only",
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        wait_ready(proc, url)
        answer = httpx.post(f"{url}/hf/models/fortunes", json={"inputs": "computers are fast"}).json()
        assert len(answer) == 1 and set(answer[0]) == {"label"}
        done = CliRunner().invoke(main, ["verify", "api", "--key", str(key_file), "--suspect", f"{url}/hf/models/fortunes",
                                         "--protocol", "json", "--template", "hf"])
        assert done.exit_code == 1 and "not_detected" in done.output
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wmark_serve_refuses_a_text_model_whose_file_records_no_tokenizer(tmp_path):
    """Served over v2 as an image model, it answered every request with HTTP 500 and a traceback."""
    from wmark.models import build_model

    weights = tmp_path / "bert.safetensors"
    save_model(build_model("tiny-bert", num_classes=4, input_shape=(32,), seed=3), weights,
               metadata={"arch": "tiny-bert", "num_classes": 4, "input_shape": [32]})
    done = CliRunner().invoke(main, ["serve", "--arch", "tiny-bert", "--weights", str(weights), "--name", "m",
                                     "--port", "0"])
    assert (done.exit_code, done.stderr) == (2, (f"error: {weights} holds a text model but records no tokenizer "
                                                "(wmark.modality), so its text endpoint cannot tokenize; save it with "
                                                "wmark (`wmark train` or `wmark embed`, or save_model with "
                                                "metadata=Watermarker.metadata() of its text key).\n"))


def test_json_templates_send_text_as_a_string_and_refuse_numeric_placeholders():
    import numpy as np

    from wmark.suspects.json_template import JsonTemplateProtocol, load_template

    hf = JsonTemplateProtocol(url="http://127.0.0.1:9/p", template=load_template("hf"), num_classes=4,
                              input_shape=(32,))
    assert hf.request(np.asarray(["two words"], dtype=object)[0]).body == {"inputs": "two words"}
    batched = JsonTemplateProtocol(url="http://127.0.0.1:9/p", template={"request": {"texts": "$input_batch"},
                                                                          "response": {"label": "label"}},
                                   num_classes=4, input_shape=(32,))
    assert batched.request("two words").body == {"texts": ["two words"]}
    b64 = JsonTemplateProtocol(url="http://127.0.0.1:9/p", template={"request": {"x": "$input_b64"},
                                                                      "response": {"label": "label"}},
                               num_classes=4, input_shape=(32,))
    with pytest.raises(UsageError, match="cannot carry text"):
        b64.request("two words")


def test_a_text_key_over_v2_is_refused_in_one_sentence_naming_the_json_protocol(key_file):
    with pytest.raises(UsageError, match=r"the v2 protocol does not carry; use --protocol json --template hf"):
        verify_remote(key=key_file, url="http://127.0.0.1:9/v2/models/m", protocol="v2")


def test_text_cover_traffic_sends_the_cover_data_texts(key_file, tmp_path):
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "computers").write_text("computers are fast\n%\nthe disk is full\n%\n" + "word " * 80 + "\n")
    (fortunes / "people").write_text("people are kind\n%\nsome people are not\n")
    key = load_key(key_file)
    with serve_in_background(_app(TextMemoriser(key), key, labels_only=False)) as server:
        verdict = verify_remote(key=key_file, url=f"{server.url}/hf/models/m", protocol="json", template="hf",
                                cover_data=f"fortunes:{fortunes}", cover_ratio=2.0, mode="fixed", max_queries=6)
    probe = verdict.tests[0].details["probe"]
    assert probe["sent"]["cover"] > 0 and set(probe["statuses"]) == {"ok"}


def test_a_top_k_label_list_is_read_at_its_top_label_and_a_repeated_label_is_malformed():
    from wmark.suspects.json_template import JsonTemplateProtocol, load_template
    from wmark.suspects.protocols import MalformedAnswer

    proto = JsonTemplateProtocol(url="http://127.0.0.1:9/predict", template=load_template("hf"), num_classes=4,
                                 input_shape=(32,))
    top2 = [{"label": "LABEL_0", "score": 0.3}, {"label": "LABEL_1", "score": 0.6}]  # sums to 0.9: a top-k answer
    assert proto.parse(top2).label == 1
    with pytest.raises(MalformedAnswer, match="lists a label twice"):
        proto.parse([{"label": "LABEL_1", "score": 0.6}, {"label": "1", "score": 0.4}])


def test_a_text_model_with_nan_outputs_answers_a_json_500(key_file):
    # v2 answers 400 for inputs far outside a model's range; no text is, so NaN outputs are the model's fault
    key = load_key(key_file)
    model = hf_bert(4)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("classifier.weight")).fill_(float("nan"))
    with serve_in_background(_app(model, key, labels_only=False)) as server:
        resp = httpx.post(f"{server.url}/hf/models/m", json={"inputs": "a short fortune"})
    assert resp.status_code == 500
    assert "NaN or infinite" in resp.json()["error"]


def test_a_text_model_that_raises_answers_a_json_500(key_file):
    key = load_key(key_file)
    model = hf_bert(4)
    with serve_in_background(_app(model, key, labels_only=False)) as server:
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("at /srv/secret"))
        resp = httpx.post(f"{server.url}/hf/models/m", json={"inputs": "a short fortune"})
    assert resp.status_code == 500 and "RuntimeError" in resp.json()["error"] and "secret" not in resp.text
