"""The extraction monitor's signals, calibration and profile files, and the policy file, on synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wmark.errors import UsageError
from wmark.monitor.api import monitor_report
from wmark.monitor.gate import STATE_FORMAT, Gate
from wmark.monitor.monitor import (
    ExtractionMonitor,
    calibrate,
    first_alarm,
    load_profile,
    run_stream,
    save_profile,
)
from wmark.monitor.policy import Policy, RateLimit, TokenBucket, load_policy, parse_policy
from wmark.monitor.signals import ClientState, MonitorConfig, fit_feature_map, shapiro_statistic

CONFIG = MonitorConfig(window=64, store=256, check_every=16, min_queries=32)
D = 16


def natural(n: int, seed: int) -> np.ndarray:
    """Inputs near a 4-dimensional subspace of R^16, like natural images near their manifold."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(4, D))
    return (rng.normal(size=(n, 4)) @ basis + 0.01 * rng.normal(size=(n, D))).astype(np.float32)


def confident(n: int, classes: list[int], seed: int, c: int = 4) -> np.ndarray:
    """Probabilities of a model that is sure of one of ``classes`` for every query."""
    rng = np.random.default_rng(seed)
    probs = np.full((n, c), 0.02)
    probs[np.arange(n), rng.choice(classes, size=n)] = 1 - 0.02 * (c - 1)
    return probs


def chain(n: int, seed: int, *, step: float = 0.05) -> np.ndarray:
    """JBDA-like: a few natural seeds, then every query a small perturbation of an earlier one."""
    rng = np.random.default_rng(seed)
    out = list(natural(8, seed))
    while len(out) < n:
        out.append(out[int(rng.integers(len(out)))] + step * np.sign(rng.normal(size=D)).astype(np.float32))
    return np.asarray(out)


def state_after(x: np.ndarray, probs: np.ndarray, fmap) -> dict[str, float]:
    state = ClientState(dim=fmap.dim, num_classes=probs.shape[1], config=CONFIG, near_radius=fmap.near_radius,
                        ood_radius=fmap.ood_radius)
    signals = None
    for i in range(0, len(x), 16):
        signals = state.observe(*fmap.transform(x[i:i + 16]), probs[i:i + 16]) or signals
    assert signals is not None
    return signals


@pytest.fixture(scope="module")
def fmap():
    return fit_feature_map(x=natural(2000, 0), dim=4)


def test_shapiro_flags_perturbation_chain_not_gaussian_natural_queries(fmap):
    # PRADA: natural queries give roughly normal nearest distances; seeds each followed by tiny
    # perturbations give a two-humped set (one large distance per seed, many tiny ones).
    rng = np.random.default_rng(3)
    seeds = natural(40, 4)
    mixed = np.concatenate([np.concatenate([s[None], s + 0.02 * rng.normal(size=(4, D))]) for s in seeds])
    honest = state_after(natural(200, 5), confident(200, [0, 1], 0), fmap)
    thief = state_after(mixed.astype(np.float32), confident(200, [0, 1], 0), fmap)
    assert honest["prada"] < 0.1
    assert thief["prada"] > 0.3
    assert shapiro_statistic(np.ones(50)) == 1.0 and shapiro_statistic(np.arange(5.0)) == 1.0


@pytest.mark.parametrize("dim", [0, -1])
def test_a_feature_dimension_below_1_is_refused(dim):
    """--dim 0 crashed with an IndexError (exit 3) and --dim -1 silently kept all directions but the last."""
    with pytest.raises(UsageError, match=rf"^The reduced feature dimension \(--dim\) must be at least 1, got {dim}.$"):
        fit_feature_map(x=natural(200, 0), dim=dim)


@pytest.mark.parametrize("x, message", [
    (natural(7, 0), r"^Fitting the monitor's feature space with dimension 4 needs at least 8 natural inputs, got 7.$"),
    (np.ones((100, D)), r"^The natural inputs the monitor's feature space is fitted on are all the same input"),
])
def test_too_few_or_identical_natural_inputs_are_refused(x, message):
    """Too few inputs gave NaN or infinite radii silently (every query a near duplicate); identical ones an IndexError."""
    with pytest.raises(UsageError, match=message):
        fit_feature_map(x=x, dim=4)


@pytest.mark.parametrize("field, value, message", [
    ("store", 0, r"^The monitor's store must be an integer of at least 1, not 0.$"),
    ("window", 0, r"^The monitor's window must be"), ("check_every", 2.5, r"^The monitor's check_every must be"),
    ("near_tie_ratio", 0.0, r"^The monitor's near_tie_ratio must be in \(0, 1\], not 0.0.$"),
])
def test_window_settings_that_make_no_sense_are_refused(field, value, message):
    """An empty store or window crashed the first request (IndexError, ValueError); a ratio of 0 made every query a
    near tie."""
    with pytest.raises(UsageError, match=message):
        MonitorConfig(**{field: value})


@pytest.mark.parametrize("n", [20, 57, 256])
def test_shapiro_statistic_matches_scipy(n):
    from scipy import stats

    rng = np.random.default_rng(n)
    for sample in (rng.normal(size=n), rng.exponential(size=n), np.concatenate([rng.normal(size=n - 5), [9.0] * 5])):
        assert shapiro_statistic(sample) == pytest.approx(stats.shapiro(sample).statistic, abs=2e-3)


def test_near_duplicates_ood_coverage_and_near_ties(fmap):
    honest = state_after(natural(200, 6), confident(200, [1], 1), fmap)
    jbda = state_after(chain(200, 7), confident(200, [1], 1), fmap)
    noise = state_after(np.random.default_rng(8).uniform(-3, 3, size=(200, D)).astype(np.float32),
                        confident(200, [1], 1), fmap)
    broad = state_after(natural(200, 9), confident(200, [0, 1, 2, 3], 2), fmap)
    assert honest["near_dup"] <= 0.05 and jbda["near_dup"] > 0.8
    assert honest["ood"] <= 0.05 and noise["ood"] > 0.9
    assert honest["coverage"] == pytest.approx(0.25) and broad["coverage"] > 0.95
    ties = np.tile([0.45, 0.40, 0.1, 0.05], (64, 1))
    assert state_after(natural(64, 10), ties, fmap)["near_tie"] == 1.0
    assert honest["near_tie"] == 0.0


def test_repeats_are_not_near_duplicates_and_memory_is_bounded(fmap):
    x = natural(100, 11)
    stream = x[np.random.default_rng(0).integers(100, size=3000)]
    state = ClientState(dim=4, num_classes=4, config=CONFIG, near_radius=fmap.near_radius, ood_radius=fmap.ood_radius)
    for i in range(0, 3000, 16):
        state.observe(*fmap.transform(stream[i:i + 16]), confident(len(stream[i:i + 16]), [0], 0))
    assert state.repeats >= 2900 and state.signals["near_dup"] == 0.0
    big = natural(3000, 12)
    for i in range(0, 3000, 64):
        state.observe(*fmap.transform(big[i:i + 64]), confident(len(big[i:i + 64]), [0], 0))
    assert state.stored == CONFIG.store and state.store.shape == (CONFIG.store, 4) and len(state.dmin) == CONFIG.window


def honest_streams(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(natural(400, int(rng.integers(1 << 30))), confident(400, list(rng.choice(4, 2, replace=False)), i))
            for i in range(n)]


def test_with_exact_keys_only_the_same_input_is_a_repeat_and_an_identical_projection_is_a_near_duplicate():
    """A projection of a bag of tokens can map a copy with one word swapped onto its source: it is no repeat."""
    cfg = MonitorConfig(window=8, store=2, check_every=1, min_queries=1)
    feats, residual, probs = np.zeros((4, 2), np.float32), np.zeros(4, np.float32), np.tile([0.9, 0.1], (4, 1))
    by_radius = ClientState(dim=2, num_classes=2, config=cfg, near_radius=0.5)
    by_radius.observe(feats, residual, probs)
    assert by_radius.repeats == 3 and not by_radius.near.any()
    exact = ClientState(dim=2, num_classes=2, config=cfg, near_radius=0.5)
    exact.observe(feats, residual, probs, [b"a", b"b", b"a", b"c"])
    assert exact.repeats == 1 and exact.near[:4].tolist() == [False, True, False, True]
    exact.observe(feats[:2], residual[:2], probs[:2], [b"a", b"c"])  # a left the store of 2 (b, c), c did not
    assert exact.repeats == 2 and exact.known == {b"c", b"a"}


def test_calibration_keeps_honest_streams_quiet_and_flags_thieves(fmap, tmp_path):
    profile = calibrate(feature_map=fmap, streams=honest_streams(30, 0), num_classes=4, target_rate=0.1,
                        config=CONFIG)
    cal = profile.calibration
    assert cal["streams"] == 30 and cal["threshold_streams"] == 20 and cal["false_alarm_bound"] == 0.1
    quiet = [first_alarm(profile, run_stream(profile, x, p))[0] for x, p in honest_streams(20, 1)]
    assert sum(q is not None for q in quiet) <= 4
    at, score, signals = first_alarm(profile, run_stream(profile, chain(400, 2), confident(400, [0], 0)))
    assert at is not None and at <= 64 and score > cal["threshold"] and signals["near_dup"] > 0.5
    save_profile(profile, tmp_path / "p.safetensors")
    again = load_profile(tmp_path / "p.safetensors")
    assert again.calibration == cal and again.config == CONFIG
    np.testing.assert_array_equal(again.feature_map.components, fmap.components)
    few = calibrate(feature_map=fmap, streams=honest_streams(5, 3), num_classes=4, target_rate=0.01, config=CONFIG)
    assert few.calibration["false_alarm_bound"] == pytest.approx(1 / 4)  # too few streams for 1 %: says so
    with pytest.raises(UsageError, match="at least 3 honest streams"):
        calibrate(feature_map=fmap, streams=honest_streams(2, 4), num_classes=4, config=CONFIG)
    with pytest.raises(UsageError, match="not a monitor profile"):
        (tmp_path / "x.safetensors").write_bytes((tmp_path / "p.safetensors").read_bytes().replace(b"profile/1", b"profile/9"))
        load_profile(tmp_path / "x.safetensors")


def test_monitor_latches_one_alarm_per_client(fmap):
    profile = calibrate(feature_map=fmap, streams=honest_streams(12, 5), num_classes=4, target_rate=0.1, config=CONFIG)
    monitor = ExtractionMonitor(profile=profile)
    x = chain(300, 6)
    alarms = [monitor.observe("thief", x[i:i + 15], confident(15, [0], 0)) for i in range(0, 300, 15)]
    raised = [a for a in alarms if a is not None]
    assert len(raised) == 1 and raised[0].client == "thief" and raised[0].to_dict()["event"] == "alarm"
    assert monitor.status()["thief"]["alarm"] is True


@pytest.mark.parametrize("doc, message", [
    ({"defaults": {}}, r"file: has unknown field 'defaults'"),
    ({"default": {"quota": {"per_day": -5}}}, r"default.quota.per_day: must be zero or more, not -5"),
    ({"default": {"quota": {"total": "lots"}}}, r"default.quota.total: must be an integer"),
    ({"default": {"rate": {"queries_per_second": 0}}}, r"queries_per_second: must be positive"),
    ({"default": {"rate": {"burst": 3}}}, r"default.rate: needs \"queries_per_second\""),
    ({"clients": {"mallory": {}}}, r"clients.mallory: names an unknown client; the server's clients are lab, shop"),
    ({"clients": {"shop": {"on_alarm": {"action": "nuke"}}}}, r"on_alarm.action: is \"nuke\"; use one of log"),
    ({"default": {"answer": "probabilities"}}, r"default.answer: is \"probabilities\"; use one of scores"),
    ({"default": {"on_alarm": {"action": "block", "queries_per_second": 1}}}, r"only the \"throttle\" action"),
    ({"default": {"top_k": True}}, r"default.top_k: must be an integer"),
    ([], r"file: must be a JSON object"),
    # JSON integers are unbounded: these crashed with an OverflowError (math.isfinite, the token bucket's float)
    ({"default": {"rate": {"queries_per_second": 10 ** 400}}}, r"queries_per_second: is too large; give at most"),
    ({"default": {"rate": {"queries_per_second": 1, "burst": 10 ** 400}}}, r"default.rate.burst: is too large"),
    ({"default": {"quota": {"per_day": -10 ** 400}}}, r"default.quota.per_day: is too large"),
    # a throttle above the client's own rate was accepted: the alarm loosened the limit it was meant to tighten
    ({"default": {"rate": {"queries_per_second": 1, "burst": 4},
                  "on_alarm": {"action": "throttle", "queries_per_second": 50}}},
     r"default.on_alarm: throttles to 50 queries/s \(burst 50\), which is not below the client's rate of 1 \(burst 4\)"),
    ({"default": {"on_alarm": {"action": "throttle", "queries_per_second": 1, "burst": 64}},
      "clients": {"shop": {"rate": {"queries_per_second": 5, "burst": 8}}}}, r"clients.shop.on_alarm: throttles to 1"),
])
def test_bad_policies_get_one_sentence(doc, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_policy(doc, clients=["shop", "lab"])
    assert str(err.value).count("\n") == 0 and str(err.value).endswith(".")


def test_policy_file_overrides_field_by_field(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"default": {"answer": "top-k", "top_k": 2, "quota": {"per_day": 10}},
                                "clients": {"lab": {"answer": "label", "on_alarm": {"action": "throttle",
                                                                                    "queries_per_second": 0.5}}}}))
    policy = load_policy(path, clients=["shop", "lab"])
    lab = policy.for_client("lab")
    assert (lab.answer, lab.top_k, lab.quota.per_day) == ("label", 2, 10)
    assert lab.on_alarm.action == "throttle" and lab.on_alarm.rate == RateLimit(0.5, 1)
    assert policy.for_client("shop").answer == "top-k"
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UsageError, match="is not valid JSON"):
        load_policy(tmp_path / "bad.json", clients=["shop"])


def test_token_bucket_and_quotas_on_a_fake_clock():
    bucket = TokenBucket(RateLimit(2.0, 4), now=0.0)
    assert bucket.take(4, now=0.0) == 0.0
    assert bucket.take(1, now=0.0) == pytest.approx(0.5)
    assert bucket.take(1, now=0.5) == 0.0
    clock = [86_400 * 100 + 86_000.0]  # 400 s before a UTC midnight
    policy = parse_policy({"default": {"quota": {"per_day": 10, "total": 25}}}, clients=["a"])
    gate = Gate(policy=policy, clients=["a"], clock=lambda: clock[0])
    assert gate.admit("a", 10) is None
    refusal = gate.admit("a", 1)
    assert refusal is not None and (refusal.status, refusal.reason) == (429, "daily-quota")
    assert refusal.headers() == {"Retry-After": "400"}
    clock[0] += 400  # a new UTC day
    assert gate.admit("a", 10) is None
    clock[0] += 86_400
    refusal = gate.admit("a", 6)
    assert refusal is not None and (refusal.status, refusal.reason, refusal.headers()) == (403, "total-quota", {})
    # a rate near zero waits forever: the header says a day rather than fail (math.ceil(inf) was a 500)
    slow = Gate(policy=parse_policy({"default": {"rate": {"queries_per_second": 5e-324}}}, clients=["a"]),
                clients=["a"], clock=lambda: 0.0)
    assert slow.admit("a", 1) is None
    refusal = slow.admit("a", 1)
    assert refusal is not None and refusal.headers() == {"Retry-After": "86400"}
    assert gate.admit("a", 5) is None and gate.admit("a", 11).status == 413
    assert Gate(policy=Policy(), clients=["b"]).answer_mode("b") == ("scores", 3)


def test_state_file_keeps_quotas_and_alarms_across_restarts(fmap, tmp_path):
    profile = calibrate(feature_map=fmap, streams=honest_streams(12, 7), num_classes=4, target_rate=0.1, config=CONFIG)
    policy = parse_policy({"default": {"quota": {"total": 1000}, "on_alarm": {"action": "block"}}},
                          clients=["shop", "thief"])
    state, log = tmp_path / "state.json", tmp_path / "alarms.jsonl"
    gate = Gate(policy=policy, clients=["shop", "thief"], monitor=ExtractionMonitor(profile=profile),
                alarm_log=log, state_path=state)
    x = chain(32, 8)
    for i in (0, 16):  # the first check, at 32 queries, raises the alarm
        assert gate.admit("thief", 16) is None
        gate.after_answer("thief", x[i:i + 16], confident(16, [0], 0))
    assert gate.admit("thief", 1).reason == "blocked"
    assert gate.admit("shop", 40) is None
    gate.close()
    again = Gate(policy=policy, clients=["shop", "thief"], state_path=state)
    assert again.admit("thief", 1).reason == "blocked"
    assert again.admit("shop", 961).reason == "total-quota" and again.admit("shop", 960) is None
    assert json.loads(log.read_text())["client"] == "thief"
    state.write_text("[]")
    with pytest.raises(UsageError, match="is not a wmark state file"):
        Gate(policy=policy, clients=["shop"], state_path=state)



@pytest.mark.parametrize("record", [{"queries_total": "x"}, {"queries_total": None}, {"day": 1e400},
                                    {"queries_today": -50}, {"alarm": "yes"}, {"alarm": [1, 2]}, {"requests": -1},
                                    {"refusals": [1]}, {"refusals": {"rate": "2"}}])
def test_a_hand_edited_state_record_is_refused_in_one_sentence(tmp_path, record):
    """Each of these crashed the server's start in int() or dict() (exit 3, "unexpected ValueError")."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"format": STATE_FORMAT, "clients": {"shop": record}}))
    with pytest.raises(UsageError, match=r"has an invalid record for client 'shop' .*; fix it or move the file away"):
        Gate(policy=Policy(), clients=["shop"], state_path=state)


def test_a_state_file_of_another_format_version_says_so(tmp_path):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"format": "wmark-monitor-state/2", "clients": {}}))
    with pytest.raises(UsageError, match=r"is in format wmark-monitor-state/2, which this wmark does not read"):
        Gate(policy=Policy(), clients=["shop"], state_path=state)
    state.write_bytes(b"\x00\x01 not json")
    with pytest.raises(UsageError, match="is not a wmark state file"):
        Gate(policy=Policy(), clients=["shop"], state_path=state)

def test_the_alarm_log_exists_from_the_start_so_a_quiet_server_reports_no_alarms(tmp_path):
    log = tmp_path / "alarms.jsonl"
    Gate(policy=Policy(), clients=["shop"], alarm_log=log).close()
    assert monitor_report(alarm_log=log) == {"clients": {}, "alarms": 0}
    with pytest.raises(UsageError, match="Cannot create the alarm log .* choose a writable path"):
        Gate(policy=Policy(), clients=["shop"], alarm_log=tmp_path / "missing" / "alarms.jsonl")


def test_one_large_request_is_checked_at_every_check_point_it_spans(fmap):
    """A request spanning several check points was checked once, at its end, over its last `window` queries: a
    thief hid 192 chained queries behind 64 natural ones in one request and was never flagged."""
    profile = calibrate(feature_map=fmap, streams=honest_streams(12, 5), num_classes=4, target_rate=0.1, config=CONFIG)
    x = np.concatenate([chain(192, 6), natural(64, 77)])
    p = np.concatenate([confident(192, [0], 0), confident(64, [0, 1], 1)])
    at, _, signals = first_alarm(profile, run_stream(profile, x, p, chunk=1))
    assert at is not None
    monitor = ExtractionMonitor(profile=profile)
    alarm = monitor.observe("thief", x, p)
    assert alarm is not None and alarm.queries == at and alarm.signals == pytest.approx(signals, abs=1e-5)
    assert monitor.latest("thief")[1] == pytest.approx(run_stream(profile, x, p, chunk=1)[-1][1], abs=1e-5)


def test_an_alarm_restored_from_the_state_file_is_not_raised_and_logged_again(fmap, tmp_path):
    """The monitor's latch lived only in memory: after a restart the same client's next check raised a second
    alarm, wrote a second log line and replaced the saved alarm, though an alarm is raised once per client."""
    profile = calibrate(feature_map=fmap, streams=honest_streams(12, 7), num_classes=4, target_rate=0.1, config=CONFIG)
    policy = parse_policy({"default": {"on_alarm": {"action": "label-only"}}}, clients=["thief"])
    state, log = tmp_path / "state.json", tmp_path / "alarms.jsonl"
    for _ in range(2):
        gate = Gate(policy=policy, clients=["thief"], monitor=ExtractionMonitor(profile=profile), alarm_log=log,
                    state_path=state)
        x = chain(64, 8)
        alarms = [gate.after_answer("thief", x[i:i + 16], confident(16, [0], 0)) for i in range(0, 64, 16)]
        gate.close()
    assert alarms == [None] * 4
    assert len(log.read_text().splitlines()) == 1
    assert json.loads(state.read_text())["clients"]["thief"]["alarm"]["queries"] == 32


def test_requests_and_refusals_survive_a_restart_like_the_query_counts(tmp_path):
    """Only the query counts were read back: after a restart the state file (and `wmark monitor report`) showed
    a client's requests and refusals since the restart beside its queries since the start."""
    policy = parse_policy({"default": {"quota": {"total": 10}}}, clients=["shop"])
    state = tmp_path / "state.json"
    for _ in range(2):
        gate = Gate(policy=policy, clients=["shop"], state_path=state)
        assert gate.admit("shop", 5) is None and gate.admit("shop", 6).reason == "total-quota"
        gate.close()
    saved = json.loads(state.read_text())["clients"]["shop"]
    assert (saved["queries_total"], saved["requests"], saved["refusals"]) == (10, 2, {"total-quota": 2})


def test_a_client_missing_from_the_token_file_keeps_its_saved_state(tmp_path):
    """A restart without one client's token dropped its record at the next save: its alarm (a block) and its
    quota counts were gone when the client came back."""
    policy = parse_policy({"default": {"quota": {"total": 10}, "on_alarm": {"action": "block"}}},
                          clients=["shop", "thief"])
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"format": STATE_FORMAT, "clients": {
        "thief": {"queries_total": 4, "alarm": {"event": "alarm", "queries": 32}}}}))
    Gate(policy=policy, clients=["shop"], state_path=state).close()
    back = Gate(policy=policy, clients=["shop", "thief"], state_path=state)
    assert back.admit("thief", 1).reason == "blocked"
    assert json.loads(state.read_text())["clients"]["thief"]["queries_total"] == 4


@pytest.mark.parametrize("record", [[1], "x", {"alarm": "yes"}, {"refusals": ["total-quota"]}])
def test_the_report_refuses_a_hand_edited_state_record_in_one_sentence(tmp_path, record):
    """These crashed `wmark monitor report --state` with an AttributeError (exit 3): the last in its summary."""
    log, state = tmp_path / "alarms.jsonl", tmp_path / "state.json"
    log.write_text("")
    state.write_text(json.dumps({"format": STATE_FORMAT, "clients": {"shop": record}}))
    with pytest.raises(UsageError, match=r"has an invalid record for client 'shop' .*; fix it or move the file away"):
        monitor_report(alarm_log=log, state=state)


@pytest.mark.parametrize("content", [b"\xf0\x9f binary", b'{"client": ["a"]}\n', b'{"client": null}\n'])
def test_the_report_refuses_an_alarm_log_it_cannot_read_in_one_sentence(tmp_path, content):
    """A binary file (a model given by mistake) crashed `wmark monitor report` with a UnicodeDecodeError, a
    non-string client with a TypeError (exit 3)."""
    log = tmp_path / "alarms.jsonl"
    log.write_bytes(content)
    with pytest.raises(UsageError, match=r"(Cannot read .* as text; pass the alarm log `wmark serve` wrote|"
                                         r"Line 1 of .* is not an alarm record)"):
        monitor_report(alarm_log=log)
