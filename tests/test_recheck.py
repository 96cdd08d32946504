"""Re-checking verdicts from the revealed key and the recorded answers: same verdict, tampering detected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from clikit import run
from keykit import seeded_key
from sigkit import memorised_mlp, save_marked, signing_pair

from wmark import api
from wmark.io import save_model
from wmark.keys import save_key
from wmark.models import build_model, model_metadata
from wmark.recheck import recheck
from wmark.report import write_report
from wmark.signing import EvidenceError, sign_file
from wmark.verify import TestResult, decide, trigger_set_test

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A key file, a copy that memorised it and an independent model, as safetensors files."""
    d = tmp_path_factory.mktemp("recheck")
    key = seeded_key("recheck", input_shape=SHAPE, num_triggers=40)
    save_key(key, d / "owner.key")
    save_marked(memorised_mlp(key), key, d / "copy.safetensors")
    independent = build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=7)
    save_model(independent, d / "independent.safetensors",
               metadata=model_metadata(arch="fmnist-mlp", num_classes=10, input_shape=SHAPE))
    return key, d


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("suspect,mode,expected", [("copy", "sequential", "detected"), ("copy", "fixed", "detected"),
                                                   ("independent", "sequential", "not_detected"),
                                                   ("independent", "fixed", "not_detected")])
def test_a_file_verdict_is_recomputed_exactly_from_the_key_and_the_report(files, tmp_path, suspect, mode, expected):
    key, d = files
    verdict = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / f"{suspect}.safetensors", mode=mode)
    assert verdict.decision == expected
    doc = api.write_report(verdict=verdict, key=d / "owner.key", path=tmp_path / "r.html")
    answers = doc["verdict"]["tests"][0]["details"]["answers"]
    assert len(answers["labels"]) == verdict.tests[0].queries and doc["suspect"]["file"]["sha256"]
    assert key.secret.hex() not in (tmp_path / "r.json").read_text()
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key")
    assert outcome.status == "same" and outcome.exit_code == 0
    assert outcome.recomputed["decision"] == expected
    assert abs(outcome.recomputed["log10_p"] - verdict.log10_p) <= 1e-9
    assert outcome.tests[0]["queries"] == verdict.tests[0].queries


def test_recheck_in_a_fresh_process_gives_the_same_verdict(files, tmp_path):
    _, d = files
    code, _ = run("verify", "file", "--key", str(d / "owner.key"), "--arch", "fmnist-mlp", "--suspect",
                  str(d / "copy.safetensors"), "--report", str(tmp_path / "r.html"))
    assert code == 0
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "wmark.cli", "recheck", "--report", str(tmp_path / "r.json"),
                           "--key", str(d / "owner.key"), "--json"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    report = json.loads((tmp_path / "r.json").read_text())
    assert doc["status"] == "same" and doc["recomputed"]["decision"] == "detected"
    assert abs(doc["recomputed"]["log10_p"] - report["verdict"]["log10_p"]) <= 1e-9


def test_a_flipped_byte_or_an_edited_report_is_tampering(files, tmp_path):
    key, d = files
    verdict = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / "copy.safetensors", mode="fixed")
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    report = tmp_path / "r.json"
    original = report.read_bytes()
    for offset in range(0, len(original), max(1, len(original) // 25)):
        _flip(report, offset)
        with pytest.raises(EvidenceError, match="altered|edited|not a wmark"):
            recheck(report=report, key=d / "owner.key")
        report.write_bytes(original)
        code, _ = run("recheck", "--report", str(report), "--key", str(d / "owner.key"))
        assert code == 0
    # A forger who edits the answers and recomputes the content digest gets a different verdict, not the same one
    # (and, in sequential mode, a record missing the answers the key makes the verifier ask: tampered).
    from wmark.recheck import canonical_sha256

    doc = json.loads(original)
    labels = doc["verdict"]["tests"][0]["details"]["answers"]["labels"]
    doc["verdict"]["tests"][0]["details"]["answers"]["labels"] = [(v + 1) % 10 for v in labels]
    doc["integrity"].pop("content_sha256")
    doc["integrity"]["content_sha256"] = canonical_sha256(doc)
    report.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    outcome = recheck(report=report, key=d / "owner.key")
    assert outcome.status == "different" and outcome.exit_code == 1


@pytest.mark.parametrize("where,value", [((), {"verdict": []}), (("verdict",), {"alpha": "x"}),
                                         (("verdict", "tests", 0), {"queries": None}),
                                         (("verdict", "tests", 0, "details"), {"budget": "x"}),
                                         (("verdict", "tests", 0, "details", "answers"), {"labels": 5}),
                                         (("verdict", "tests", 0, "details", "answers"), {"labels": [None]}),
                                         (("verdict", "tests", 0, "details"), {"answers": []}), ((), {"key": []})])
def test_a_re_digested_report_with_fields_of_the_wrong_type_is_refused_in_one_sentence(files, tmp_path, where, value):
    # these crashed recheck with "unexpected TypeError/AttributeError" (exit 3) instead of calling the report edited
    from wmark.recheck import canonical_sha256

    key, d = files
    verdict = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / "copy.safetensors", mode="fixed")
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    report = tmp_path / "r.json"
    doc = json.loads(report.read_text())
    node = doc
    for step in where:
        node = node[step]
    node.update(value)
    doc["integrity"].pop("content_sha256")
    doc["integrity"]["content_sha256"] = canonical_sha256(doc)
    report.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with pytest.raises(EvidenceError, match="lacks fields wmark writes or holds them with the wrong type"):
        recheck(report=report, key=d / "owner.key")
    code, _ = run("recheck", "--report", str(report), "--key", str(d / "owner.key"))
    assert code == 2


def _redigest(report, edit) -> None:
    """Edit a report's JSON and recompute its content digest, as anyone (not only its author) can."""
    from wmark.recheck import canonical_sha256

    doc = json.loads(report.read_text())
    edit(doc)
    doc["integrity"].pop("content_sha256")
    doc["integrity"]["content_sha256"] = canonical_sha256(doc)
    report.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("edit", [lambda doc: doc["verdict"].update(owner="Someone Else"),
                                  lambda doc: doc["key"]["public"].update(owner="Someone Else"),
                                  lambda doc: doc["key"]["public"].update(num_classes=2),
                                  lambda doc: doc["key"].update(fingerprint="0" * 16)])
def test_a_report_showing_another_owner_or_key_parameters_than_the_committed_key_is_tampering(files, tmp_path, edit):
    # recheck compared only the commitment string, so these edits (the claimant, the chance level 1/C the page
    # explains) passed as the "same" verdict
    key, d = files
    verdict = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / "copy.safetensors", mode="fixed")
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    _redigest(tmp_path / "r.json", edit)
    with pytest.raises(EvidenceError, match="shows another owner, fingerprint or public parameters than the revealed key"):
        recheck(report=tmp_path / "r.json", key=d / "owner.key")


@pytest.mark.parametrize("edit,field", [
    (lambda doc: doc["verdict"].update(status="inconclusive"), "status"),
    (lambda doc: doc["verdict"].update(kind="extracted"), "kind"),
    (lambda doc: doc["verdict"]["tests"][0].update(matches=3), "tests[0].matches"),
    (lambda doc: doc["verdict"]["tests"][0].update(queries=400), "tests[0].queries"),
    (lambda doc: doc["verdict"]["tests"][0]["null"].update(p0=0.5), "tests[0].null"),
    (lambda doc: doc["verdict"].update(matches=39, queries=400), "queries, matches"),
    (lambda doc: doc["verdict"].update(p_value=0.5), "p_value"),
    (lambda doc: doc["verdict"]["tests"][0].update(trajectory=[1.0, 20.0]), "tests[0].trajectory"),
])
def test_a_report_whose_stated_counts_or_status_differ_from_the_recomputed_verdict_is_different(files, tmp_path, edit,
                                                                                                field):
    # only the decision and log10 p were compared: a report edited to show other counts, another null, p-value or
    # evidence curve, or an inconclusive status, rechecked as the "same" verdict
    key, d = files
    verdict = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / "independent.safetensors")
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    _redigest(tmp_path / "r.json", edit)
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key")
    assert outcome.status == "different" and outcome.exit_code == 1
    assert f"differs from the report in {field}, though its decision and log10 p are the same" in outcome.message


def test_a_signed_report_must_verify_and_another_key_is_refused(files, tmp_path):
    key, d = files
    private, public = signing_pair(tmp_path)
    verdict = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / "independent.safetensors")
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    sign_file(path=tmp_path / "r.json", private_key=private)
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key", signer_key=public)
    assert outcome.status == "same" and any("signature" in c for c in outcome.checks)
    other = seeded_key("someone else", input_shape=SHAPE, num_triggers=40)
    save_key(other, tmp_path / "other.key")
    code, _ = run("recheck", "--report", str(tmp_path / "r.json"), "--key", str(tmp_path / "other.key"))
    assert code == 2
    # Re-signed by an intruder: the owner's public key no longer verifies the report.
    intruder, _ = signing_pair(tmp_path, "intruder")
    sign_file(path=tmp_path / "r.json", private_key=intruder)
    code, _ = run("recheck", "--report", str(tmp_path / "r.json"), "--key", str(d / "owner.key"),
                  "--signer-key", str(public))
    assert code == 2


def test_an_api_verdict_is_recomputed_from_its_transcript_and_a_flipped_byte_fails(files, tmp_path):
    from httpkit import memorising_model

    from wmark.serve import build_app, serve_in_background

    key, d = files
    app = build_app(model=memorising_model(key, keep=0.7), name="m", num_classes=10, input_shape=SHAPE,
                    labels_only=True)
    with serve_in_background(app) as server:
        verdict = api.verify_remote(key=d / "owner.key", url=server.url, model_name="m", concurrency=4,
                                    transcript=tmp_path / "t.sqlite", report=tmp_path / "r.html")
    assert verdict.decision == "detected"
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key", transcript=tmp_path / "t.sqlite")
    assert outcome.status == "same" and abs(outcome.recomputed["log10_p"] - verdict.log10_p) <= 1e-9
    assert "transcript digest and file SHA-256" in outcome.checks
    transcript = tmp_path / "t.sqlite"
    original = transcript.read_bytes()
    for offset in (100, len(original) // 2, len(original) - 10):
        _flip(transcript, offset)
        with pytest.raises(EvidenceError, match="transcript"):
            recheck(report=tmp_path / "r.json", key=d / "owner.key", transcript=transcript)
        transcript.write_bytes(original)
    code, out = run("recheck", "--report", str(tmp_path / "r.json"), "--key", str(d / "owner.key"),
                    "--transcript", str(transcript))
    assert code == 0 and "Same verdict" in out


def test_a_report_whose_test_is_not_the_plan_its_transcript_was_bound_to_is_refused(files, tmp_path):
    # a fixed-n test cut to 10 queries after the transcript's 20 answers were seen (the budget-10 report, passed off
    # as a reading of the budget-20 transcript) recomputed the same from the key and the answers: now refused
    from httpkit import memorising_model

    from wmark.serve import build_app, serve_in_background

    key, d = files
    app = build_app(model=memorising_model(key, keep=0.3), name="m", num_classes=10, input_shape=SHAPE,
                    labels_only=True)
    with serve_in_background(app) as server:
        for budget in (20, 10):
            api.verify_remote(key=d / "owner.key", url=server.url, model_name="m", mode="fixed", max_queries=budget,
                              transcript=tmp_path / f"t{budget}.sqlite", report=tmp_path / f"r{budget}.html")
    assert recheck(report=tmp_path / "r10.json", key=d / "owner.key").status == "same"
    bound = json.loads((tmp_path / "r20.json").read_text())["transcript"]

    def swap(doc):
        doc["transcript"] = bound
        doc["suspect"]["transcript_sha256_chain"] = bound["sha256_chain"]
        doc["verdict"]["tests"][0]["details"]["transcript"] = {k: v for k, v in bound.items() if k != "file_sha256"}

    _redigest(tmp_path / "r10.json", swap)
    with pytest.raises(EvidenceError, match=r"r10.json gives the test 'fixed-n trigger-set of 10 queries at alpha "
                                            r"1e-06', but the transcript t20.sqlite holds answers for the test plan "
                                            r"'fixed-n trigger-set of 20 queries at alpha 1e-06': its answers would be "
                                            "read under another test than the one they were gathered for"):
        recheck(report=tmp_path / "r10.json", key=d / "owner.key")
    assert recheck(report=tmp_path / "r20.json", key=d / "owner.key").status == "same"


def test_a_transcript_whose_path_has_uri_characters_is_read_and_left_alone(files, tmp_path):
    # the path went into an SQLite URI as is: "#" and "?" ended it, so another file was opened (and created, read-write:
    # the read-only mode was lost with the rest of the URI) and the genuine transcript was called altered or truncated
    from httpkit import memorising_model

    from wmark.serve import build_app, serve_in_background

    _, d = files
    folder = tmp_path / "run #1?%20"
    folder.mkdir()
    app = build_app(model=memorising_model(files[0], keep=0.7), name="m", num_classes=10, input_shape=SHAPE,
                    labels_only=True)
    with serve_in_background(app) as server:
        api.verify_remote(key=d / "owner.key", url=server.url, model_name="m", transcript=folder / "t.sqlite",
                          report=folder / "r.html")
    outcome = recheck(report=folder / "r.json", key=d / "owner.key", transcript=folder / "t.sqlite")
    assert outcome.status == "same", outcome.message
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_a_test_that_cannot_be_recomputed_is_named_and_the_verdict_not_confirmed(files, tmp_path):
    from wmark.recheck import RecordingSuspect
    from wmark.suspects import LocalSuspect

    key, _d = files
    suspect = RecordingSuspect(LocalSuspect(memorised_mlp(key), input_shape=SHAPE))
    trig = trigger_set_test(key=key, suspect=suspect, share=0.5)
    other = TestResult(name="api-tiebreak-log", evidence_of="extracted", null={"p0": 0.5}, log10_p=-1.0, queries=10,
                       matches=8)
    verdict = suspect.attach(decide(key=key, tests=[trig, other], alpha=1e-6, suspect="local"))
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    assert "not re-checkable here" in (tmp_path / "r.html").read_text()
    outcome = recheck(report=tmp_path / "r.json", key=key)
    assert outcome.status == "partial" and outcome.exit_code == 1 and "api-tiebreak-log" in outcome.message
    assert [t["rechecked"] for t in outcome.tests] == [True, False]


def test_a_report_without_recorded_answers_is_not_confirmed_rather_than_called_tampered(files, tmp_path):
    from wmark.suspects import LocalSuspect
    from wmark.verify import verify_blackbox

    key, _ = files
    verdict = verify_blackbox(key=key, suspect=LocalSuspect(memorised_mlp(key), input_shape=SHAPE))
    write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    outcome = recheck(report=tmp_path / "r.json", key=key)
    assert outcome.status == "partial" and "neither its answers nor a transcript" in outcome.tests[0]["note"]


def test_a_transcript_or_owner_files_the_report_does_not_use_are_refused(files, tmp_path):
    """`wmark recheck --transcript T` on a model-file report, or `--rule R --served S` on one without a tie-break
    test, was ignored in silence (exit 0), as if T, R and S had been checked."""
    from wmark.errors import UsageError

    _, d = files
    verdict = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / "copy.safetensors")
    api.write_report(verdict=verdict, key=d / "owner.key", path=tmp_path / "r.html")
    with pytest.raises(UsageError, match=r"r\.json names no transcript \(it records the answers itself\), so a "
                                         r"transcript does not apply; drop --transcript\.$"):
        recheck(report=tmp_path / "r.json", key=d / "owner.key", transcript=tmp_path / "t.sqlite")
    with pytest.raises(UsageError, match=r"has no tie-break test, so its rule and served model files do not apply"):
        recheck(report=tmp_path / "r.json", key=d / "owner.key", owner_files={"rule": tmp_path / "rule.safetensors"})
    code, _ = run("recheck", "--report", str(tmp_path / "r.json"), "--key", str(d / "owner.key"), "--served",
                  str(d / "copy.safetensors"))
    assert code == 2


def _tiebreak_verdict(files, tmp_path, *, labels_only: bool):
    """A verdict with the committed-input tie-break test on an independent model, its rule and its re-check."""
    key, d = files
    rule = tmp_path / "rule.safetensors"
    api.build_tiebreak(key=d / "owner.key", arch="fmnist-mlp", weights=d / "copy.safetensors", data="digits",
                       out=rule, references=[], verify_count=150)
    verdict = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / "independent.safetensors", mode="fixed",
                         rule=rule, rule_queries=150, labels_only=labels_only)
    assert [t.name for t in verdict.tests] == ["trigger-set", "api-tiebreak"]
    doc = write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
    assert doc["recheck"]["tests"]["api-tiebreak"].startswith("recomputed")
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key")
    assert outcome.status == "same" and [t["rechecked"] for t in outcome.tests] == [True, True]
    assert abs(outcome.tests[1]["recomputed_log10_p"] - verdict.tests[1].log10_p) <= 1e-9
    return verdict, rule


def test_the_tiebreak_test_on_committed_inputs_is_recomputed_with_the_owners_rule_and_served_model(files, tmp_path):
    _, d = files
    _, rule = _tiebreak_verdict(files, tmp_path, labels_only=True)
    moved = tmp_path / "moved-rule.safetensors"
    rule.rename(moved)
    assert recheck(report=tmp_path / "r.json", key=d / "owner.key", owner_files={"rule": moved}).status == "same"
    _flip(moved, -5)
    with pytest.raises(EvidenceError, match="rule file .* is not the one the report names"):
        recheck(report=tmp_path / "r.json", key=d / "owner.key", owner_files={"rule": moved})


def test_a_tiebreak_test_that_read_the_suspects_probabilities_is_recomputed_from_the_recorded_scores(files, tmp_path):
    _, d = files
    verdict, rule = _tiebreak_verdict(files, tmp_path, labels_only=False)
    assert verdict.tests[1].details["read"].startswith("probabilities")
    labels_only = api.verify(key=d / "owner.key", arch="fmnist-mlp", suspect=d / "independent.safetensors",
                             mode="fixed", rule=rule, rule_queries=150)
    assert labels_only.tests[1].log10_p != verdict.tests[1].log10_p  # the scores, not the labels, were replayed


def test_an_api_verdict_with_the_tiebreak_test_is_recomputed_from_its_transcript(files, tmp_path):
    _key, d = files
    verdict = _tiebreak_run(files, tmp_path, served="independent", queries=120)
    assert [t.name for t in verdict.tests] == ["trigger-set", "api-tiebreak"]
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key", transcript=tmp_path / "t.sqlite")
    assert outcome.status == "same" and [t["rechecked"] for t in outcome.tests] == [True, True]
    assert abs(outcome.recomputed["log10_p"] - verdict.log10_p) <= 1e-9


def _tiebreak_run(files, tmp_path, *, served: str, queries: int):
    """A fixed-n trigger-set and tie-break run (a rule built on the copy, ``queries`` committed inputs) against the
    label-only API serving ``served``, with its transcript t.sqlite and report r.json; returns the verdict."""
    from wmark.models import load_model
    from wmark.serve import build_app, serve_in_background

    _key, d = files
    rule = tmp_path / "rule.safetensors"
    api.build_tiebreak(key=d / "owner.key", arch="fmnist-mlp", weights=d / "copy.safetensors", data="digits",
                       out=rule, references=[], verify_count=queries)
    model, _ = load_model("fmnist-mlp", d / f"{served}.safetensors")
    app = build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, labels_only=True)
    with serve_in_background(app) as server:
        return api.verify_remote(key=d / "owner.key", url=server.url, model_name="m", mode="fixed", rule=rule,
                                 rule_queries=queries, transcript=tmp_path / "t.sqlite", report=tmp_path / "r.html")


def _two_test_transcript(files, tmp_path):
    """A fixed-n trigger-set and tie-break run on a copy; the path of its report r.json (transcript t.sqlite)."""
    _tiebreak_run(files, tmp_path, served="copy", queries=60)
    return tmp_path / "r.json"


def _rewrite_verdict(doc, key, tests):
    """Give a report's verdict ``tests`` (as dicts) with the decision, p-values and counts they recompute to."""
    from wmark.recheck import _test_from_dict

    again = decide(key=key, tests=[_test_from_dict(t) for t in tests], alpha=doc["verdict"]["alpha"],
                   suspect=doc["verdict"]["suspect"])
    new = json.loads(json.dumps(again.to_dict()))
    doc["verdict"].update({k: v for k, v in new.items() if k != "tests"})
    for test, redone in zip(tests, new["tests"]):
        test["adjusted_log10_p"] = redone.get("adjusted_log10_p", redone["log10_p"])
    doc["verdict"]["tests"] = tests


def test_a_report_dropping_a_test_its_transcript_was_bound_to_is_refused(files, tmp_path):
    # the report of a trigger-set and tie-break run, re-written to show the trigger-set test alone (Holm over one
    # test instead of two halves its p-value), recomputed the same from the key and the transcript
    key, d = files
    report = _two_test_transcript(files, tmp_path)
    _redigest(report, lambda doc: _rewrite_verdict(doc, key, doc["verdict"]["tests"][:1]))
    with pytest.raises(EvidenceError, match=r"r.json gives the tests 'trigger-set', but the transcript t.sqlite holds "
                                            r"answers for the test plan 'fixed-n trigger-set of .* and fixed-n "
                                            r"api-tiebreak of 60 queries at alpha 1e-06': a test left out of the report"):
        recheck(report=report, key=d / "owner.key")


def test_a_report_reweighting_the_tests_its_transcript_was_bound_to_is_refused(files, tmp_path):
    # the trigger-set test given weight 9 of 10 (its adjusted p-value 10/9 of its own instead of twice it) was
    # recomputed with the report's own weights, the same
    key, d = files
    report = _two_test_transcript(files, tmp_path)
    assert recheck(report=report, key=d / "owner.key").status == "same"

    def reweigh(doc):
        tests = doc["verdict"]["tests"]
        tests[0]["weight"] = 9.0
        _rewrite_verdict(doc, key, tests)

    _redigest(report, reweigh)
    with pytest.raises(EvidenceError, match=r"r.json gives the test 'fixed-n trigger-set of weight 9 of 40 queries at "
                                            r"alpha 1e-06', but the transcript t.sqlite holds answers for the test "
                                            r"plan 'fixed-n trigger-set of 40 queries and fixed-n api-tiebreak of 60 "
                                            r"queries at alpha 1e-06'"):
        recheck(report=report, key=d / "owner.key")


def _api_runs(files, tmp_path, **runs):
    """Sequential runs of verify_remote on a weak copy, one transcript t{name}.sqlite and report r{name}.json each,
    with the keyword arguments given per name."""
    from httpkit import memorising_model

    from wmark.serve import build_app, serve_in_background

    key, d = files
    app = build_app(model=memorising_model(key, keep=0.3), name="m", num_classes=10, input_shape=SHAPE,
                    labels_only=True)
    with serve_in_background(app) as server:
        for name, kwargs in runs.items():
            api.verify_remote(key=d / "owner.key", url=server.url, model_name="m", transcript=tmp_path / f"t{name}.sqlite",
                              report=tmp_path / f"r{name}.html", **kwargs)


def _point_at(transcript):
    """An edit giving a report the transcript summary (and digests) of ``transcript`` as it is now."""
    from wmark.signing import file_sha256
    from wmark.transcript import transcript_digest

    def edit(doc):
        bound = dict(doc["transcript"], path=str(transcript), sha256_chain=transcript_digest(transcript),
                     file_sha256=file_sha256(transcript))
        doc["transcript"] = bound
        doc["suspect"]["transcript_sha256_chain"] = bound["sha256_chain"]
        doc["verdict"]["tests"][0]["details"]["transcript"] = {k: v for k, v in bound.items() if k != "file_sha256"}

    return edit


def test_a_sequential_report_restated_at_another_alpha_than_its_transcript_was_run_at_is_refused(files, tmp_path):
    # the plan bound alpha only when a test was fixed-n: the report of a sequential run at alpha 0.01, passed off as
    # a reading of the transcript run at 1e-6 (its first answers the same), recomputed the same from the key
    _key, d = files
    _api_runs(files, tmp_path, strict={"alpha": 1e-6}, loose={"alpha": 1e-2})
    assert recheck(report=tmp_path / "rloose.json", key=d / "owner.key").status == "same"
    _redigest(tmp_path / "rloose.json", _point_at(tmp_path / "tstrict.sqlite"))
    with pytest.raises(EvidenceError, match=r"rloose.json gives the test 'sequential trigger-set at alpha 0.01', but "
                                            r"the transcript tstrict.sqlite holds answers for the test plan 'sequential "
                                            r"trigger-set at alpha 1e-06': its answers would be read under another "
                                            "test than the one they were gathered for"):
        recheck(report=tmp_path / "rloose.json", key=d / "owner.key")
    assert recheck(report=tmp_path / "rstrict.json", key=d / "owner.key").status == "same"


def test_a_sequential_report_whose_share_of_alpha_was_edited_is_refused(files, tmp_path):
    # the replay stopped where the report's own alpha_share said, so an edited share was recomputed as it stated
    _key, d = files
    _api_runs(files, tmp_path, run={})
    report = tmp_path / "rrun.json"
    _redigest(report, lambda doc: doc["verdict"]["tests"][0]["details"].update(alpha_share=0.01))
    with pytest.raises(EvidenceError, match=r"rrun.json gives the sequential trigger-set test a share of alpha of "
                                            r"0.01, but its tests' weights give it 1: it was edited"):
        recheck(report=report, key=d / "owner.key")


def test_a_sequential_transcript_whose_older_plan_bound_no_alpha_is_still_rechecked(files, tmp_path):
    import sqlite3

    _key, d = files
    _api_runs(files, tmp_path, run={})
    transcript = tmp_path / "trun.sqlite"
    db = sqlite3.connect(transcript)
    db.execute("UPDATE meta SET value = ? WHERE name = 'plan'",
               (json.dumps({"tests": [{"test": "trigger-set", "mode": "sequential"}]}),))
    db.commit()
    db.close()
    _redigest(tmp_path / "rrun.json", _point_at(transcript))
    assert recheck(report=tmp_path / "rrun.json", key=d / "owner.key").status == "same"
