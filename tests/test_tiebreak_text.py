"""The tie-break API mark on a text classifier: strings end to end, the exact null, a caught extraction, HTTP.

A synthetic 4-class task over MiniLM's vocabulary (topic words per class, words of a second class and noise
words) and bag-of-words models train in a second each, so the whole file runs in seconds.
"""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import pytest
import torch
from scipy import stats
from servekit import start_serve, wait_ready
from textkit import text_key

from wmark.distill import extract
from wmark.errors import UsageError
from wmark.io import save_model, tensors_digest
from wmark.keys import generate_key, save_key
from wmark.models import build_model, penultimate_featurizer
from wmark.remote import verify_remote
from wmark.schemes.querylog import TieBreakLog
from wmark.schemes.tiebreak import (
    TieBreakAPI,
    build_tiebreak_rule,
    commit_verification_inputs,
    load_tiebreak_rule,
    tiebreak_log_sequential,
    tiebreak_log_test,
    tiebreak_statistic,
    tiebreak_test,
    top_pairs,
    train_reference_surrogates,
)
from wmark.schemes.tiebreak.rule import _directions
from wmark.schemes.trigger_set import generate_triggers
from wmark.serve import build_app, serve_in_background
from wmark.suspects import LocalSuspect
from wmark.suspects.http import open_http_suspect
from wmark.text import TextInputs, load_tokenizer, trigger_vocabulary
from wmark.training import make_loader, train_epochs

CLASSES, LENGTH = 4, 32
BETA = 2.0  # a strong shift, so that a surrogate of 1,000 queries carries it clearly in a unit-sized test
UNICODE = ("café naïve", "日本語 テキスト", "emoji 🎲 ünïcödé", "Ωmega — “quoted”")


def corpus(n: int, seed: int, vocab: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` texts of topic words of their class, words of another class and noise words (some with unicode)."""
    pool = np.random.default_rng(0).choice(len(vocab), CLASSES * 12 + 80, replace=False)
    topic = [[vocab[i] for i in pool[c * 12:(c + 1) * 12]] for c in range(CLASSES)]
    noise = [vocab[i] for i in pool[CLASSES * 12:]]
    r = np.random.default_rng(seed)
    y = r.integers(0, CLASSES, n)
    texts = []
    for i, c in enumerate(y):
        words = (list(r.choice(topic[c], r.integers(1, 4))) + list(r.choice(topic[r.integers(0, CLASSES)],
                                                                             r.integers(0, 3)))
                 + list(r.choice(noise, 4)))
        r.shuffle(words)
        texts.append(" ".join(words) + (f" {UNICODE[i % len(UNICODE)]}" if i % 7 == 0 else ""))
    out = np.empty(n, dtype=object)
    out[:] = texts
    return out, y


def train_bow(text: TextInputs, x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int = 5) -> torch.nn.Module:
    model = build_model("text-bow", num_classes=CLASSES, input_shape=(LENGTH,), seed=seed)
    ids = text.encode(list(x), pad_to_max=True)["input_ids"]
    train_epochs(model, make_loader(ids, torch.as_tensor(y), batch_size=64, seed=seed), epochs=epochs,
                 optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), device=torch.device("cpu"))
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A text key, the owner's served bag-of-words model and its rule (text references, 300 committed texts),
    the marked label-only API with a log, and a thief's surrogate distilled from it."""
    tmp = tmp_path_factory.mktemp("textbreak")
    # a fixed key and torch seed: the thief's strength otherwise varies with both (its committed-input log10 p
    # ranged from -3.9 to -11.5 over 16 random keys in one process), and these tests check plumbing, not power
    torch.manual_seed(0)
    key = text_key(num_classes=CLASSES, max_length=LENGTH, tag="text-tiebreak-world")
    text = TextInputs.from_key(key)
    vocab = trigger_vocabulary(text.tokenizer)
    owner_x, owner_y = corpus(1000, 1, vocab)
    thief_x, _ = corpus(1000, 2, vocab)
    served = train_bow(text, owner_x, owner_y, seed=0)
    backend = LocalSuspect(served, input_shape=(LENGTH,), text=text)
    rule = build_tiebreak_rule(key=key, x=owner_x, featurizer=penultimate_featurizer(served, encode=text.encode),
                               feature_space="served-penultimate", text=text)
    refs = train_reference_surrogates(served=backend, x=owner_x, archs=["text-bow"], repeats=1, text=text)
    rule = commit_verification_inputs(rule, served=backend, x=owner_x, references=refs, count=300, how="text-bow")
    weights = tmp / "served.safetensors"
    save_model(served, weights, metadata={"arch": "text-bow", "num_classes": CLASSES, "input_shape": [LENGTH],
                                          "modality": key.modality})
    from wmark.io import load_tensors

    rule = dataclasses.replace(rule, served_arch="text-bow", served_path=str(weights),
                               model_digest=tensors_digest(*load_tensors(weights)), input_shape=(LENGTH,))
    rule.save(tmp / "rule.safetensors")
    save_key(key, tmp / "owner.key")
    log = TieBreakLog(tmp / "api.sqlite", key=key)
    api = TieBreakAPI(key=key, backend=backend, rule=rule, beta=BETA, expose_scores=False, log=log, client="thief")
    surrogate = extract(api, x=thief_x, arch="text-bow", epochs=6, text=text, seed=5).model
    yield {"key": key, "text": text, "vocab": vocab, "served": served, "backend": backend, "rule": rule, "log": log,
           "api": api, "surrogate": surrogate, "owner_x": owner_x, "thief_x": thief_x, "tmp": tmp}
    log.close()


def suspect(world, model, *, scores: bool = False) -> LocalSuspect:
    return LocalSuspect(model, input_shape=(LENGTH,), text=world["text"], expose_scores=scores)


def test_the_rule_commits_texts_and_references_that_load_back_exactly(world):
    rule, key, text = world["rule"], world["key"], world["text"]
    committed = list(rule.verification_inputs)
    assert len(committed) == 300 and all(isinstance(t, str) for t in committed)
    assert set(committed) <= set(world["owner_x"])
    loaded = load_tiebreak_rule(world["tmp"] / "rule.safetensors", key=key,
                                featurizer=penultimate_featurizer(world["served"], encode=text.encode))
    assert list(loaded.verification_inputs) == committed and loaded.text is not None
    assert [a for a, _ in loaded.references] == ["text-bow"] * 4 and loaded.input_shape == (LENGTH,)
    probe = np.asarray(committed[:20], dtype=object)
    for (_, a), (_, b) in zip(rule.references, loaded.references):
        ids = text.encode(list(probe))
        assert torch.allclose(a(**ids), b(**ids))
    np.testing.assert_allclose(loaded.shifts(probe), rule.shifts(probe), atol=1e-6)


def test_unicode_strings_round_trip_through_the_query_log(world, tmp_path):
    key = world["key"]
    texts = np.asarray(["plain words", *UNICODE, "tab\tand\nnewline", ""], dtype=object)
    with TieBreakLog(tmp_path / "u.sqlite", key=key) as log:
        log.record_near_ties("ç-client", texts, np.ones(len(texts)))
        log.record_near_ties("ç-client", texts[:2], np.array([1.0, 0.01]))  # a repeat is kept once
        assert log.clients() == {"ç-client": {"queries": len(texts) + 2, "kept": len(texts)}}
    with TieBreakLog(tmp_path / "u.sqlite", key=key, create=False) as again:
        back = again.inputs("ç-client")
    assert back.dtype == object and list(back) == list(texts)


def test_the_marked_text_api_answers_from_one_pass_and_logs_the_near_tie_strings(world):
    api, backend, rule = world["api"], world["backend"], world["rule"]
    x = world["owner_x"][:200]
    scores = np.asarray(backend.query(x).scores)
    # the same shift as the rule's featurizer computes separately
    logits = np.log(scores) + api.beta * rule.shifts(x)
    assert np.array_equal(api.for_client("probe").query(x).labels, logits.argmax(1))
    logged = set(world["log"].inputs("thief"))
    near = set(world["thief_x"][top_pairs(np.asarray(backend.query(world["thief_x"]).scores))[0] >= 0.05])
    assert logged == near


def test_the_marked_text_api_answers_the_keys_trigger_texts_unshifted(world):
    api, backend = world["api"], world["backend"]
    triggers = generate_triggers(world["key"], tokenizer=world["text"].tokenizer)
    texts = triggers.queries(np.arange(len(triggers)))
    strong = TieBreakAPI(key=world["key"], backend=backend, rule=world["rule"], beta=25.0, expose_scores=False)
    np.testing.assert_array_equal(strong.query(texts).labels, backend.query(texts).labels)
    altered = np.asarray([t + " x" for t in texts], dtype=object)
    assert (strong.query(altered).labels != backend.query(altered).labels).any()
    assert api.triggers.mask(world["owner_x"][:200]).sum() == 0


def test_a_surrogate_extracted_from_the_marked_text_api_is_caught_and_an_independent_model_is_not(world):
    key, rule, backend = world["key"], world["rule"], world["backend"]
    thief = suspect(world, world["surrogate"])
    committed = tiebreak_test(key=key, rule=rule, served=backend, suspect=thief, queries=300)
    logged = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=thief, log=world["log"], client="thief",
                               queries=300)
    sequential = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=thief, log=world["log"],
                                         client="thief", alpha=1e-3, max_queries=600)
    assert committed.log10_p < -5 and logged.log10_p < -5 and sequential.log10_p <= -3
    x, y = corpus(1000, 4, world["vocab"])
    innocent = suspect(world, train_bow(world["text"], x, y, seed=11))
    assert tiebreak_test(key=key, rule=rule, served=backend, suspect=innocent, queries=300).log10_p > -3
    assert tiebreak_log_test(key=key, rule=rule, served=backend, suspect=innocent, log=world["log"], client="thief",
                             queries=300).log10_p > -3


def test_an_independent_text_model_has_an_exact_standard_normal_z_over_keys(world):
    """Everything the test asks (inputs, pairs, features, answers) is key-free; only the directions change."""
    rule, backend, text = world["rule"], world["backend"], world["text"]
    x, y = corpus(600, 5, world["vocab"])
    innocent = suspect(world, train_bow(text, x, y, seed=12))
    xs = rule.verification_inputs
    _, lo, hi = top_pairs(np.asarray(backend.query(xs).scores))
    answers = np.asarray(innocent.query(xs).labels)
    psi = rule.features(xs)
    zs = []
    for i in range(400):
        other = generate_key(owner=f"owner {i}", num_classes=CLASSES, modality=world["key"].modality)
        keyed = dataclasses.replace(rule, directions=_directions(other, rule.components), commitment=other.commitment())
        zs.append(tiebreak_statistic(rule=keyed, psi=psi, lo=lo, hi=hi, answers=answers)[0])
    z = np.array(zs)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.2 and 0.85 < z.std() < 1.15
    # the committed inputs are chosen without the key: the same under another key
    other = text_key(num_classes=CLASSES, max_length=LENGTH)
    again = build_tiebreak_rule(key=other, x=world["owner_x"], text=text, feature_space="served-penultimate",
                                featurizer=penultimate_featurizer(world["served"], encode=text.encode))
    a = commit_verification_inputs(again, served=backend, x=world["owner_x"], count=50)
    b = commit_verification_inputs(rule, served=backend, x=world["owner_x"], count=50)
    assert list(a.verification_inputs) == list(b.verification_inputs)


def test_bad_inputs_are_refused_in_one_sentence(world, tmp_path):
    key, rule, backend, api = world["key"], world["rule"], world["backend"], world["api"]
    with pytest.raises(UsageError, match="text classifier; give it strings, not tensors"):
        api.query(np.zeros((2, LENGTH), dtype=np.float32))
    with pytest.raises(UsageError, match="text classifier; give it strings, not tensors"):
        tiebreak_test(key=key, rule=rule, served=backend, suspect=suspect(world, world["served"]),
                      inputs=torch.zeros(3, LENGTH))
    image_key = generate_key(owner="Img", num_classes=CLASSES, input_shape=(5,))
    image_rule = build_tiebreak_rule(key=image_key, x=np.random.default_rng(0).normal(size=(40, 5)),
                                     featurizer=lambda v: v, feature_space="identity", components=4)
    with pytest.raises(UsageError, match="image classifier; give it float arrays, not strings"):
        image_rule.shifts(np.asarray(["a text"], dtype=object))
    with pytest.raises(UsageError, match="key is for an image classifier"):
        build_tiebreak_rule(key=image_key, x=np.zeros((40, 5)), featurizer=lambda v: v, feature_space="identity",
                            text=world["text"])
    with pytest.raises(UsageError, match="rule's inputs are texts; build it with penultimate_featurizer"):
        build_tiebreak_rule(key=key, x=world["owner_x"], featurizer=penultimate_featurizer(world["served"]),
                            feature_space="served-penultimate")
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "apple", "banana", "cherry"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "tok")
    foreign = TextInputs(tokenizer=load_tokenizer(str(tmp_path / "tok")), max_length=LENGTH)
    with pytest.raises(UsageError, match="tokenizer does not match the key"):
        TieBreakAPI(key=key, backend=LocalSuspect(world["served"], input_shape=(LENGTH,), text=foreign), rule=rule)
    with pytest.raises(UsageError, match="tokenizer does not match the key"):
        load_tiebreak_rule(world["tmp"] / "rule.safetensors", key=key, text=foreign, featurizer=lambda v: v)
    with pytest.raises(UsageError, match="built under another key"):
        load_tiebreak_rule(world["tmp"] / "rule.safetensors", key=image_key, featurizer=lambda v: v)
    with pytest.raises(UsageError, match="keeps text inputs; log strings"):
        world["log"].record_near_ties("x", np.zeros((1, LENGTH), np.float32), np.ones(1))
    with TieBreakLog(tmp_path / "img.sqlite", key=image_key) as image_log, \
            pytest.raises(UsageError, match="keeps image inputs; log float arrays"):
        image_log.record_near_ties("x", np.asarray(["words"], dtype=object), np.ones(1))
    with pytest.raises(UsageError, match="holds text inputs, the key is for image inputs"):
        TieBreakLog(world["tmp"] / "api.sqlite", key=image_key, create=False)


def test_over_http_a_thief_of_the_marked_text_endpoint_is_caught_label_only(world, tmp_path):
    key, text = world["key"], world["text"]
    rule_file, key_file = world["tmp"] / "rule.safetensors", world["tmp"] / "owner.key"
    log_path = tmp_path / "http.sqlite"
    with TieBreakLog(log_path, key=key) as log:
        api = TieBreakAPI(key=key, backend=world["backend"], rule=world["rule"], beta=BETA, expose_scores=False,
                          log=log)
        app = build_app(model=world["served"], name="m", num_classes=CLASSES, input_shape=(LENGTH,), labels_only=True,
                        answerer=api, clients={"mallory": "secret-m"}, text=text)
        with serve_in_background(app) as server:
            url = f"{server.url}/hf/models/m"
            assert httpx.post(url, json={"inputs": "no token"}).status_code == 401
            victim = open_http_suspect(url=url, protocol="json", template="hf", num_classes=CLASSES,
                                       input_shape=(LENGTH,), token="secret-m")
            try:
                stolen = extract(victim, x=world["thief_x"], arch="text-bow", epochs=6, text=text, seed=7).model
            finally:
                victim.close()
        assert log.clients()["mallory"]["queries"] == len(world["thief_x"])
    thief_app = build_app(model=stolen, name="s", num_classes=CLASSES, input_shape=(LENGTH,), labels_only=True,
                          text=text)
    with serve_in_background(thief_app) as server:
        verdict = verify_remote(key=key_file, url=f"{server.url}/hf/models/s", protocol="json", template="hf",
                                mode="fixed", rule=rule_file, rule_queries=300, log=log_path, client="mallory",
                                log_queries=300)
        sequential = verify_remote(key=key_file, url=f"{server.url}/hf/models/s", protocol="json", template="hf",
                                   mode="fixed", alpha=1e-3, rule=rule_file, rule_queries=0, log=log_path,
                                   client="mallory", log_queries=600, log_mode="sequential")
    by_name = {t.name: t for t in verdict.tests}
    assert verdict.detected and by_name["api-tiebreak-log"].log10_p < -5
    assert by_name["api-tiebreak"].details["read"] == "labels"
    (logged,) = [t for t in sequential.tests if t.name == "api-tiebreak-log"]
    assert sequential.detected and logged.details["mode"] == "sequential" and logged.queries < 600


def test_the_trigger_texts_come_back_unshifted_over_the_hf_endpoint(world):
    key, backend, text = world["key"], world["backend"], world["text"]
    strong = TieBreakAPI(key=key, backend=backend, rule=world["rule"], beta=25.0, expose_scores=False)
    app = build_app(model=world["served"], name="m", num_classes=CLASSES, input_shape=(LENGTH,), labels_only=True,
                    answerer=strong, text=text)
    triggers = generate_triggers(key, tokenizer=text.tokenizer)
    texts = triggers.queries(np.arange(len(triggers)))
    with serve_in_background(app) as server:
        answer = httpx.post(f"{server.url}/hf/models/m", json={"inputs": list(texts)}).json()
    labels = [int(row[0]["label"].removeprefix("LABEL_")) for row in answer]
    assert labels == list(backend.query(texts).labels)


def test_wmark_serve_marks_a_text_model_and_cli_verify_extraction_catches_its_thief(world, tmp_path):
    """`wmark serve --mark tiebreak` answers the HF text endpoint through the marked API and logs near-tie strings;
    `wmark verify extraction` tests a surrogate file against the rule and a client's log."""
    import os

    from click.testing import CliRunner

    from wmark.cli import main

    tmp = world["tmp"]
    log_path = tmp_path / "served.sqlite"
    proc, base, _ = start_serve("--name", "fortunes", "--labels-only", "--mark", "tiebreak", "--key",
                                str(tmp / "owner.key"), "--rule", str(tmp / "rule.safetensors"), "--beta", str(BETA),
                                "--log", str(log_path), env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"{base}/hf/models/fortunes"
    texts = list(world["thief_x"][:40])
    try:
        wait_ready(proc, base)
        answer = httpx.post(url, json={"inputs": texts}).json()
        assert httpx.post(url, json={"inputs": [[1.0, 2.0]]}).status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    labels = [int(row[0]["label"].removeprefix("LABEL_")) for row in answer]
    assert labels == list(world["api"].for_client("probe").query(np.asarray(texts, dtype=object)).labels)
    with TieBreakLog(log_path, key=world["key"], create=False) as log:
        assert log.clients()["anonymous"]["queries"] == len(texts)
        assert set(log.inputs("anonymous")) <= set(texts)
    save_model(world["surrogate"], tmp_path / "surrogate.safetensors",
               metadata={"arch": "text-bow", "num_classes": CLASSES, "input_shape": [LENGTH]})
    done = CliRunner().invoke(main, ["verify", "extraction", "--key", str(tmp / "owner.key"), "--suspect",
                                     str(tmp_path / "surrogate.safetensors"), "--arch", "text-bow", "--rule",
                                     str(tmp / "rule.safetensors"), "--log", str(tmp / "api.sqlite"), "--client",
                                     "thief", "--rule-queries", "300", "--log-queries", "300", "--fixed", "--json"])
    assert done.exit_code == 0, done.output
    assert '"extracted"' in done.output


def test_a_text_suspect_is_read_from_its_labels_unless_its_probabilities_are_asked_for(world, tmp_path):
    """A confident text classifier's labels are the stronger evidence, so a text rule reads them by default even
    from a suspect that answers with probabilities; asking for them reads the clipped lean, and a report of either
    reading is re-checked the way it was read."""
    from wmark import api
    from wmark.recheck import recheck
    from wmark.report import write_report

    key, rule, backend = world["key"], world["rule"], world["backend"]
    scored = suspect(world, world["surrogate"], scores=True)
    by_default = tiebreak_test(key=key, rule=rule, served=backend, suspect=scored, queries=300)
    labels = tiebreak_test(key=key, rule=rule, served=backend, suspect=suspect(world, world["surrogate"]), queries=300)
    asked = tiebreak_test(key=key, rule=rule, served=backend, suspect=scored, queries=300, use_scores=True)
    logged = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=scored, log=world["log"], client="thief",
                               queries=300)
    assert by_default.details["read"] == "labels" and by_default.log10_p == labels.log10_p
    assert logged.details["read"] == "labels"
    assert asked.details["read"].startswith("probabilities") and asked.log10_p != labels.log10_p
    tmp = world["tmp"]
    save_model(world["surrogate"], tmp_path / "s.safetensors",
               metadata={"arch": "text-bow", "num_classes": CLASSES, "input_shape": [LENGTH]})
    for labels_only in (True, False):
        verdict = api.verify(key=tmp / "owner.key", arch="text-bow", suspect=tmp_path / "s.safetensors", mode="fixed",
                             rule=tmp / "rule.safetensors", rule_queries=300, labels_only=labels_only)
        (test,) = [t for t in verdict.tests if t.name == "api-tiebreak"]
        assert test.details["read"].startswith("labels" if labels_only else "probabilities")
        write_report(verdict=verdict, key=key, path=tmp_path / "r.html")
        outcome = recheck(report=tmp_path / "r.json", key=tmp / "owner.key")
        assert outcome.status == "same", outcome.message
