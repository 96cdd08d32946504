"""The policy gate and extraction monitor on the text endpoint: real servers on 127.0.0.1, a tiny text model."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from servekit import start_serve, wait_ready

from wmark.cli import main
from wmark.errors import UsageError
from wmark.io import load_tensors, read_metadata, save_model, save_tensors, wmark_metadata
from wmark.models import build_model
from wmark.monitor.gate import Gate
from wmark.monitor.monitor import ExtractionMonitor, calibrate, load_profile, save_profile
from wmark.monitor.policy import parse_policy
from wmark.monitor.signals import MonitorConfig, fit_feature_map
from wmark.monitor.text_features import HashedTokens, monitor_featurizer, read_text_streams, text_keys
from wmark.serve import build_app, serve_in_background
from wmark.suspects import LocalSuspect
from wmark.text import MINILM, TextInputs, load_tokenizer, text_modality, trigger_vocabulary

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLIENTS = {"shop": "tok-shop-secret", "copier": "tok-copier-secret", "noise": "tok-noise-secret"}
CONFIG = MonitorConfig(window=64, store=256, check_every=16, min_queries=32)
COMMON = [
    "the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "he", "she",
    "they", "we", "you", "this", "at", "by", "from", "have", "not", "but", "what", "all", "were", "when",
    "there", "can", "an", "your", "which", "their", "said", "if", "do", "will", "each", "about", "how", "up",
    "out", "them", "then", "many", "some", "so", "these", "would", "other", "into", "has", "more", "her", "two",
    "like", "him", "see", "time", "could", "no", "make", "than", "first", "been", "its", "who", "now", "people",
    "my", "made", "over", "did", "down", "only", "way", "find", "use", "may", "water", "long", "little", "very",
    "after", "words", "called", "just", "where", "most", "know", "get", "through", "back", "much", "before",
    "go", "good", "new", "write", "our", "used", "me", "man", "too", "any", "day", "same", "right", "look",
    "think", "also", "around", "another", "came", "come", "work", "three", "word", "must", "because", "does",
    "part", "even", "place", "well"
]


def sentences(n: int, seed: int) -> list[str]:
    """Texts like natural ones: 6 to 14 common words, drawn with Zipf-like frequencies."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(COMMON) + 1)
    return [" ".join(rng.choice(COMMON, size=rng.integers(6, 15), p=p / p.sum())) for _ in range(n)]


def near_copies(n: int, seed: int) -> list[str]:
    """Copies of four texts, each with one word swapped for a random vocabulary word (a JBDA-style thief)."""
    rng = np.random.default_rng(seed)
    pool, seeds = trigger_vocabulary(load_tokenizer(MINILM)), sentences(4, seed + 1000)
    out = []
    for i in range(n):
        words = seeds[i % 4].split()
        words[rng.integers(len(words))] = pool[rng.integers(len(pool))]
        out.append(" ".join(words))
    return out


def random_strings(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    pool = trigger_vocabulary(load_tokenizer(MINILM))
    return [" ".join(pool[j] for j in rng.integers(len(pool), size=rng.integers(6, 13))) for _ in range(n)]


@pytest.fixture(scope="module")
def text() -> TextInputs:
    return TextInputs(tokenizer=load_tokenizer(MINILM), max_length=32)


@pytest.fixture(scope="module")
def model():
    return build_model("text-bow", num_classes=4, input_shape=(32,), seed=0).eval()


@pytest.fixture(scope="module")
def profile(model, text):
    hashed = HashedTokens(text.tokenizer)
    served = LocalSuspect(model, input_shape=(32,), text=text)
    fmap = fit_feature_map(x=hashed(sentences(600, 0)), dim=8)
    texts = [sentences(160, seed) for seed in range(1, 10)]
    streams = [(hashed(s), served.query(np.asarray(s, dtype=object)).scores) for s in texts]
    # An untrained model's probabilities say nothing about the client (every answer is a near tie), so only the
    # signals of the inputs vote here.
    calibrated = calibrate(feature_map=fmap, streams=streams, num_classes=4, target_rate=0.1, config=CONFIG,
                           signals=("prada", "near_dup", "ood"), keys=[text_keys(s) for s in texts])
    record = {"name": MINILM, "vocab_sha256": text_modality(tokenizer=text.tokenizer, name=MINILM,
                                                            max_length=32)["tokenizer"]["vocab_sha256"]}
    return dataclasses.replace(calibrated, text=hashed.spec(record))


def post(http: httpx.Client, who: str, texts: list[str]) -> httpx.Response:
    return http.post("/hf/models/m", json={"inputs": texts}, headers={"Authorization": f"Bearer {CLIENTS[who]}"})


def app_with(model, text, policy: dict, **gate_args):
    gate = Gate(policy=parse_policy(policy, clients=list(CLIENTS)), clients=list(CLIENTS), **gate_args)
    return build_app(model=model, name="m", num_classes=4, input_shape=(32,), clients=CLIENTS, gate=gate, text=text)


def test_hashed_tokens_are_repeats_for_the_same_text_and_near_for_one_swapped_word(text):
    hashed = HashedTokens(text.tokenizer)
    one, again, swapped, other = hashed(["the cat sat on the mat", "the cat sat on the mat", "the dog sat on the mat",
                                         "stocks fell sharply in early trading"])
    assert np.array_equal(one, again) and np.linalg.norm(one) == pytest.approx(1.0)
    assert 0 < np.linalg.norm(one - swapped) < np.linalg.norm(one - other)
    assert not hashed([""]).any() and hashed([]).shape == (0, 1024)
    with pytest.raises(UsageError, match="need an integer of at least 2 buckets, not 1"):
        HashedTokens(text.tokenizer, 1)


def test_the_monitor_flags_near_copies_and_random_strings_but_not_an_honest_client(model, text, profile, tmp_path):
    log = tmp_path / "alarms.jsonl"
    monitor = ExtractionMonitor(profile=profile)
    app = app_with(model, text, {"default": {"on_alarm": {"action": "label-only"}}}, monitor=monitor, alarm_log=log)
    fresh = sentences(80, 50)
    honest = [t for pair in zip(fresh, fresh) for t in pair]  # every text sent twice: repeats, not near duplicates
    streams = {"shop": honest, "copier": near_copies(160, 51), "noise": random_strings(160, 52)}
    shapes: dict[str, list[int]] = {who: [] for who in CLIENTS}
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(0, 160, 8):
            for who, texts in streams.items():
                r = post(http, who, texts[i:i + 8])
                assert r.status_code == 200
                shapes[who].append(len(r.json()[0]))
        metrics = http.get("/metrics").text
    assert set(shapes["shop"]) == {4}  # never flagged: every class's score throughout
    for who in ("copier", "noise"):
        first = shapes[who].index(1)
        assert 2 <= first <= 6 and set(shapes[who][first:]) == {1}
    alarms = {a["client"]: a for a in map(json.loads, log.read_text().splitlines())}
    assert set(alarms) == {"copier", "noise"}
    assert alarms["copier"]["signals"]["near_dup"] > 0.5 and alarms["noise"]["signals"]["ood"] > 0.5
    status = monitor.status()
    assert status["shop"]["repeats"] == 80 and status["shop"]["signals"]["near_dup"] == 0.0
    assert 'wmark_monitor_alarm{client="shop"} 0.0' in metrics and 'wmark_monitor_alarm{client="copier"} 1.0' in metrics
    assert not any(token in log.read_text() + metrics for token in CLIENTS.values())


def test_a_shuffled_copy_is_a_near_duplicate_and_only_an_identical_resend_is_a_repeat(model, text, profile):
    originals = sentences(16, 70)
    rng = np.random.default_rng(71)
    shuffled = []
    for t in originals:
        words = t.split()
        while " ".join(words) == t:  # the same bag of tokens in another order: a copy a thief might send
            words = list(rng.permutation(t.split()))
        shuffled.append(" ".join(words))
    assert len(set(originals)) == 16 and not set(originals) & set(shuffled)
    monitor = ExtractionMonitor(profile=profile)
    with serve_in_background(app_with(model, text, {}, monitor=monitor)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        codes = [post(http, "shop", texts).status_code for texts in (originals, shuffled, originals)]
    status = monitor.status()["shop"]
    assert codes == [200] * 3 and status["queries"] == 48
    assert status["repeats"] == 16  # the re-sent originals; the shuffled copies counted as repeats too
    assert status["signals"]["near_dup"] >= 16 / 48  # each shuffled copy lies at distance 0 from its original
    with pytest.raises(ValueError, match="needs one key per text"):
        monitor.observe("shop", HashedTokens(text.tokenizer)(originals), np.full((16, 4), 0.25))


def test_the_text_endpoint_refuses_clients_over_budget_and_shapes_answers(model, text):
    app = app_with(model, text, {"clients": {"shop": {"rate": {"queries_per_second": 0.01, "burst": 4},
                                                      "answer": "top-k", "top_k": 2},
                                             "copier": {"quota": {"total": 3}, "answer": "label"}}})
    texts = sentences(6, 60)
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        top = post(http, "shop", texts[:4])
        rate = post(http, "shop", texts[:1])
        label = post(http, "copier", texts[:3])
        quota = post(http, "copier", texts[:1])
        batch = post(http, "shop", texts[:5])
        full = http.post("/hf/models/m", json={"inputs": texts[0]}, headers={"Authorization": "Bearer tok-noise-secret"})
        metrics = http.get("/metrics").text
    assert top.status_code == 200 and [len(row) for row in top.json()] == [2] * 4
    assert top.json()[0][0]["score"] >= top.json()[0][1]["score"]
    assert rate.status_code == 429 and rate.json()["reason"] == "rate" and int(rate.headers["Retry-After"]) >= 99
    assert label.status_code == 200 and all(set(row[0]) == {"label"} and len(row) == 1 for row in label.json())
    assert quota.status_code == 403 and quota.json()["reason"] == "total-quota"
    assert "exceed the total quota of 3" in quota.json()["error"]
    assert batch.status_code == 413 and full.status_code == 200 and len(full.json()) == 4
    assert 'wmark_refusals_total{client="copier",reason="total-quota"} 1.0' in metrics
    assert 'wmark_queries_total{client="shop"} 4.0' in metrics


def test_a_text_longer_than_the_model_takes_is_refused_before_it_counts_against_the_quota(model, text):
    app = app_with(model, text, {"clients": {"copier": {"quota": {"total": 3}}}})
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        long = post(http, "copier", ["word " * 40, "short"])  # 200 characters, within the character limit
        fits = post(http, "copier", sentences(3, 61))
        metrics = http.get("/metrics").text
    assert long.status_code == 400 and "42 tokens long, more than the key's maximum of 32" in long.json()["error"]
    assert fits.status_code == 200 and 'wmark_queries_total{client="copier"} 3.0' in metrics


class CountingTokenizer:
    """A tokenizer that counts its calls (every other attribute read through)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name: str):
        return getattr(self.__dict__["tokenizer"], name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


def test_a_blocked_client_costs_no_tokenization_and_an_admitted_request_one(model, text, profile):
    # the length check tokenized before admission, so a client over its quota or rate still cost the tokenizer; an
    # admitted request was tokenized three times (length check, model, monitor's hashed tokens)
    counting = CountingTokenizer(text.tokenizer)
    app = app_with(model, TextInputs(tokenizer=counting, max_length=32),
                   {"clients": {"copier": {"quota": {"total": 3}},
                                "shop": {"rate": {"queries_per_second": 0.01, "burst": 2}}}},
                   monitor=ExtractionMonitor(profile=profile))
    counting.calls = 0  # the served model was probed with a text when the app was built
    texts = sentences(4, 65)
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        admitted = post(http, "copier", texts[:3])
        assert admitted.status_code == 200 and counting.calls == 1
        over = post(http, "copier", texts[3:])
        assert over.status_code == 403 and over.json()["reason"] == "total-quota" and counting.calls == 1
        assert post(http, "shop", texts[:2]).status_code == 200 and counting.calls == 2
        rate = post(http, "shop", texts[2:3])
        assert rate.status_code == 429 and rate.json()["reason"] == "rate" and counting.calls == 2
        metrics = http.get("/metrics").text
    assert 'wmark_refusals_total{client="copier",reason="total-quota"} 1.0' in metrics  # counted once, not twice
    assert 'wmark_refusals_total{client="shop",reason="rate"} 1.0' in metrics


def test_shared_tokens_give_the_ids_the_tokenizer_gives_with_and_without_special_tokens(text):
    from wmark.text_serving import SharedTokens

    counting = CountingTokenizer(text.tokenizer)
    shared = SharedTokens(counting)
    texts = ["a text [SEP] with a special token typed in", "", "naïve café"]
    for special in (True, False, True):
        assert shared(list(texts), add_special_tokens=special, truncation=False)["input_ids"] == text.tokenizer(
            texts, add_special_tokens=special, truncation=False)["input_ids"]
    assert counting.calls == 1 and shared.pad_token_id == text.tokenizer.pad_token_id
    shared(texts[:1], add_special_tokens=False)
    assert counting.calls == 2  # other texts: asked again


def test_shared_tokens_copy_and_pickle_like_the_tokenizer_they_wrap(text):
    # __getattr__ read self.__dict__["tokenizer"], so the bare instance copy and pickle probe for __setstate__
    # raised KeyError instead of AttributeError
    import copy
    import pickle

    from wmark.text_serving import SharedTokens

    shared = SharedTokens(text.tokenizer)
    for again in (copy.copy(shared), copy.deepcopy(shared), pickle.loads(pickle.dumps(shared))):
        assert again(["a text"], add_special_tokens=True)["input_ids"] == text.tokenizer(["a text"])["input_ids"]
    assert not hasattr(SharedTokens.__new__(SharedTokens), "pad_token_id")


def test_a_text_request_the_model_fails_on_still_costs_quota_as_on_the_v2_endpoint(text):
    """As on the v2 endpoint, a request that reaches the model is counted whatever its outcome (here a 500 for NaN
    outputs); one refused for its texts before the model runs (too many tokens) costs nothing."""
    broken = build_model("text-bow", num_classes=4, input_shape=(32,), seed=0).eval()
    for p in broken.parameters():
        p.data.fill_(float("nan"))
    app = app_with(broken, text, {"clients": {"copier": {"quota": {"total": 2}}}})
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        long = post(http, "copier", ["word " * 40])
        failed = [post(http, "copier", sentences(1, 62 + i)) for i in range(2)]
        over = post(http, "copier", sentences(1, 64))
        metrics = http.get("/metrics").text
    assert long.status_code == 400 and "tokens long" in long.json()["error"]
    assert all(r.status_code == 500 and "NaN or infinite" in r.json()["error"] for r in failed)
    assert over.status_code == 403 and "total quota of 2 (0 left)" in over.json()["error"]
    assert 'wmark_quota_used_total{client="copier"} 2.0' in metrics and "Inputs admitted to the model" in metrics


def test_a_profile_of_the_other_modality_or_tokenizer_is_refused(model, text, profile, tmp_path):
    save_profile(profile, tmp_path / "p.safetensors")
    assert load_profile(tmp_path / "p.safetensors").text == profile.text
    image = dataclasses.replace(profile, text=None)
    with pytest.raises(UsageError, match="calibrated on images but the served model is a text classifier"):
        app_with(model, text, {}, monitor=ExtractionMonitor(profile=image))
    with pytest.raises(UsageError, match="calibrated on texts but the served model takes images"):
        monitor_featurizer(profile, None)
    other = dataclasses.replace(profile, text=dict(profile.text, tokenizer={"name": "x", "vocab_sha256": "0" * 64}))
    with pytest.raises(UsageError, match="calibrated with the tokenizer x, not the served model's"):
        app_with(model, text, {}, monitor=ExtractionMonitor(profile=other))


def test_a_text_profile_has_a_format_older_readers_refuse_and_an_image_profile_keeps_theirs(profile, tmp_path):
    def written_format(path) -> str:
        return wmark_metadata(read_metadata(path))["monitor"]["format"]

    save_profile(profile, tmp_path / "text.safetensors")
    save_profile(dataclasses.replace(profile, text=None), tmp_path / "image.safetensors")
    # what an older wmark accepts: exactly the image format; it read a text profile as a 1024-input image profile
    assert written_format(tmp_path / "text.safetensors") == "wmark-monitor-profile/2"
    assert written_format(tmp_path / "image.safetensors") == "wmark-monitor-profile/1"
    assert load_profile(tmp_path / "text.safetensors").text == profile.text
    assert load_profile(tmp_path / "image.safetensors").text is None
    # a text format without its text features is no profile this version wrote
    tensors, metadata = load_tensors(tmp_path / "text.safetensors")
    doc = wmark_metadata(metadata)["monitor"]
    bare = {k: v for k, v in doc.items() if k != "text"}
    save_tensors(tensors, tmp_path / "bare.safetensors", metadata={"monitor": bare})
    with pytest.raises(UsageError, match="bare.safetensors is not a monitor profile; write one with"):
        load_profile(tmp_path / "bare.safetensors")
    # a text profile in the image format was calibrated with repeats told by its features, not its texts
    save_tensors(tensors, tmp_path / "old.safetensors", metadata={"monitor": dict(doc, format="wmark-monitor-profile/1")})
    with pytest.raises(UsageError, match="old.safetensors is a text profile in an older format, calibrated with other"):
        load_profile(tmp_path / "old.safetensors")


def test_text_streams_are_json_lines_and_a_bad_line_is_named(tmp_path):
    good = tmp_path / "s.jsonl"
    good.write_text('{"stream": "a", "text": "one"}\n{"stream": 2, "text": "two"}\n\n{"stream": "a", "text": "3"}\n')
    assert read_text_streams(good) == [["one", "3"], ["two"]]
    (tmp_path / "bad.jsonl").write_text('{"stream": "a", "text": "one"}\n{"stream": "a", "text": 5}\n')
    with pytest.raises(UsageError, match=r"Line 2 of .*bad.jsonl is not"):
        read_text_streams(tmp_path / "bad.jsonl")


def test_cli_calibrates_on_texts_and_wmark_serve_guards_a_text_model(text, tmp_path):
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    for c, name in enumerate(("art", "food", "law", "work")):
        (fortunes / name).write_text("\n%\n".join(sentences(150, 100 + c)) + "\n")
    weights = tmp_path / "m.safetensors"
    save_model(build_model("text-bow", num_classes=4, input_shape=(32,), seed=1), weights,
               metadata={"arch": "text-bow", "num_classes": 4, "input_shape": [32],
                         "modality": text_modality(tokenizer=text.tokenizer, name=MINILM, max_length=32)})
    streams = tmp_path / "honest.jsonl"
    streams.write_text("".join(json.dumps({"stream": s, "text": t}) + "\n"
                               for s in range(6) for t in sentences(64, 200 + s)))
    done = CliRunner().invoke(main, ["monitor", "calibrate", "--arch", "text-bow", "--weights", str(weights),
                                     "--data", f"fortunes:{fortunes}@owner", "--streams", str(streams), "--dim", "8",
                                     "--target-rate", "0.2", "--out", str(tmp_path / "p.safetensors")])
    assert done.exit_code == 0, done.output
    assert "from 6 honest streams, 384 queries" in done.output
    assert load_profile(tmp_path / "p.safetensors").text["features"] == "hashed-tokens"
    images = CliRunner().invoke(main, ["monitor", "calibrate", "--arch", "text-bow", "--weights", str(weights),
                                       "--data", "digits", "--streams", str(streams), "--out", str(tmp_path / "q")])
    assert images.exit_code == 2 and "is a text classifier; give its owner's texts as --data" in images.stderr
    (tmp_path / "policy.json").write_text(json.dumps({"default": {"quota": {"total": 8}}}))
    proc, url, _ = start_serve("--arch", "text-bow", "--weights", str(weights), "--name", "m", "--policy",
                               str(tmp_path / "policy.json"), "--monitor", str(tmp_path / "p.safetensors"),
                               "--alarm-log", str(tmp_path / "alarms.jsonl"), env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        wait_ready(proc, url)
        codes = [httpx.post(f"{url}/hf/models/m", json={"inputs": sentences(4, 300)}, timeout=30).status_code
                 for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert codes == [200, 200, 403]
