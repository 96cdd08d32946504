"""What a transcript and a verification are pinned to over HTTP: the model version asked, the JSON template read."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner
from httpkit import Counting, memorising_model
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from wmark.cli import main
from wmark.errors import UsageError
from wmark.keys import generate_key, save_key
from wmark.remote import verify_remote
from wmark.serve import build_app, serve_in_background
from wmark.transcript import Transcript

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def key():
    return generate_key(owner="Test Owner", num_classes=10, input_shape=SHAPE, num_triggers=40)


@pytest.fixture
def key_file(key, tmp_path):
    path = tmp_path / "owner.key"
    save_key(key, path)
    return str(path)


def test_verify_api_asks_the_pinned_model_version_and_refuses_one_the_server_lacks(key, key_file, tmp_path):
    counting = Counting()
    app = build_app(model=memorising_model(key), name="m", num_classes=10, input_shape=SHAPE, labels_only=True,
                    version="2", on_infer=counting)
    runner = CliRunner()
    with serve_in_background(app) as server:
        base = ["verify", "api", "--key", key_file, "--suspect", server.url, "--model-name", "m", "--json"]
        pinned = runner.invoke(main, [*base, "--model-version", "2", "--budget", "5",
                                      "--transcript", str(tmp_path / "t.sqlite")])
        missing = runner.invoke(main, [*base, "--model-version", "3", "--retries", "0"])
    assert pinned.exit_code in (0, 1), pinned.output
    assert json.loads(pinned.output)["tests"][0]["details"]["probe"]["endpoint"] == \
        f"{server.url}/v2/models/m/versions/2/infer"
    assert counting.total == 5
    with pytest.raises(UsageError, match="made for another suspect"):
        Transcript(tmp_path / "t.sqlite", key_commitment=key.commitment(), suspect=f"{server.url}/v2/models/m/infer",
                   protocol="v2")
    assert missing.exit_code == 2
    assert missing.output.strip().endswith("/v2/models/m/versions/3 does not exist on the server (HTTP 404); check "
                                           "the URL, the model name and version.")


def test_a_model_version_is_refused_for_the_json_protocol(key_file):
    out = CliRunner().invoke(main, ["verify", "api", "--key", key_file, "--suspect", "http://127.0.0.1:9/predict",
                                    "--protocol", "json", "--template", "hf", "--model-version", "2"])
    assert out.exit_code == 2
    assert "A model version applies to the v2 and tfserving protocols only; for json put it in the URL." in out.output


def _json_app(asked: list[int]) -> Starlette:
    async def predict(request: Request) -> JSONResponse:
        await request.body()
        asked.append(1)
        return JSONResponse({"label": 1, "other": 2})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


def test_a_transcript_resumes_only_under_the_json_template_its_labels_were_read_with(key, key_file, tmp_path):
    def template(path: str, **extra: object) -> str:
        file = tmp_path / f"{path}.json"
        file.write_text(json.dumps({"request": {"data": "$input"}, "response": [{"label": path}], **extra}))
        return str(file)

    asked: list[int] = []
    transcript = tmp_path / "t.sqlite"
    with serve_in_background(_json_app(asked)) as server:
        run = {"key": key_file, "url": f"{server.url}/predict", "protocol": "json", "max_queries": 3,
               "transcript": transcript}
        verify_remote(template=template("label"), **run)
        sent = len(asked)
        # headers (a credential, say) change neither the question nor the label read: the transcript resumes
        verify_remote(template=template("label", headers={"X-Api-Key": "hunter2-secret"}), **run)
        with pytest.raises(UsageError, match=r"holds answers read under another JSON template; resume it with the "
                                             r"template it was made with, or give a new transcript path\.$"):
            verify_remote(template=template("other"), **run)
    assert sent == 3 and len(asked) == 3  # the resume reused every answer, the refusal sent nothing
    assert b"hunter2-secret" not in transcript.read_bytes()


def test_a_transcript_an_older_wmark_wrote_without_a_template_is_bound_to_the_next_runs(key, tmp_path):
    path = tmp_path / "old.sqlite"
    common = {"key_commitment": key.commitment(), "suspect": "http://127.0.0.1:9/predict", "protocol": "json"}
    Transcript(path, template="sha256:aa", **common).close()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM meta WHERE name = 'template'")
    Transcript(path, template="sha256:bb", **common).close()
    with pytest.raises(UsageError, match="another JSON template"):
        Transcript(path, template="sha256:aa", **common)
