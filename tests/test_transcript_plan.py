"""A transcript is bound to its test plan: a fixed-n test is never extended on answers already seen (a repeated
fixed-n test breaks alpha), nor switched to or from a sequential one; a sequential test may raise its budget."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner
from httpkit import Counting, memorising_model

from wmark import api
from wmark.cli import main
from wmark.errors import UsageError
from wmark.keys import generate_key, save_key
from wmark.serve import build_app, serve_in_background
from wmark.testplan import plan_refusal
from wmark.transcript import Transcript

SHAPE = (1, 8, 8)
EXTEND = "rerun with the recorded plan or start a new transcript"
SWITCH = "start a new transcript: reading the same answers under another plan"


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    key = generate_key(owner="Test Owner", num_classes=10, input_shape=SHAPE, num_triggers=100)
    path = tmp_path_factory.mktemp("keys") / "owner.key"
    save_key(key, path)
    return key, path


@pytest.fixture
def suspect(owner):
    counter = Counting()
    app = build_app(model=memorising_model(owner[0]), name="m", num_classes=10, input_shape=SHAPE, labels_only=True,
                    on_infer=counter)
    with serve_in_background(app) as server:
        yield server.url, counter


def _verify(owner, url, transcript, *args: str):
    return CliRunner().invoke(main, ["verify", "api", "--key", str(owner[1]), "--suspect", url, "--model-name", "m",
                                     "--transcript", str(transcript), "--json", *args])


def test_a_fixed_test_is_not_extended_on_its_answers_but_resumes_with_its_plan(owner, suspect, tmp_path):
    url, counter = suspect
    transcript, report = tmp_path / "t.sqlite", tmp_path / "r.html"
    first = _verify(owner, url, transcript, "--fixed", "--budget", "20")
    assert first.exit_code == 0, first.output
    assert counter.total == 20
    for extra in (["--budget", "40"], ["--budget", "10"], ["--budget", "20", "--alpha", "1e-3"]):
        refused = _verify(owner, url, transcript, "--fixed", "--report", str(report), *extra)
        assert refused.exit_code == 2, refused.output
        assert refused.stdout == "" and refused.stderr.count("\n") == 1
        assert "holds answers for the test plan 'fixed-n trigger-set of 20 queries at alpha 1e-06'" in refused.stderr
        assert EXTEND in refused.stderr
        assert not report.exists() and not report.with_suffix(".json").exists()
    assert counter.total == 20
    again = _verify(owner, url, transcript, "--fixed", "--budget", "20")
    assert again.exit_code == 0, again.output
    doc, before = json.loads(again.stdout), json.loads(first.stdout)
    assert counter.total == 20 and doc["log10_p"] == before["log10_p"]
    summary = doc["tests"][0]["details"]["transcript"]
    assert summary["plan"] == {"tests": [{"test": "trigger-set", "mode": "fixed", "budget": 20}], "alpha": 1e-6}
    assert summary["runs"] == 2  # the refused runs left no run behind


def test_a_budget_beyond_the_key_is_the_same_fixed_plan(owner, suspect, tmp_path):
    url, _ = suspect
    transcript = tmp_path / "t.sqlite"
    assert _verify(owner, url, transcript, "--fixed").exit_code == 0
    assert _verify(owner, url, transcript, "--fixed", "--budget", "500").exit_code == 0


def test_a_sequential_test_raises_its_budget_but_never_turns_fixed(owner, suspect, tmp_path):
    url, counter = suspect
    transcript = tmp_path / "t.sqlite"
    short = _verify(owner, url, transcript, "--budget", "3")
    assert short.exit_code == 1 and json.loads(short.stdout)["status"] == "inconclusive", short.output
    longer = _verify(owner, url, transcript, "--budget", "100")
    assert longer.exit_code == 0, longer.output
    doc = json.loads(longer.stdout)
    assert doc["tests"][0]["details"]["probe"]["reused"]["trigger"] == 3
    assert counter.total == doc["queries"]
    switched = _verify(owner, url, transcript, "--fixed", "--budget", str(doc["queries"]))
    assert switched.exit_code == 2 and switched.stdout == ""
    assert ("holds answers for the test plan 'sequential trigger-set', not 'fixed-n trigger-set of "
            f"{doc['queries']} queries at alpha 1e-06'; {SWITCH}") in switched.stderr
    assert counter.total == doc["queries"]


def test_a_fixed_test_never_turns_sequential(owner, suspect, tmp_path):
    url, counter = suspect
    transcript = tmp_path / "t.sqlite"
    assert _verify(owner, url, transcript, "--fixed", "--budget", "5").exit_code == 1
    switched = _verify(owner, url, transcript, "--budget", "100")
    assert switched.exit_code == 2 and SWITCH in switched.stderr
    assert counter.total == 5


def test_the_plan_binds_only_once_an_answer_is_recorded(tmp_path):
    path = tmp_path / "t.sqlite"
    fixed = {"tests": [{"test": "trigger-set", "mode": "fixed", "budget": 20}], "alpha": 1e-6}
    more = {"tests": [{"test": "trigger-set", "mode": "fixed", "budget": 40}], "alpha": 1e-6}
    binding = {"key_commitment": "a" * 64, "suspect": "http://x/infer", "protocol": "v2"}
    # a run that got no answer (the server was down, say) saw nothing: the next one may take another plan
    Transcript(path, plan=fixed, **binding).close()
    record = Transcript(path, plan=more, **binding)
    assert record.plan == more
    (seq,) = record.begin([("0" * 64, "cover")])
    record.finish(seq, status="ok", label=1)  # a cover answer says nothing about the test
    record.close()
    record = Transcript(path, plan=fixed, **binding)
    (seq,) = record.begin([("1" * 64, "trigger")])
    record.finish(seq, status="malformed", error="not a prediction")
    record.close()
    with pytest.raises(UsageError, match=EXTEND):
        Transcript(path, plan=more, **binding)


def _forget_plan(path) -> None:
    """What a transcript written before plans were recorded looks like."""
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta WHERE name LIKE 'plan%'")
    db.commit()
    db.close()


def test_a_transcript_without_a_plan_resumes_only_sequentially(owner, suspect, tmp_path):
    url, counter = suspect
    transcript = tmp_path / "t.sqlite"
    assert _verify(owner, url, transcript, "--fixed", "--budget", "5").exit_code == 1
    _forget_plan(transcript)
    refused = _verify(owner, url, transcript, "--fixed", "--budget", "5")
    assert refused.exit_code == 2 and refused.stdout == ""
    assert ("holds answers an older wmark recorded without their test plan, so a fixed-n test cannot be checked "
            "against them; start a new transcript (a sequential run may still resume it)") in refused.stderr
    resumed = api.verify_remote(key=owner[1], url=url, model_name="m", transcript=transcript)
    assert resumed.detected and resumed.tests[0].details["probe"]["reused"]["trigger"] == 5
    assert f"Run 1 of the transcript {transcript} recorded no test plan" in resumed.message
    summary = resumed.tests[0].details["transcript"]
    assert summary["plan"] == {"tests": [{"test": "trigger-set", "mode": "sequential"}]}
    assert summary["plan_since_run"] == 2
    assert counter.total == resumed.tests[0].queries
    with pytest.raises(UsageError, match=SWITCH):
        api.verify_remote(key=owner[1], url=url, model_name="m", mode="fixed", max_queries=5, transcript=transcript)


def test_the_extraction_plans_bind_every_fixed_test():
    """`verify extraction` against a URL: a sequential trigger-set or log test may ask more, the committed-input
    test and the fixed log test may not, and a log test never switches between fixed and sequential."""
    def plan(trigger, *tiebreak, alpha=1e-4, client="thief"):
        return {"tests": [trigger, *tiebreak], "alpha": alpha, "client": client}

    seq = {"test": "trigger-set", "mode": "sequential"}
    rule = {"test": "api-tiebreak", "mode": "fixed", "budget": 1000}
    log = {"test": "api-tiebreak-log", "mode": "fixed", "budget": 1000, "rounds": 21}
    log_seq = {"test": "api-tiebreak-log", "mode": "sequential"}
    recorded = plan(seq, rule, log)
    assert plan_refusal("t", recorded, plan(seq, rule, log)) is None
    for changed in (plan(seq, dict(rule, budget=2000), log), plan(seq, rule, dict(log, rounds=1)),
                    plan(seq, rule, dict(log, budget=500)), plan(seq, rule, log, alpha=1e-3)):
        assert EXTEND in plan_refusal("t", recorded, changed)
    for switched in (plan(seq, rule, log_seq), plan(seq, log), plan(seq, rule, log, client="other"),
                     plan(dict(seq, mode="fixed", budget=100), rule, log)):
        assert SWITCH in plan_refusal("t", recorded, switched)
    message = plan_refusal("t", plan(seq, rule, log_seq), plan(seq, rule, log))
    assert ("'sequential trigger-set, fixed-n api-tiebreak of 1000 queries and sequential api-tiebreak-log at alpha "
            "0.0001 for client 'thief'', not 'sequential trigger-set, fixed-n api-tiebreak of 1000 queries and "
            "fixed-n api-tiebreak-log of 1000 queries in 21 rounds at alpha 0.0001 for client 'thief''") in message
