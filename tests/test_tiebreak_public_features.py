"""The tie-break mark reading the public MiniLM encoder's features (``wmark tiebreak build --features public``).

A four-category corpus of MiniLM vocabulary words in fortune's file format (``fortunes:DIR``), a bag-of-words
served model and rules of 8 components over 40 committed texts keep it to seconds; MiniLM loads offline from its
package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats
from textkit import text_key

from wmark import api
from wmark.cli import main
from wmark.contract import model_device
from wmark.data import load_dataset
from wmark.errors import UsageError
from wmark.io import load_tensors, read_metadata, save_model, save_tensors, wmark_metadata
from wmark.keys import generate_key, load_key, save_key
from wmark.marks import open_served
from wmark.models import build_model, model_metadata, penultimate_featurizer
from wmark.recheck import recheck
from wmark.schemes.tiebreak import features as features_module
from wmark.schemes.tiebreak import open_tiebreak_rule, tiebreak_statistic, top_pairs
from wmark.schemes.tiebreak.features import PUBLIC_MINILM, SERVED, public_encoder
from wmark.schemes.tiebreak.rule import _directions
from wmark.suspects import LocalSuspect
from wmark.text import TextInputs, trigger_vocabulary
from wmark.training import make_loader, train_epochs

CLASSES, LENGTH, PER_CLASS = 4, 64, 36
BUILD = ["--references", "none", "--verify-count", "40", "--components", "8"]


def write_corpus(directory, vocab: list[str]) -> None:
    """Four fortune files of texts made of their category's topic words and noise words."""
    r = np.random.default_rng(0)
    pool = r.choice(len(vocab), CLASSES * 10 + 60, replace=False)
    noise = [vocab[i] for i in pool[CLASSES * 10:]]
    directory.mkdir()
    for c in range(CLASSES):
        topic = [vocab[i] for i in pool[c * 10:(c + 1) * 10]]
        texts = [" ".join(r.permutation(list(r.choice(topic, 3)) + list(r.choice(noise, 3)))) for _ in range(PER_CLASS)]
        (directory / f"topic{c}").write_text("\n%\n".join(texts) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A text key over MiniLM's tokenizer, a served bag-of-words model of the corpus, and two rules built through
    the CLI: one from the public encoder's features, one from the served model's (the default)."""
    tmp = tmp_path_factory.mktemp("public")
    key = text_key(num_classes=CLASSES, max_length=LENGTH, tag="tiebreak-public-features")
    save_key(key, tmp / "owner.key")
    text = TextInputs.from_key(key)
    write_corpus(tmp / "fortunes", trigger_vocabulary(text.tokenizer))
    data = f"fortunes:{tmp / 'fortunes'}"
    ds = load_dataset(data)
    served = build_model("text-bow", num_classes=CLASSES, input_shape=(LENGTH,), seed=0)
    train_epochs(served, make_loader(ds.x_train, ds.y_train, batch_size=32, seed=0), epochs=8,
                 optimizer=torch.optim.Adam(served.parameters(), lr=3e-3), device=torch.device("cpu"))
    save_model(served.eval(), tmp / "served.safetensors",
               metadata=model_metadata(arch="text-bow", num_classes=CLASSES, input_shape=(LENGTH,),
                                       modality=key.modality))
    common = ["tiebreak", "build", "--key", str(tmp / "owner.key"), "--arch", "text-bow", "--weights",
              str(tmp / "served.safetensors"), "--data", data, *BUILD]
    runner = CliRunner()
    for name, features in (("public", ["--features", "public"]), ("served", [])):
        res = runner.invoke(main, [*common, "--out", str(tmp / f"rule-{name}.safetensors"), *features])
        assert res.exit_code == 0, res.output
    return {"key": key, "text": text, "data": data, "ds": ds, "tmp": tmp, "served": served}


def reference_features(texts, text: TextInputs) -> np.ndarray:
    """The public encoder's features as the research measured them (benchmarks/text_extraction.py)."""
    model = build_model("minilm-classifier", num_classes=CLASSES, input_shape=(LENGTH,), seed=0).eval()
    return penultimate_featurizer(model, encode=text.encode)(np.asarray(texts, dtype=object))


def test_a_public_rule_records_its_space_and_encoder_and_opens_with_the_encoders_features(world):
    tmp, key, text = world["tmp"], world["key"], world["text"]
    meta = wmark_metadata(read_metadata(tmp / "rule-public.safetensors"))
    assert meta["feature_space"] == PUBLIC_MINILM == "public-encoder:all-MiniLM-L6-v2"
    assert meta["features_digest"] == public_encoder()[1]
    loaded, _ = open_tiebreak_rule(key=key, rule=tmp / "rule-public.safetensors")
    assert loaded.feature_space == PUBLIC_MINILM and loaded.features_digest == meta["features_digest"]
    texts = list(world["ds"].texts_test[:12])
    np.testing.assert_allclose(loaded.featurizer(np.asarray(texts, dtype=object)), reference_features(texts, text),
                               atol=1e-5)
    # the encoder is bound into what a query log records, so a log is read only under the encoder it answered with
    plain = dataclasses.replace(loaded, features_digest="")
    assert loaded.served_digest != plain.served_digest
    assert loaded.content_digest != plain.content_digest


def test_a_served_map_rule_keeps_its_digest_byte_for_byte(world):
    """Logs and transcripts bound before the public map existed must keep verifying under their rules."""
    tmp, key = world["tmp"], world["key"]
    meta = wmark_metadata(read_metadata(tmp / "rule-served.safetensors"))
    assert meta["feature_space"] == SERVED and "features_digest" not in meta
    loaded, _ = open_tiebreak_rule(key=key, rule=tmp / "rule-served.safetensors")
    old = hashlib.sha256(f"{loaded.commitment}|{loaded.model_digest}|".encode())  # the digest as it was computed
    for a in (loaded.mean, loaded.projection):
        arr = np.ascontiguousarray(a, dtype="<f8")
        old.update(f"{arr.shape}|".encode() + arr.tobytes())
    assert loaded.features_digest == "" and loaded.served_digest == old.hexdigest()


def test_the_marked_api_answers_through_the_public_map_and_its_thief_is_verified_and_rechecked(world, tmp_path):
    tmp, key, text, ds = world["tmp"], world["key"], world["text"], world["ds"]
    served = open_served(key=key, mark="tiebreak", rule=tmp / "rule-public.safetensors")
    try:
        rule = served.answerer.rule
        texts = np.asarray(ds.texts_test[:20], dtype=object)
        scores = np.asarray(LocalSuspect(world["served"], input_shape=(LENGTH,), text=text,
                                         expose_scores=True).query(texts).scores)
        shifts = rule.shifts_of(rule.whiten(reference_features(list(texts), text)))
        expected = (np.log(scores) + served.answerer.beta * shifts).argmax(1)
        assert np.array_equal(served.answerer.query(texts).labels, expected)
        # `wmark serve --device` moves the encoder with the served model (the meta device shows it without a GPU)
        served.to("meta")
        assert model_device(served.model).type == model_device(rule.featurizer.model).type == "meta"
    finally:
        served.close()
    out = api.extract(victim_arch=None, victim=None, arch="text-bow", data=f"{world['data']}@attacker",
                      out=tmp_path / "thief.safetensors", key=tmp / "owner.key", mark="tiebreak",
                      rule=tmp / "rule-public.safetensors", log=tmp_path / "api.sqlite", client="thief", epochs=4)
    assert out["params"]["marked_api"] == "tiebreak"
    res = CliRunner().invoke(main, ["verify", "extraction", "--key", str(tmp / "owner.key"), "--suspect",
                                    str(tmp_path / "thief.safetensors"), "--arch", "text-bow", "--rule",
                                    str(tmp / "rule-public.safetensors"), "--log", str(tmp_path / "api.sqlite"),
                                    "--client", "thief", "--rule-queries", "40", "--log-queries", "40", "--fixed",
                                    "--json", "--report", str(tmp_path / "r.html")])
    assert res.exit_code in (0, 1), res.output
    tests = {t["name"]: t for t in json.loads(res.output)["tests"]}
    assert {"api-tiebreak", "api-tiebreak-log"} <= set(tests)
    assert all(np.isfinite(tests[name]["log10_p"]) for name in ("api-tiebreak", "api-tiebreak-log"))
    # the committed-input test is recomputed (the public encoder rebuilt from the rule); a log test never is
    outcome = recheck(report=tmp_path / "r.json", key=tmp / "owner.key")
    rows = {row["name"]: row for row in outcome.tests}
    assert outcome.status == "partial" and not rows["api-tiebreak-log"]["rechecked"], outcome.message
    assert rows["api-tiebreak"]["rechecked"]
    assert rows["api-tiebreak"]["recomputed_log10_p"] == pytest.approx(tests["api-tiebreak"]["log10_p"], abs=1e-9)


def test_a_rule_is_refused_under_another_encoder_or_an_unknown_feature_space(world, tmp_path, monkeypatch):
    tmp, key = world["tmp"], world["key"]
    tensors, raw = load_tensors(tmp / "rule-public.safetensors")
    meta = wmark_metadata(raw)

    def rewrite(name: str, **changes: str) -> str:
        save_tensors(tensors, tmp_path / name, metadata={**meta, **changes})
        return str(tmp_path / name)

    edited = rewrite("edited.safetensors", features_digest="0" * 64)
    with pytest.raises(UsageError, match=r"was built with other public-encoder:all-MiniLM-L6-v2 weights \(digest "
                                         r"000000000000…\) .*; rebuild the rule or install the encoder it was built "
                                         r"with\.$"):
        open_tiebreak_rule(key=key, rule=edited)
    unknown = rewrite("unknown.safetensors", feature_space="public-encoder:bert-large")
    with pytest.raises(UsageError, match=r"reads the feature space public-encoder:bert-large, which wmark cannot "
                                         r"build \(served-penultimate or public-encoder:all-MiniLM-L6-v2\)"):
        open_tiebreak_rule(key=key, rule=unknown)
    # an installed encoder whose weights changed since the rule was built: its features are another map
    real = features_module.public_encoder

    def other_encoder(*, device="cpu"):
        model, _ = real(device=device)
        with torch.no_grad():
            model.encoder.embeddings.word_embeddings.weight[0] += 1.0
        return model, features_module.tensors_digest(
            {n: t for n, t in model.state_dict().items() if not n.startswith("head.")})

    monkeypatch.setattr(features_module, "public_encoder", other_encoder)
    with pytest.raises(UsageError, match="rebuild the rule or install the encoder it was built with"):
        open_tiebreak_rule(key=key, rule=tmp / "rule-public.safetensors")


def test_public_features_are_refused_for_an_image_key_or_another_tokenizer(world, tmp_path):
    image = generate_key(owner="img", num_classes=10, input_shape=(1, 8, 8))
    save_key(image, tmp_path / "image.key")
    weights = tmp_path / "mlp.safetensors"
    save_model(build_model("fmnist-mlp", num_classes=10, input_shape=(1, 8, 8), seed=0), weights,
               metadata=model_metadata(arch="fmnist-mlp", num_classes=10, input_shape=(1, 8, 8)))
    res = CliRunner().invoke(main, ["tiebreak", "build", "--key", str(tmp_path / "image.key"), "--arch", "fmnist-mlp",
                                    "--weights", str(weights), "--data", "digits", "--out",
                                    str(tmp_path / "r.safetensors"), "--features", "public", *BUILD])
    assert res.exit_code == 2 and "the key is an image key; build its rule with the served model's" in res.output
    assert not (tmp_path / "r.safetensors").exists()
    from transformers import BertTokenizerFast

    from wmark.text import load_tokenizer, text_modality

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"word{i}" for i in range(40))]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "tok")
    modality = text_modality(tokenizer=load_tokenizer(str(tmp_path / "tok")), name=str(tmp_path / "tok"),
                             max_length=LENGTH)
    save_key(generate_key(owner="o", num_classes=CLASSES, modality=modality), tmp_path / "other.key")
    with pytest.raises(UsageError, match=r"reads its own tokenizer's ids but the key's tokenizer is .*tok; use "
                                         r"--features served, or a key made with --tokenizer all-MiniLM-L6-v2\.$"):
        api.build_tiebreak(key=tmp_path / "other.key", arch="text-bow", weights=world["tmp"] / "served.safetensors",
                           data=world["data"], out=tmp_path / "t.safetensors", features="public")
    with pytest.raises(UsageError, match=r"^Unknown feature map 'pixels'; use served or public\.$"):
        api.build_tiebreak(key=world["tmp"] / "owner.key", arch="text-bow",
                           weights=world["tmp"] / "served.safetensors", data=world["data"],
                           out=tmp_path / "t.safetensors", features="pixels")


def test_an_independent_model_has_an_exact_standard_normal_z_over_keys_under_the_public_map(world):
    """Inputs, pairs and the public encoder's features are key-free; only the directions change with the key."""
    tmp, key, text, ds = world["tmp"], world["key"], world["text"], world["ds"]
    rule, backend = open_tiebreak_rule(key=load_key(tmp / "owner.key"), rule=tmp / "rule-public.safetensors")
    innocent = build_model("text-bow", num_classes=CLASSES, input_shape=(LENGTH,), seed=9)
    train_epochs(innocent, make_loader(ds.x_test, ds.y_test, batch_size=32, seed=9), epochs=8,
                 optimizer=torch.optim.Adam(innocent.parameters(), lr=3e-3), device=torch.device("cpu"))
    xs = rule.verification_inputs
    _, lo, hi = top_pairs(np.asarray(backend.query(xs).scores))
    answers = np.asarray(LocalSuspect(innocent.eval(), input_shape=(LENGTH,), text=text).query(xs).labels)
    psi = rule.features(xs)
    zs = []
    for i in range(300):
        other = generate_key(owner=f"owner {i}", num_classes=CLASSES, modality=key.modality)
        keyed = dataclasses.replace(rule, directions=_directions(other, rule.components), commitment=other.commitment())
        zs.append(tiebreak_statistic(rule=keyed, psi=psi, lo=lo, hi=hi, answers=answers)[0])
    z = np.array(zs)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.2 and 0.85 < z.std() < 1.15


def test_a_cost_bound_searches_up_to_1_5_under_the_public_map_and_up_to_1_under_the_served_map(world, tmp_path,
                                                                                           monkeypatch):
    # the corpus's test split is small: a bound of every point admits each scale, so the grid's last one is chosen
    monkeypatch.setattr(api, "MIN_COST_INPUTS", 1)
    tmp = world["tmp"]
    for features, top in (("public", 1.5), ("served", 1.0)):
        info = api.build_tiebreak(key=tmp / "owner.key", arch="text-bow", weights=tmp / "served.safetensors",
                                  data=world["data"], out=tmp_path / f"{features}.safetensors", references=[],
                                  verify_count=40, components=8, max_cost=100.0, features=features)
        assert info["honest_cost"]["beta"] == top
        assert open_tiebreak_rule(key=world["key"], rule=tmp_path / f"{features}.safetensors")[0].beta == top
