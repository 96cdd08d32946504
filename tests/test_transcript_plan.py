"""A transcript is bound to its test plan: a fixed-n test is never extended on answers already seen (a repeated
fixed-n test breaks alpha), nor switched to or from a sequential one; the sequential trigger-set test may raise
its budget, at its alpha."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from httpkit import Counting, memorising_model

from wmark import api
from wmark.cli import main
from wmark.errors import UsageError
from wmark.keys import generate_key, save_key
from wmark.serve import build_app, serve_in_background
from wmark.stats import mixture_plan
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
    assert ("holds answers for the test plan 'sequential trigger-set at alpha 1e-06', not 'fixed-n trigger-set of "
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
    assert summary["plan"] == {"tests": [{"test": "trigger-set", "mode": "sequential", "eprocess": mixture_plan()}],
                               "alpha": 1e-6}
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


OTHER_INPUTS = "rerun with the files it was read with or start a new transcript"
OLDER = "recorded by an older wmark that did not bind the tie-break rule, holdout or query log it read"


@pytest.fixture(scope="module")
def tiebreak_files(owner, tmp_path_factory):
    """The owner's served model file and two tie-break rules built from it (other feature maps)."""
    from wmark.io import save_model
    from wmark.models import build_model, model_metadata

    d = tmp_path_factory.mktemp("tiebreak")
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=3), d / "served.safetensors",
               metadata=model_metadata(arch="fmnist-mlp", num_classes=10, input_shape=SHAPE))
    for name, components in (("a", 16), ("b", 12)):
        api.build_tiebreak(key=owner[1], arch="fmnist-mlp", weights=d / "served.safetensors", data="digits",
                           out=d / f"rule-{name}.safetensors", references=[], verify_count=60, components=components)
    return d


def _strip_inputs(path) -> None:
    """What a transcript of a wmark whose plans bound no rule, holdout or log looks like."""
    db = sqlite3.connect(path)
    (plan,) = db.execute("SELECT value FROM meta WHERE name = 'plan'").fetchone()
    doc = json.loads(plan)
    doc["tests"] = [{k: v for k, v in entry.items() if k not in ("inputs", "reads")} for entry in doc["tests"]]
    db.execute("UPDATE meta SET value = ? WHERE name = 'plan'", (json.dumps(doc, sort_keys=True),))
    db.commit()
    db.close()


def test_a_fixed_tiebreak_test_is_not_read_again_under_another_rule(owner, suspect, tiebreak_files, tmp_path):
    url, counter = suspect
    transcript = tmp_path / "t.sqlite"

    def run(rule: str):
        return api.verify_remote(key=owner[1], url=url, model_name="m", mode="fixed", max_queries=20,
                                 rule=tiebreak_files / f"rule-{rule}.safetensors", rule_queries=60,
                                 transcript=transcript)

    first = run("a")
    asked = counter.total
    entry = first.tests[0].details["transcript"]["plan"]["tests"][1]
    assert entry["inputs"].keys() == {"rule"} and entry["reads"] == "scores"  # an image rule reads probabilities
    with pytest.raises(UsageError, match=r"holds answers for the test plan 'fixed-n trigger-set of 20 queries and "
                                         r"fixed-n api-tiebreak of 60 queries at alpha 1e-06', read with another "
                                         f"tie-break rule or served model than this run's; {OTHER_INPUTS}"):
        run("b")
    assert counter.total == asked
    again = run("a")
    assert counter.total == asked and [t.log10_p for t in again.tests] == [t.log10_p for t in first.tests]
    # a transcript whose plan an older wmark wrote without the rule's digest: a fixed-n test cannot be checked
    _strip_inputs(transcript)
    with pytest.raises(UsageError, match=f"{OLDER}, so a fixed-n test cannot be checked against them; start a new "
                                         r"transcript \(a sequential run may still resume it\)"):
        run("a")
    assert counter.total == asked


def _binding():
    return {"key_commitment": "a" * 64, "suspect": "http://x/infer", "protocol": "v2"}


def _answer(record: Transcript, digest: str) -> None:
    (seq,) = record.begin([(digest, "trigger")])
    record.finish(seq, status="ok", label=1)


def test_a_sequential_test_is_not_read_again_under_another_log_or_rule_and_says_what_changed(tmp_path):
    def plan(**inputs):
        return {"tests": [{"test": "trigger-set", "mode": "sequential"},
                          {"test": "api-tiebreak-log", "mode": "sequential", "reads": "labels",
                           "inputs": {"rule": "r1", "log": "l1", **inputs}}], "client": "thief"}

    path = tmp_path / "t.sqlite"
    record = Transcript(path, plan=plan(), **_binding())
    _answer(record, "0" * 64)
    record.close()
    Transcript(path, plan=plan(), **_binding()).close()
    with pytest.raises(UsageError, match=r"read with another query log \(the client's logged inputs\) than this run's; "
                                         + OTHER_INPUTS):
        Transcript(path, plan=plan(log="l2"), **_binding())
    with pytest.raises(UsageError, match=r"read with another tie-break rule or served model and another query log "
                                         r"\(the client's logged inputs\) than this run's"):
        Transcript(path, plan=plan(rule="r2", log="l2"), **_binding())
    read_scores = plan()
    read_scores["tests"][1]["reads"] = "scores"
    assert "another reading of the answers (scores, not labels)" in plan_refusal("t", plan(), read_scores)
    holdout = {"tests": [{"test": "api-tiebreak", "mode": "fixed", "budget": 9, "reads": "labels",
                          "inputs": {"rule": "r1", "holdout": "h1"}}], "alpha": 1e-6}
    other = json.loads(json.dumps(holdout))
    other["tests"][0]["inputs"]["holdout"] = "h2"
    assert "read with another holdout than this run's" in plan_refusal("t", holdout, other)


def test_an_older_plan_without_inputs_resumes_sequentially_and_binds_them_from_then_on(tmp_path):
    older = {"tests": [{"test": "trigger-set", "mode": "sequential"}, {"test": "api-mark", "mode": "sequential"}],
             "client": "thief"}
    bound = json.loads(json.dumps(older))
    bound["tests"][1]["inputs"] = {"log": "l1"}
    path = tmp_path / "t.sqlite"
    record = Transcript(path, plan=older, **_binding())
    _answer(record, "0" * 64)
    record.close()
    record = Transcript(path, plan=bound, **_binding())
    assert record.plan == bound and record.plan_since_run == 2
    assert record.plan_note.startswith(f"Run 1 of the transcript {path} recorded a test plan without the tie-break "
                                       "rule, holdout or query log its tests read, or a sequential test's alpha or "
                                       "budget (an older wmark)")
    record.close()
    moved = json.loads(json.dumps(bound))
    moved["tests"][1]["inputs"]["log"] = "l2"
    with pytest.raises(UsageError, match=OTHER_INPUTS):  # bound now: another log is refused
        Transcript(path, plan=moved, **_binding())
    # a fixed-n plan on an older plan of the same tests is refused; one without inputs (the trigger set) is the same
    fixed_older = {"tests": [{"test": "api-tiebreak", "mode": "fixed", "budget": 9}], "alpha": 1e-6}
    fixed = {"tests": [dict(fixed_older["tests"][0], inputs={"rule": "r"}, reads="labels")], "alpha": 1e-6}
    assert OLDER in plan_refusal("t", fixed_older, fixed)
    trigger = {"tests": [{"test": "trigger-set", "mode": "fixed", "budget": 20}], "alpha": 1e-6}
    assert plan_refusal("t", trigger, json.loads(json.dumps(trigger))) is None


def test_each_test_binds_what_it_reads_besides_the_answers(owner, tmp_path):
    """The digests behind a plan: the holdout and the client's logged inputs (which grow as the client asks
    more), and the flip mark's logged records the e-process runs over."""
    from _api_helpers import LinearModel

    from wmark.schemes.api_mark import ApiMarkTest, MarkedAPI, MarkLog
    from wmark.schemes.tiebreak import (
        TieBreakAPI,
        TieBreakLog,
        TieBreakLogTest,
        TieBreakTest,
        build_tiebreak_rule,
        select_log_inputs,
    )

    key = generate_key(owner="o", num_classes=4, input_shape=(6,))
    backend = LinearModel(1, num_classes=4, dims=6)
    x = np.random.default_rng(0).normal(size=(900, 6)).astype(np.float32)
    rule = build_tiebreak_rule(key=key, x=x, featurizer=np.tanh, feature_space="t", components=4)
    other = build_tiebreak_rule(key=key, x=x[:600], featurizer=np.tanh, feature_space="t", components=4)
    def held(rule, inputs, **kw) -> dict:
        return TieBreakTest(key=key, rule=rule, served=backend, inputs=inputs, **kw).plan()

    assert held(rule, x[:300]) == held(rule, x[:300]) and held(rule, x[:300])["reads"] == "scores"
    assert held(rule, x[:300])["inputs"].keys() == {"rule", "holdout"}
    assert held(rule, x[:300])["inputs"]["holdout"] != held(rule, x[:301])["inputs"]["holdout"]
    assert held(rule, x[:300])["inputs"]["rule"] != held(other, x[:300])["inputs"]["rule"]
    assert held(rule, x, use_scores=False)["reads"] == "labels"

    def log_plan(mode: str, read: int | None = None) -> dict:
        with TieBreakLog(tmp_path / "tb.sqlite", key=key, create=False) as log:
            chosen = select_log_inputs(key=key, rule=rule, served=backend, log=log, client="thief", read=read)
        return TieBreakLogTest(key=key, rule=rule, served=backend, chosen=chosen, mode=mode).plan()

    with TieBreakLog(tmp_path / "tb.sqlite", key=key) as log:
        TieBreakAPI(key=key, backend=backend, rule=rule, log=log, client="thief").query(x[:400])
    before = {mode: log_plan(mode) for mode in ("fixed", "sequential")}
    assert before["fixed"]["inputs"] == before["sequential"]["inputs"] == log_plan("fixed")["inputs"]
    assert before["sequential"]["max_queries"] == 10_000 and before["sequential"]["eprocess"] == {"rho": 0.13,
                                                                                                  "round_size": 50}
    with TieBreakLog(tmp_path / "tb.sqlite", key=key, create=False) as log:
        TieBreakAPI(key=key, backend=backend, rule=rule, log=log, client="thief").query(x[400:])
    for mode, plan in before.items():  # the client asked more: its ranked inputs, and so the test, changed
        after = log_plan(mode)
        assert after["inputs"]["rule"] == plan["inputs"]["rule"] and after["inputs"]["log"] != plan["inputs"]["log"]
        assert after["log_read"] > plan["log_read"]
        assert log_plan(mode, read=plan["log_read"]) == plan  # but not the inputs it had asked first, read again

    with MarkLog(tmp_path / "flip.sqlite", key=key, rate=0.3, candidates=3) as log:
        MarkedAPI(key=key, backend=backend, rate=0.3, candidates=3, log=log, client="thief").query(x[:300])
    flip = ApiMarkTest(key=key, log=tmp_path / "flip.sqlite", client="thief", max_queries=20)
    first = flip.plan()
    assert first["mode"] == "sequential" and first == flip.plan() and first["eprocess"] == mixture_plan()
    with MarkLog(tmp_path / "flip.sqlite", key=key) as log:
        MarkedAPI(key=key, backend=backend, rate=0.3, candidates=3, log=log, client="thief").query(x[300:])
    again = ApiMarkTest(key=key, log=tmp_path / "flip.sqlite", client="thief", max_queries=20)
    assert again.plan() == first and first["log_read"] == 20  # later records extend the stream past what it reads
    assert ApiMarkTest(key=key, log=tmp_path / "flip.sqlite", client="thief", max_queries=21).plan() != first
    assert ApiMarkTest(key=key, log=tmp_path / "flip.sqlite", client="thief", max_queries=20, read=20).plan() == first
    # the records the plan bound, under another budget: the same stream, but the plan binds the budget too
    more = ApiMarkTest(key=key, log=tmp_path / "flip.sqlite", client="thief", max_queries=300, read=20).plan()
    assert more == dict(first, max_queries=300) and first["max_queries"] == 20
    # the run asks the records its plan bound, not those the API logged in between
    def serve(client: str, inputs: np.ndarray) -> None:
        with MarkLog(tmp_path / "flip.sqlite", key=key) as log:
            MarkedAPI(key=key, backend=backend, rate=0.3, candidates=3, log=log, client=client).query(inputs)

    serve("other", x[:60])
    short, none = (ApiMarkTest(key=key, log=tmp_path / "flip.sqlite", client=client) for client in ("other", "late"))
    bound = short.plan()["log_read"]
    with pytest.raises(UsageError, match="no marked queries for client 'late'"):
        none.plan()  # no plan binds an empty stream
    serve("other", x[60:])
    serve("late", x)
    assert short.run(backend, alpha=1e-6, share=1.0).queries == bound < 60


def test_the_plan_binds_a_prior_weight_and_a_run_weighted_otherwise_is_refused():
    # weighted Holm keeps alpha only with weights fixed before the answers; the plan held no weight, so a resumed
    # run (or a report) could weigh its tests otherwise on the same answers
    from wmark.testplan import verification_plan

    class Stub:
        def __init__(self, name, weight):
            self.name, self.weight = name, weight

        def plan(self):
            return {"mode": "sequential"}

    plan = verification_plan([Stub("trigger-set", 1.0), Stub("api-tiebreak-log", 0.8)], alpha=1e-4)
    assert plan == {"tests": [{"test": "trigger-set", "mode": "sequential"},
                              {"test": "api-tiebreak-log", "mode": "sequential", "weight": 0.8}], "alpha": 1e-4}
    heavier = verification_plan([Stub("trigger-set", 1.0), Stub("api-tiebreak-log", 4.0)], alpha=1e-4)
    assert plan_refusal("t", plan, heavier) == (
        "The transcript t holds answers for the test plan 'sequential trigger-set and sequential api-tiebreak-log of "
        "weight 0.8 at alpha 0.0001', weighted otherwise than this run's tests; rerun with the recorded weights or start a new "
        "transcript: weighted Holm keeps alpha only with weights fixed before any answer was seen.")


SECOND = "an e-process keeps alpha only at the alpha and under the e-process fixed before any answer was seen"


def test_a_sequential_test_resumes_only_at_its_alpha_and_an_older_plan_binds_it_from_then_on(owner, suspect, tmp_path):
    # a sequential plan bound no alpha: a run at 1e-6 could be re-run at 1e-2 on its answers, an alpha chosen after
    # seeing them
    url, counter = suspect
    transcript = tmp_path / "t.sqlite"
    assert api.verify_remote(key=owner[1], url=url, model_name="m", max_queries=3, transcript=transcript).status == (
        "inconclusive")
    with pytest.raises(UsageError, match=r"holds answers for the test plan 'sequential trigger-set at alpha 1e-06', "
                                         r"not 'sequential trigger-set at alpha 0.01' \(another alpha\); rerun with the "
                                         f"recorded plan or start a new transcript: {SECOND}"):
        api.verify_remote(key=owner[1], url=url, model_name="m", alpha=1e-2, transcript=transcript)
    assert counter.total == 3
    # a plan an older wmark recorded without alpha (or the mixture) resumes sequentially and binds them from then on
    db = sqlite3.connect(transcript)
    db.execute("UPDATE meta SET value = ? WHERE name = 'plan'",
               (json.dumps({"tests": [{"test": "trigger-set", "mode": "sequential"}]}),))
    db.commit()
    db.close()
    resumed = api.verify_remote(key=owner[1], url=url, model_name="m", alpha=1e-2, transcript=transcript)
    assert resumed.detected and f"Run 1 of the transcript {transcript}" in resumed.message
    assert resumed.tests[0].details["transcript"]["plan"]["alpha"] == 1e-2
    with pytest.raises(UsageError, match=r"\(another alpha\)"):
        api.verify_remote(key=owner[1], url=url, model_name="m", transcript=transcript)


def test_a_sequential_log_test_binds_its_budget_and_e_process():
    from wmark.schemes.tiebreak.sequential import SEQUENTIAL_BUDGET, SEQUENTIAL_RHO, SEQUENTIAL_ROUND

    def plan(log: dict, rule_budget: int = 1000) -> dict:
        return {"tests": [{"test": "api-tiebreak", "mode": "fixed", "budget": rule_budget},
                          {"test": "api-tiebreak-log", "mode": "sequential", **log}], "alpha": 1e-4, "client": "c"}

    bound = {"max_queries": SEQUENTIAL_BUDGET, "eprocess": {"rho": SEQUENTIAL_RHO, "round_size": SEQUENTIAL_ROUND}}
    assert plan_refusal("t", plan(bound), plan(bound)) is None
    more = dict(bound, max_queries=20_000)
    assert plan_refusal("t", plan(bound), plan(more)) == (
        "The transcript t holds answers for the test plan 'fixed-n api-tiebreak of 1000 queries and sequential "
        "api-tiebreak-log of at most 10000 queries at alpha 0.0001 for client 'c'', not 'fixed-n api-tiebreak of 1000 "
        "queries and sequential api-tiebreak-log of at most 20000 queries at alpha 0.0001 for client 'c'' (another "
        f"budget of the api-tiebreak-log test); rerun with the recorded plan or start a new transcript: {SECOND}, and "
        "the same answers read under another is a second test, which breaks its alpha.")
    other = dict(bound, eprocess={"rho": 0.5, "round_size": SEQUENTIAL_ROUND})
    assert "(another e-process of the api-tiebreak-log test)" in plan_refusal("t", plan(bound), plan(other))
    # an older plan bound neither: its e-process is the one every wmark ran, its budget is bound from then on, and
    # the fixed-n test beside it is still checked against what it bound
    assert plan_refusal("t", plan({}), plan(bound)) is None
    assert plan_refusal("t", plan({"eprocess": {"rho": 0.5, "round_size": 50}}), plan(bound)) is not None
    assert EXTEND in plan_refusal("t", plan({}), plan(bound, rule_budget=2000))


def _thief_rows(log) -> list[int]:
    """The rowids of the thief's logged inputs, in log order."""
    db = sqlite3.connect(log)
    rows = [r for (r,) in db.execute("SELECT rowid FROM inputs WHERE client = 'thief' ORDER BY rowid")]
    db.close()
    return rows


def _change(log, sql: str, rowid: int) -> None:
    db = sqlite3.connect(log)
    db.execute(sql, (rowid,))
    db.commit()
    db.close()


@pytest.mark.parametrize("log_mode", ["fixed", "sequential"])
def test_a_log_test_resumes_on_a_log_grown_by_appending_but_not_on_one_whose_read_inputs_changed(
        owner, suspect, tiebreak_files, tmp_path, log_mode):
    """The owner's API keeps logging while an investigation runs: the plan bound the digest of the whole log, so a
    resumed run saw the thief's later queries as another log and was refused. It binds the first inputs read."""
    from wmark.schemes.tiebreak import TieBreakAPI, TieBreakLog, open_tiebreak_rule

    url, counter = suspect
    key, rule, log, transcript = owner[0], tiebreak_files / "rule-a.safetensors", tmp_path / "api.sqlite", tmp_path / "t"
    loaded, backend = open_tiebreak_rule(key=key, rule=rule)
    x = np.random.default_rng(7).random((600, *SHAPE), dtype=np.float32)

    def serve(client: str, inputs: np.ndarray) -> None:  # what the marked API's logger writes, client by client
        with TieBreakLog(log, key=key) as opened:
            TieBreakAPI(key=key, backend=backend, rule=loaded, log=opened, client=client).query(inputs)

    def run():
        return api.verify_remote(key=owner[1], url=url, model_name="m", mode="fixed", max_queries=20, rule=rule,
                                 rule_queries=0, log=log, client="thief", log_queries=30, log_mode=log_mode,
                                 transcript=transcript)

    serve("thief", x[:200])
    first = run()
    asked, read = counter.total, len(_thief_rows(log))
    assert first.tests[0].details["transcript"]["plan"]["tests"][1]["log_read"] == read
    serve("thief", x[200:400])
    serve("other", x[400:])
    assert len(_thief_rows(log)) > read
    again = run()
    assert counter.total == asked and [t.log10_p for t in again.tests] == [t.log10_p for t in first.tests]
    assert f"among the first {read} near-tie inputs" in again.tests[1].details["selection"]
    rows = _thief_rows(log)
    _change(log, "DELETE FROM inputs WHERE rowid = ?", rows[-1])  # one never read: the test reads the same ones
    assert [t.log10_p for t in run().tests] == [t.log10_p for t in first.tests]
    changed = r"read with another query log \(the client's logged inputs\) than this run's; " + OTHER_INPUTS
    _change(log, "UPDATE inputs SET input = zeroblob(length(input)) WHERE rowid = ?", rows[3])
    with pytest.raises(UsageError, match=changed):
        run()
    _change(log, "DELETE FROM inputs WHERE rowid = ?", rows[3])
    with pytest.raises(UsageError, match=changed):
        run()
    assert counter.total == asked


def _flip_api(key, log):
    """A function that serves a client's inputs through the flip-marked API of a copy of ``key``, logging to ``log``."""
    from wmark.schemes.api_mark import MarkedAPI, MarkLog
    from wmark.suspects import LocalSuspect

    backend = LocalSuspect(memorising_model(key, seed=5), input_shape=SHAPE)

    def serve(client: str, inputs: np.ndarray) -> None:
        with MarkLog(log, key=key, rate=0.3, candidates=3) as opened:
            MarkedAPI(key=key, backend=backend, rate=0.3, candidates=3, log=opened, client=client).query(inputs)

    return serve


def test_a_flip_mark_test_resumes_on_its_log_grown_by_appending(owner, suspect, tmp_path):
    """The flip mark's test reads at most its budget of a client's records: on a log shorter than that, the records
    the API logged after a run made the resumed run read another stream than the plan bound, and it was refused."""
    url, counter = suspect
    key, log, transcript = owner[0], tmp_path / "flip.sqlite", tmp_path / "t"
    x = np.random.default_rng(3).random((300, *SHAPE), dtype=np.float32)
    serve = _flip_api(key, log)

    def run(**budget):
        return api.verify_remote(key=owner[1], url=url, model_name="m", max_queries=20, log=log, client="thief",
                                 transcript=transcript, **budget)

    serve("thief", x[:100])
    first = run()
    asked, read = counter.total, len(_thief_rows(log))
    assert read < 300 and first.tests[1].queries == read
    assert first.tests[0].details["transcript"]["plan"]["tests"][1]["max_queries"] == 300
    serve("thief", x[100:200])
    serve("other", x[200:])
    again = run(log_queries=300)  # the same budget (the default, given) on the grown log: the same records
    assert counter.total == asked and again.tests[1].queries == read
    assert [t.log10_p for t in again.tests] == [t.log10_p for t in first.tests]
    # another budget is another test: it was read silently as the records the plan bound, the new one ignored
    for other in (400, read + 1, read - 1, 5):
        with pytest.raises(UsageError, match=r"sequential api-mark of at most 300 queries at alpha 1e-06 for client "
                                             rf"'thief'', not '.* at most {other} queries .*' \(another budget of the "
                                             r"api-mark test\); rerun with the recorded plan"):
            run(log_queries=other)
    assert counter.total == asked
    # a plan an older wmark recorded without the budget resumes on the records it bound, and binds it from then on
    db = sqlite3.connect(transcript)
    (text,) = db.execute("SELECT value FROM meta WHERE name = 'plan'").fetchone()
    plan = json.loads(text)
    del plan["tests"][1]["max_queries"]
    db.execute("UPDATE meta SET value = ? WHERE name = 'plan'", (json.dumps(plan),))
    db.commit()
    db.close()
    older = run(log_queries=400)
    assert counter.total == asked and older.tests[1].queries == read
    assert [t.log10_p for t in older.tests] == [t.log10_p for t in first.tests]
    assert older.tests[0].details["transcript"]["plan"]["tests"][1]["max_queries"] == 400
    with pytest.raises(UsageError, match=r"\(another budget of the api-mark test\)"):
        run()
    _change(log, "UPDATE inputs SET label = (label + 1) % 10 WHERE rowid = ?", _thief_rows(log)[0])
    with pytest.raises(UsageError, match=r"read with another query log \(the client's logged inputs\)"):
        run(log_queries=400)


def test_a_flip_mark_client_with_no_marked_record_is_refused_before_its_plan_binds_an_empty_stream(owner, suspect,
                                                                                                    tmp_path):
    """The plan bound log_read 0 for a client with no marked record yet, after the trigger set's answers were
    recorded: every resumed run then read 0 records and said the log had no marked queries for a client it listed."""
    url, counter = suspect
    key, log, transcript = owner[0], tmp_path / "flip.sqlite", tmp_path / "t"
    x = np.random.default_rng(3).random((300, *SHAPE), dtype=np.float32)
    serve = _flip_api(key, log)

    def run():
        return api.verify_remote(key=owner[1], url=url, model_name="m", max_queries=20, log=log, client="late",
                                 transcript=transcript)

    serve("other", x[:50])
    with pytest.raises(UsageError, match=r"no marked queries for client 'late' \(clients: other\)"):
        run()
    assert counter.total == 0  # refused before the suspect was asked anything
    serve("late", x)
    resumed = run()
    assert resumed.tests[1].queries > 0 and resumed.tests[0].details["transcript"]["plan"]["tests"][1]["log_read"] > 0


def test_a_flip_mark_run_asks_the_records_its_plan_read_even_if_the_log_file_was_replaced_since(owner, tmp_path):
    """The run read the log again (its first log_read records), so a log replaced while the trigger set was asked
    (rotated: a new log of the same key at the same path) gave the run other records than the plan bound."""
    from wmark.schemes.api_mark import ApiMarkTest, MarkedAPI, MarkLog
    from wmark.suspects import LocalSuspect

    key, log = owner[0], tmp_path / "flip.sqlite"
    backend = LocalSuspect(memorising_model(key, seed=5), input_shape=SHAPE)
    x = np.random.default_rng(3).random((300, *SHAPE), dtype=np.float32)

    def serve(inputs: np.ndarray) -> None:
        with MarkLog(log, key=key, rate=0.3, candidates=3) as opened:
            MarkedAPI(key=key, backend=backend, rate=0.3, candidates=3, log=opened, client="thief").query(inputs)

    serve(x[:100])
    test = ApiMarkTest(key=key, log=log, client="thief", max_queries=20)
    assert test.plan()["log_read"] == 20
    log.unlink()
    serve(x[100:115])
    with MarkLog(log, key=key, create=False) as opened:
        assert 0 < len(opened.records("thief")) < 20
    assert test.run(backend, alpha=1e-6, share=1.0).queries == 20


def test_a_plan_recorded_before_it_bound_how_much_of_the_log_was_read_is_compared_as_before():
    from wmark.testplan import recorded_log_read

    def plan(digest: str, **read) -> dict:
        return {"tests": [{"test": "trigger-set", "mode": "sequential"},
                          {"test": "api-tiebreak-log", "mode": "fixed", "budget": 30, "rounds": 21, "reads": "labels",
                           "inputs": {"rule": "r", "log": digest}, **read}], "alpha": 1e-6, "client": "thief"}

    older = plan("whole log")
    assert recorded_log_read(older, "thief") is None  # the resumed run reads the whole log, as the older one did
    assert plan_refusal("t", older, plan("whole log", log_read=40)) is None
    assert OTHER_INPUTS in plan_refusal("t", older, plan("grown log", log_read=50))
    assert recorded_log_read(plan("l", log_read=40), "thief") == 40
    assert recorded_log_read(plan("l", log_read=40), "other") is None
