"""Evidence reports: self-contained HTML and JSON twin, every section present, no secret inside."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
from httpkit import independent_model, memorising_model

from wmark import api
from wmark.keys import generate_key, save_key
from wmark.report import json_twin, write_report
from wmark.schemes.trigger_set import generate_triggers
from wmark.serve import build_app, serve_in_background
from wmark.suspects import LocalSuspect
from wmark.transcript import transcript_digest
from wmark.verify import verify_blackbox

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def key_and_path(tmp_path_factory):
    key = generate_key(owner="ACME <Corp> & Sons", num_classes=10, input_shape=SHAPE, num_triggers=40)
    path = tmp_path_factory.mktemp("k") / "owner.key"
    save_key(key, path)
    return key, path


def test_report_over_http_has_every_section_and_no_secret(key_and_path, tmp_path):
    key, key_path = key_and_path
    app = build_app(model=memorising_model(key), name="m", num_classes=10, input_shape=SHAPE, labels_only=True)
    report = tmp_path / "evidence.html"
    transcript = tmp_path / "t.sqlite"
    with serve_in_background(app) as server:
        verdict = api.verify_remote(key=key_path, url=server.url, model_name="m", transcript=transcript,
                                    report=report)
    page = report.read_text()
    doc = json.loads(json_twin(report).read_text())
    assert verdict.detected and doc["verdict"]["decision"] == "detected"
    for needle in ("The claim", "key commitment, and how to check it", key.commitment(), "Null hypothesis",
                   "log10 p-value", "alpha", "Transcript", transcript_digest(transcript), "Software and seeds",
                   "torch", "load_key('KEY_FILE').commitment()"):
        assert needle in page, needle
    assert "ACME &lt;Corp&gt; &amp; Sons" in page and "<Corp>" not in page
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG")
    assert not re.search(r"""(src|href)=['"]https?://""", page), "the page must be self-contained"
    assert doc["transcript"]["sha256_chain"] == transcript_digest(transcript)
    assert doc["key"]["commitment"] == key.commitment()
    assert doc["verdict"]["tests"][0]["trajectory"] and doc["verdict"]["queries"] <= 20
    secret = key.secret.hex()
    labels = "".join(map(str, generate_triggers(key).labels.tolist()))
    for text in (page, json_twin(report).read_text()):
        assert secret not in text and secret.upper() not in text
        assert labels not in text


def test_fixed_mode_report_explains_there_is_no_curve(key_and_path, tmp_path):
    key, _ = key_and_path
    suspect = LocalSuspect(independent_model(key), input_shape=SHAPE, description="innocent.safetensors",
                           expose_scores=False)
    verdict = verify_blackbox(key=key, suspect=suspect, mode="fixed", max_queries=10)
    doc = write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert doc["verdict"]["status"] == "inconclusive"
    assert "Inconclusive." in page and "fixed-size test" in page and "No transcript" in page
    assert json_twin(tmp_path / "r.html") == tmp_path / "r.json"


def _verify_file_with_report(key_path, directory, report):
    """``wmark verify file`` of an untrained suspect saved in ``directory``, with ``--report report``."""
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.io import save_model
    from wmark.models import build_model

    model = build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=0)
    weights = directory / "s.safetensors"
    save_model(model, weights, metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    return CliRunner().invoke(main, ["verify", "file", "--key", str(key_path), "--arch", "fmnist-mlp", "--suspect",
                                     str(weights), "--report", str(report)])


def test_cli_verify_file_suspect_writes_a_report(key_and_path, tmp_path):
    result = _verify_file_with_report(key_and_path[1], tmp_path, tmp_path / "r.html")
    assert result.exit_code == 1, result.output
    assert "not detected" in (tmp_path / "r.html").read_text().lower()


def test_a_report_path_named_json_holds_the_json_and_rechecks(key_and_path, tmp_path):
    # `--report evidence.json` used to put the HTML page in evidence.json, which recheck then called tampered
    from wmark.recheck import recheck

    _, key_path = key_and_path
    result = _verify_file_with_report(key_path, tmp_path, tmp_path / "evidence.json")
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.html", "evidence.json", "s.safetensors"]
    assert json.loads((tmp_path / "evidence.json").read_text())["format"] == "wmark-evidence/1"
    assert "not detected" in (tmp_path / "evidence.html").read_text().lower()
    outcome = recheck(report=tmp_path / "evidence.json", key=key_path)
    assert outcome.status == "same" and outcome.recomputed["decision"] == "not_detected"


@pytest.mark.parametrize("target", ["suspect", "key"])
def test_a_report_over_a_file_the_command_reads_is_refused_before_work(key_and_path, tmp_path, target):
    # `--report` naming the suspect overwrote the stolen model, the evidence itself, with the HTML page
    from click.testing import CliRunner

    from wmark.cli import main
    from wmark.io import save_model
    from wmark.models import build_model

    _, key_path = key_and_path
    weights = tmp_path / "s.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=0), weights,
               metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    path = weights if target == "suspect" else key_path
    before = path.read_bytes()
    result = CliRunner().invoke(main, ["verify", "file", "--key", str(key_path), "--arch", "fmnist-mlp", "--suspect",
                                       str(weights), "--report", str(path)])
    assert result.exit_code == 2, result.output
    assert "choose another" in result.stderr and "Traceback" not in result.output
    assert path.read_bytes() == before and not path.with_name(path.name + ".json").exists()


def test_the_probe_details_are_reported_whichever_test_gives_the_verdict(key_and_path):
    """An HTTP run records its probe on the first test; when a weighted test (the log test's weight is 8) gives
    the verdict's p-value, the report looked for the probe on that test and left it out."""
    from wmark.evidence import TestResult
    from wmark.report import report_document
    from wmark.verify import decide

    key, _ = key_and_path
    probe = {"protocol": "json", "endpoint": "http://127.0.0.1:9/m", "options": {"cover_data": "digits"}}
    tests = [TestResult(name="trigger-set", evidence_of="copy", null={"p": 0.1}, log10_p=-5.0, queries=40,
                        matches=9, details={"probe": probe}),
             TestResult(name="api-tiebreak-log", evidence_of="extracted", null={"z": "N(0, 1)"}, log10_p=-4.95,
                        queries=1000, matches=0, weight=8.0),
             TestResult(name="api-tiebreak", evidence_of="extracted", null={"z": "N(0, 1)"}, log10_p=0.0,
                        queries=1000, matches=0)]
    verdict = decide(key=key, tests=tests, alpha=10 ** -4.8, suspect="http://127.0.0.1:9/m")
    assert verdict.primary is tests[1] and verdict.kind == "extracted"
    doc = report_document(verdict=verdict, key=key)
    assert doc["suspect"]["probe"] == probe
    assert doc["seeds"]["cover_traffic"].startswith("derived from the key's secret")


def _page(key, *, log10_p, alpha, suspect="http://127.0.0.1:9/m"):
    from wmark.evidence import TestResult
    from wmark.report import render_html, report_document
    from wmark.verify import decide

    tests = [TestResult(name="trigger-set", evidence_of="copy", null={"p0": 0.1}, log10_p=log10_p, queries=40,
                        matches=9)]
    verdict = decide(key=key, tests=tests, alpha=alpha, suspect=suspect)
    return verdict, render_html(report_document(verdict=verdict, key=key), plot_png=None)


@pytest.mark.parametrize("log10_p, alpha, shown_log10, shown_p", [
    (-2.996, 1e-3, "-2.996", "0.001009"),
    (-1.99999, 1e-2, "-1.99999", "0.0100002"),
    (-1.3005, 0.05, "-1.30", "0.05006"),
    (-5.00001, 1e-3, "-5.00", "1.00 &times; 10<sup>-5</sup>"),
    (float("-inf"), 1e-3, "below -300", "below 10<sup>-300</sup>"),
])
def test_log10_p_and_p_are_never_rounded_across_alpha(key_and_path, log10_p, alpha, shown_log10, shown_p):
    """A log10 p of -2.996 (not detected at alpha = 10^-3) was shown as -3.00 beside alpha's -3.0, p = 0.01 - 1e-7
    as 0.01, a p of 1e-5 as 10.00 x 10^-6, and -inf as a 300-digit number."""
    verdict, page = _page(key_and_path[0], log10_p=log10_p, alpha=alpha)
    assert verdict.detected == (log10_p <= math.log10(alpha))
    assert f"<tr><th>log10 p-value</th><td>{shown_log10}</td>" in page
    assert f"<tr><th>p-value</th><td>{shown_p}</td>" in page
    assert f"(log10 = {math.log10(alpha):.6g})" in page


def test_every_field_a_suspect_api_or_a_name_can_hold_is_escaped(key_and_path):
    """The probe's query and HTTP counts were interpolated raw: a transcript or server that put markup there
    reached the page as markup."""
    from wmark.evidence import TestResult
    from wmark.report import render_html, report_document
    from wmark.verify import decide

    bad = "<script>alert(1)</script>\"'onload=x</pre>"
    probe = {"protocol": bad, "endpoint": bad, "options": {"token": bad},
             "server": {"model": bad, "outputs": [{"name": bad, "datatype": bad, "shape": bad}], "note": bad,
                        "input_from": "key"},
             "sent": {"trigger": bad, "cover": bad}, "reused": {"trigger": bad, "cover": bad},
             "http": {"requests": bad, "retries": bad}}
    provenance = {k: bad for k in ("model", "signer", "signer_kind", "signed_at", "signed_at_is")}
    tests = [TestResult(name=bad, evidence_of=bad, null={"p0": 0.1, "distribution": bad, "why": bad,
                                                         "assumption": bad},
                        log10_p=-5.0, queries=40, matches=9, details={"probe": probe, "mode": bad,
                                                                       "provenance": provenance}),
             TestResult(name=bad, evidence_of=bad, null={}, log10_p=-1.0, queries=40, matches=0)]
    verdict = decide(key=key_and_path[0], tests=tests, alpha=1e-3, suspect=bad)
    page = render_html(report_document(verdict=verdict, key=key_and_path[0]), plot_png=None)
    for raw in ("<script", "</pre>", "\"'onload"):
        assert raw not in page, raw
    assert page.count("&lt;script&gt;") >= 20


def test_a_suspect_file_name_that_is_not_utf8_is_written_as_its_escape(key_and_path, tmp_path):
    """A suspect whose file name is not UTF-8 (a lone surrogate in Python) failed the report with a
    UnicodeEncodeError after the whole verification had run."""
    from wmark.evidence import TestResult
    from wmark.verify import decide

    key = key_and_path[0]
    tests = [TestResult(name="trigger-set", evidence_of="copy", null={"p0": 0.1}, log10_p=-5.0, queries=40,
                        matches=9)]
    verdict = decide(key=key, tests=tests, alpha=1e-3, suspect=str(tmp_path / "m\udcff.safetensors"))
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    assert "m\\udcff.safetensors" in (tmp_path / "r.html").read_text(encoding="utf-8")
    assert json.loads(json_twin(tmp_path / "r.html").read_text())["suspect"]["description"].endswith("m\udcff.safetensors")
