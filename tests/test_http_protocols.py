"""TensorFlow Serving and JSON-template endpoints (TorchServe, Hugging Face) served by real local servers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from httpkit import independent_model, memorising_model
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wmark.errors import UsageError
from wmark.keys import generate_key
from wmark.schemes.trigger_set import generate_triggers
from wmark.serve import serve_in_background
from wmark.suspects.http import HttpOptions, open_http_suspect
from wmark.suspects.json_template import load_template
from wmark.suspects.protocols import (
    AnswerCountMismatch,
    AnswerMismatch,
    MalformedAnswer,
    TFServingProtocol,
    V2Protocol,
    label_index,
)
from wmark.verify import verify_blackbox

SHAPE = (1, 8, 8)
NAMES = [f"class-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def key():
    return generate_key(owner="Test Owner", num_classes=10, input_shape=SHAPE, num_triggers=40)


@pytest.fixture(scope="module")
def copy_model(key):
    return memorising_model(key)


def _probs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(np.asarray(x, dtype=np.float32))), 1).numpy()


def tfserving_app(model: torch.nn.Module, *, style: str, channels_last: bool = False) -> Starlette:
    """TF Serving REST: status, metadata, and :predict answering in one of several styles."""
    dims = [{"size": "-1"}] + [{"size": str(s)} for s in ((8, 8, 1) if channels_last else SHAPE)]
    calls = {"n": 0}

    async def status(_: Request) -> JSONResponse:
        return JSONResponse({"model_version_status": [{"version": "1", "state": "AVAILABLE"}]})

    async def metadata(_: Request) -> JSONResponse:
        return JSONResponse({"metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dims}}}}}}}})

    async def predict(request: Request) -> Response:
        x = np.asarray(json.loads(await request.body())["instances"], dtype=np.float32)
        if channels_last:
            x = np.moveaxis(x, -1, 1)
        p = _probs(model, x)
        calls["n"] += 1
        if style == "scores":
            return JSONResponse({"predictions": p.tolist()})
        if style == "nan-every-third":
            row = "[" + ", ".join("NaN" if calls["n"] % 3 == 0 else repr(float(v)) for v in p[0]) + "]"
            return Response('{"predictions": [' + row + "]}", media_type="application/json")
        if style == "named":
            top = np.argsort(-p[0])[:3]
            return JSONResponse({"predictions": [{"classes": top.tolist(), "scores": p[0][top].tolist()}]})
        if style == "named-nested":
            return JSONResponse({"predictions": [{"probabilities": p.tolist()}]})
        if style == "named-12":  # another model's 12 classes
            return JSONResponse({"predictions": [{"probabilities": np.pad(p[0], (0, 2)).tolist()}]})
        return JSONResponse({"predictions": p.argmax(1).tolist()})

    return Starlette(routes=[
        Route("/v1/models/{name}", status),
        Route("/v1/models/{name}/metadata", metadata),
        Route("/v1/models/{name}:predict", predict, methods=["POST"]),
    ])


@pytest.mark.parametrize("style", ["scores", "label", "named"])
def test_tfserving_detects_a_copy(key, copy_model, style):
    with serve_in_background(tfserving_app(copy_model, style=style)) as server:
        suspect = open_http_suspect(url=server.url, protocol="tfserving", model_name="m", num_classes=10,
                                    input_shape=SHAPE)
        verdict = verify_blackbox(key=key, suspect=suspect)
        suspect.close()
    assert verdict.detected
    assert verdict.tests[0].queries <= 20


def test_tfserving_named_scores_nested_are_read_and_another_class_count_is_refused(key, copy_model):
    """Named scores nested as a batch of one ({"probabilities": [[...]]}) and named scores for 12 classes under a
    10-class key were both malformed answers, every one an abstention; the first are read now, and the second
    refused in one sentence like any answer of another model's class count."""
    triggers = generate_triggers(key).inputs.numpy()[:8]
    with serve_in_background(tfserving_app(copy_model, style="named-nested")) as server:
        suspect = open_http_suspect(url=server.url, protocol="tfserving", model_name="m", num_classes=10,
                                    input_shape=SHAPE)
        answers = suspect.query(triggers)
        suspect.close()
    np.testing.assert_array_equal(answers.labels, _probs(copy_model, triggers).argmax(1))
    with serve_in_background(tfserving_app(copy_model, style="named-12")) as server:
        suspect = open_http_suspect(url=server.url, protocol="tfserving", model_name="m", num_classes=10,
                                    input_shape=SHAPE, options=HttpOptions(retries=0))
        with pytest.raises(UsageError, match="does not fit the key: .*12 scores per input .* 10 classes"):
            suspect.query(triggers)
        suspect.close()


def test_tfserving_nan_tokens_are_abstentions(key, copy_model):
    with serve_in_background(tfserving_app(copy_model, style="nan-every-third")) as server:
        suspect = open_http_suspect(url=f"{server.url}/v1/models/m", protocol="tfserving", model_name=None,
                                    num_classes=10, input_shape=SHAPE)
        answers = suspect.query(generate_triggers(key).inputs.numpy()[:6])
        suspect.close()
    assert answers.labels.tolist()[2] == -1 and answers.labels.tolist()[5] == -1
    assert (answers.labels[[0, 1, 3, 4]] >= 0).all()


def test_tfserving_channels_last_is_discovered(key, copy_model):
    with serve_in_background(tfserving_app(copy_model, style="label", channels_last=True)) as server:
        suspect = open_http_suspect(url=server.url, protocol="tfserving", model_name="m", num_classes=10,
                                    input_shape=SHAPE)
        assert suspect.server_info["channels_last"] is True
        answers = suspect.query(generate_triggers(key).inputs.numpy())
        suspect.close()
    np.testing.assert_array_equal(answers.labels, _probs(copy_model, generate_triggers(key).inputs.numpy()).argmax(1))


def json_app(model: torch.nn.Module, *, style: str) -> Starlette:
    async def torchserve(request: Request) -> JSONResponse:
        x = np.asarray(json.loads(await request.body())["data"], dtype=np.float32)[None]
        p = _probs(model, x)[0]
        top = np.argsort(-p)[:5]
        if style == "class":
            return JSONResponse({"class": NAMES[int(top[0])], "probability": float(p[top[0]])})
        return JSONResponse({NAMES[int(i)]: float(p[i]) for i in top[::-1]})

    async def hf(request: Request) -> JSONResponse:
        x = np.asarray(json.loads(await request.body())["inputs"], dtype=np.float32)[None]
        p = _probs(model, x)[0]
        items = [{"label": f"LABEL_{i}", "score": float(p[i])} for i in np.argsort(p)[-3:]]
        return JSONResponse([items] if style == "nested" else items)

    return Starlette(routes=[Route("/predictions/m", torchserve, methods=["POST"]),
                             Route("/models/m", hf, methods=["POST"])])


@pytest.mark.parametrize("style", ["topk", "class"])
def test_torchserve_template(key, copy_model, tmp_path, style):
    template = load_template("torchserve")
    template["labels"] = NAMES
    path = tmp_path / "torchserve.json"
    path.write_text(json.dumps(template))
    with serve_in_background(json_app(copy_model, style=style)) as server:
        suspect = open_http_suspect(url=f"{server.url}/predictions/m", protocol="json", template=str(path),
                                    num_classes=10, input_shape=SHAPE)
        verdict = verify_blackbox(key=key, suspect=suspect)
        suspect.close()
    assert verdict.detected


@pytest.mark.parametrize("style", ["flat", "nested"])
def test_hugging_face_template(key, copy_model, style):
    with serve_in_background(json_app(copy_model, style=style)) as server:
        suspect = open_http_suspect(url=f"{server.url}/models/m", protocol="json", template="hf", num_classes=10,
                                    input_shape=SHAPE)
        triggers = generate_triggers(key).inputs.numpy()
        answers = suspect.query(triggers)
        suspect.close()
    np.testing.assert_array_equal(answers.labels, _probs(copy_model, triggers).argmax(1))


def test_independent_model_over_json_is_not_detected(key):
    with serve_in_background(json_app(independent_model(key), style="flat")) as server:
        suspect = open_http_suspect(url=f"{server.url}/models/m", protocol="json", template="hf", num_classes=10,
                                    input_shape=SHAPE)
        verdict = verify_blackbox(key=key, suspect=suspect)
        suspect.close()
    assert not verdict.detected


def test_class_names_without_a_label_list_are_refused(key, copy_model):
    with serve_in_background(json_app(copy_model, style="class")) as server:
        suspect = open_http_suspect(url=f"{server.url}/predictions/m", protocol="json", template="torchserve",
                                    num_classes=10, input_shape=SHAPE, options=HttpOptions(retries=0))
        with pytest.raises(UsageError, match="not a class index.*labels"):
            suspect.query(generate_triggers(key).inputs.numpy()[:1])
        suspect.close()


def test_template_validation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"request": {"x": 1}, "response": [{"label": "y"}]}')
    with pytest.raises(UsageError, match="exactly one of"):
        load_template(str(bad))
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_template(str(bad))
    with pytest.raises(UsageError, match="neither a built-in"):
        load_template(str(tmp_path / "missing.json"))


def test_label_index():
    assert label_index("LABEL_3", 10) == 3
    assert label_index(4.0, 10) == 4
    assert label_index("Coat", 10, NAMES[:4] + ["Coat"] + NAMES[5:]) == 4
    with pytest.raises(AnswerMismatch):
        label_index(10, 10)
    with pytest.raises(MalformedAnswer):
        label_index(None, 10)
    with pytest.raises(MalformedAnswer):
        label_index(2.5, 10)


def test_v2_parsing_variants():
    proto = V2Protocol(url="http://h:1", model_name="m", num_classes=3, input_shape=(2,))
    assert proto.parse({"outputs": [{"datatype": "FP32", "data": [0.1, 0.7, 0.2]}]}).label == 1
    assert proto.parse({"outputs": [{"datatype": "INT64", "data": [2]}]}).label == 2
    assert proto.parse({"outputs": [{"datatype": "BYTES", "data": ["0.9:1:cat", "0.1:0:dog"]}]}).label == 1
    with pytest.raises(AnswerMismatch, match="4 scores"):
        proto.parse({"outputs": [{"datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]})
    with pytest.raises(MalformedAnswer):
        proto.parse({"outputs": [{"datatype": "FP32", "data": [float("nan"), 0.2, 0.3]}]})
    body = proto.request(np.asarray([0.5, 1.0], dtype=np.float32)).body
    assert body["inputs"][0]["shape"] == [1, 2] and body["inputs"][0]["data"] == [0.5, 1.0]
    with pytest.raises(UsageError, match="model name"):
        V2Protocol(url="http://h:1", model_name=None, num_classes=3, input_shape=(2,))


def test_v2_scores_of_several_rows_for_one_input_are_refused_not_flattened():
    """Two 5-class rows answered for the one input sent were flattened into one 10-class answer and read as its
    label (here 4: the first row's top class), a prediction meant for no query."""
    proto = V2Protocol(url="http://h:1", model_name="m", num_classes=10, input_shape=(2,))
    rows = [[0.1, 0.1, 0.1, 0.1, 0.6], [0.2, 0.2, 0.2, 0.2, 0.2]]
    for out in ({"datatype": "FP32", "shape": [2, 5], "data": rows[0] + rows[1]}, {"datatype": "FP32", "data": rows}):
        with pytest.raises(AnswerCountMismatch, match="^the suspect answers 2 rows for one input$"):
            proto.parse({"outputs": [{"name": "p", **out}]})
    one = [0.0] * 9 + [1.0]
    assert proto.parse({"outputs": [{"datatype": "FP32", "shape": [1, 10], "data": [one]}]}).label == 9
    assert proto.parse({"outputs": [{"datatype": "FP32", "shape": [10], "data": one}]}).label == 9


def test_tfserving_parsing_of_literal_nan_tokens():
    proto = TFServingProtocol(url="http://h:1/v1/models/m", model_name=None, num_classes=3, input_shape=(2,))
    assert proto.endpoint == "http://h:1/v1/models/m:predict"
    assert proto.parse(json.loads('{"predictions": [[0.1, 0.8, 0.1]]}')).label == 1
    with pytest.raises(MalformedAnswer, match="NaN"):
        proto.parse(json.loads('{"predictions": [[NaN, Infinity, 0.1]]}'))
    with pytest.raises(MalformedAnswer, match="error"):
        proto.parse({"error": "bad input"})
    # Two rows for the one input sent was read as its first row's answer.
    with pytest.raises(AnswerCountMismatch, match="2 predictions for one input"):
        proto.parse({"predictions": [[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]]})
    with pytest.raises(AnswerCountMismatch, match="2 predictions for one input"):
        proto.parse({"predictions": [{"classes": 1}, {"classes": 2}]})


def test_tfserving_flat_predictions_are_read_by_the_one_instance_sent_and_other_lengths_refused():
    """A flat list of numbers for the one instance sent is its label (one entry) or its row of scores (the key's
    number of entries); any other length was read as scores of another class count, a guess: it is refused naming
    what the server should send."""
    proto = TFServingProtocol(url="http://h:1/v1/models/m", model_name=None, num_classes=3, input_shape=(2,))
    assert proto.request(np.zeros(2, dtype=np.float32)).body == {"instances": [[0.0, 0.0]]}
    assert proto.parse({"predictions": [2]}) == proto.parse({"predictions": [[2]]}) == proto.parse({"predictions": [2.0]})
    assert proto.parse({"predictions": [0.1, 0.7, 0.2]}) == proto.parse({"predictions": [[0.1, 0.7, 0.2]]})
    assert proto.parse({"predictions": [0.1, 0.7, 0.2]}).label == 1
    for flat in ([1, 2], [0.1, 0.2, 0.3, 0.4]):
        message = (f"the suspect answers a flat list of {len(flat)} numbers for one input, neither one label nor the "
                   'key\'s 3 scores; the server should answer {"predictions": [<label>]} or {"predictions": '
                   "[[<3 scores>]]}")
        with pytest.raises(AnswerMismatch, match=f"^{re.escape(message)}$"):
            proto.parse({"predictions": flat})
    with pytest.raises(MalformedAnswer, match="predictions contain a non-number"):
        proto.parse({"predictions": [0.1, [0.7]]})


def test_several_labels_per_input_are_a_runtime_failure(key):
    """A v2 server that answers two integers for one input answers garbage: exit 3, not a usage error."""
    from wmark.errors import RuntimeFailure

    async def meta(_: Request) -> JSONResponse:
        return JSONResponse({"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]}],
                             "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1, 2]}]})

    async def infer(_: Request) -> JSONResponse:
        return JSONResponse({"outputs": [{"name": "label", "datatype": "INT64", "shape": [1, 2], "data": [3, 4]}]})

    app = Starlette(routes=[Route("/v2/models/m", meta), Route("/v2/models/m/infer", infer, methods=["POST"])])
    with serve_in_background(app) as server:
        suspect = open_http_suspect(url=server.url, protocol="v2", model_name="m", num_classes=10, input_shape=SHAPE,
                                    options=HttpOptions(retries=0))
        with pytest.raises(RuntimeFailure, match="2 integers per input instead of one label"):
            suspect.query(generate_triggers(key).inputs.numpy()[:1])
        suspect.close()


def _scripted_app(bodies: list[str]) -> Starlette:
    """A JSON endpoint at /m whose n-th answer is ``bodies[n]`` (raw text, so literal NaN tokens pass)."""
    calls = {"n": 0}

    async def answer(_: Request) -> Response:
        body = bodies[min(calls["n"], len(bodies) - 1)]
        calls["n"] += 1
        return Response(body.encode(), media_type="application/json")

    return Starlette(routes=[Route("/m", answer, methods=["POST"])])


def test_hugging_face_scores_that_cannot_rank_the_labels_are_abstentions():
    """A NaN score was taken as the top (argmax of a NaN), and a label without a score outranked every scored
    one (the first item was taken); both are malformed answers now, as NaN scores already were elsewhere."""
    bodies = ['[[{"label": "LABEL_1", "score": 0.9}, {"label": "LABEL_0", "score": 0.1}]]',
              '[[{"label": "LABEL_1", "score": NaN}, {"label": "LABEL_2", "score": 0.9}]]',
              '[{"label": "LABEL_3", "score": Infinity}, {"label": "LABEL_2", "score": 0.9}]',
              '[{"label": "LABEL_1"}, {"label": "LABEL_2", "score": 0.9}]',
              '[{"label": "LABEL_1", "score": 0.2}, {"label": "LABEL_2", "score": 0.7}]',
              '[{"label": "LABEL_3"}]']
    with serve_in_background(_scripted_app(bodies)) as server:
        suspect = open_http_suspect(url=f"{server.url}/m", protocol="json", template="hf", num_classes=4,
                                    input_shape=(2,), options=HttpOptions(retries=0))
        outcomes = [o for _, o in suspect.stream(np.zeros((len(bodies), 2), dtype=np.float32))]
        suspect.close()
    assert [o.label for o in outcomes] == [1, -1, -1, -1, 2, 3]
    assert [o.status for o in outcomes] == ["ok", "malformed", "malformed", "malformed", "ok", "ok"]
    assert "NaN or infinite" in outcomes[1].error and "NaN or infinite" in outcomes[2].error
    assert "some labels have a 'score' and some have none" in outcomes[3].error


@pytest.mark.parametrize("datatype", ["FP32", "INT64"])
def test_v2_answers_nested_row_major_are_read(key, copy_model, datatype):
    """The v2 protocol allows tensor data nested ([[0.1, ...]]) as well as flat; nested data was read as a list
    where a label belongs, so every answer of such a server was an abstention and nothing could be concluded."""
    async def meta(_: Request) -> JSONResponse:
        return JSONResponse({"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]}],
                             "outputs": [{"name": "y", "datatype": datatype, "shape": [-1, 10]}]})

    async def infer(request: Request) -> JSONResponse:
        x = np.asarray(json.loads(await request.body())["inputs"][0]["data"], dtype=np.float32).reshape(-1, *SHAPE)
        p = _probs(copy_model, x)
        data = p.tolist() if datatype == "FP32" else p.argmax(1)[:, None].tolist()
        return JSONResponse({"outputs": [{"name": "y", "datatype": datatype, "shape": list(np.shape(data)),
                                          "data": data}]})

    app = Starlette(routes=[Route("/v2/models/m", meta), Route("/v2/models/m/infer", infer, methods=["POST"])])
    triggers = generate_triggers(key).inputs.numpy()
    with serve_in_background(app) as server:
        suspect = open_http_suspect(url=server.url, protocol="v2", model_name="m", num_classes=10, input_shape=SHAPE,
                                    options=HttpOptions(retries=0))
        answers = suspect.query(triggers)
        suspect.close()
    np.testing.assert_array_equal(answers.labels, _probs(copy_model, triggers).argmax(1))
    assert (answers.scores is not None) == (datatype == "FP32")
