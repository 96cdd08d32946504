"""Policy, monitor, /metrics and alarm log through real servers on 127.0.0.1 (in-thread and `wmark serve`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket

import httpx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from servekit import start_serve, wait_ready

from wmark.cli import main
from wmark.errors import UsageError
from wmark.io import save_model, save_tensors
from wmark.keys import generate_key
from wmark.models import build_model, penultimate_featurizer
from wmark.monitor.gate import Gate
from wmark.monitor.monitor import ExtractionMonitor, calibrate, save_profile
from wmark.monitor.policy import parse_policy
from wmark.monitor.signals import MonitorConfig, fit_feature_map
from wmark.schemes.querylog import TieBreakLog
from wmark.schemes.tiebreak import TieBreakAPI, build_tiebreak_rule
from wmark.serve import build_app, serve_in_background
from wmark.suspects import LocalSuspect

SHAPE = (1, 4, 4)
CLIENTS = {"shop": "tok-shop-secret", "lab": "tok-lab-secret", "thief": "tok-thief-secret"}
CONFIG = MonitorConfig(window=64, store=256, check_every=16, min_queries=32)


def natural(n: int, seed: int) -> np.ndarray:
    """Inputs near a 3-dimensional subspace of the 16 pixels."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(3, 16)) * 0.1
    return (0.5 + rng.normal(size=(n, 3)) @ basis + 0.002 * rng.normal(size=(n, 16))).astype(np.float32).reshape(
        n, *SHAPE)


@pytest.fixture(scope="module")
def model():
    return build_model("fmnist-mlp", num_classes=10, input_shape=SHAPE, seed=0).eval()


@pytest.fixture(scope="module")
def profile(model):
    fmap = fit_feature_map(x=natural(1000, 0), dim=3)

    def stream(seed: int) -> tuple[np.ndarray, np.ndarray]:
        x = natural(300, seed)
        with torch.no_grad():
            return x, torch.softmax(model(torch.from_numpy(x)), 1).numpy()

    return calibrate(feature_map=fmap, streams=[stream(s) for s in range(1, 13)], num_classes=10, target_rate=0.1,
                     config=CONFIG)


def body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}


def post(http: httpx.Client, who: str, x: np.ndarray) -> httpx.Response:
    return http.post("/v2/models/m/infer", json=body(x), headers={"Authorization": f"Bearer {CLIENTS[who]}"})


def app_with(model, policy: dict, **gate_args):
    gate = Gate(policy=parse_policy(policy, clients=list(CLIENTS)), clients=list(CLIENTS), **gate_args)
    return build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, clients=CLIENTS, gate=gate)


def test_rate_limit_and_quotas_refuse_with_retry_after(model):
    app = app_with(model, {"clients": {"shop": {"rate": {"queries_per_second": 0.01, "burst": 4}},
                                       "lab": {"quota": {"per_day": 6, "total": 100}},
                                       "thief": {"quota": {"total": 3}}}})
    x = natural(8, 1)
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        assert [post(http, "shop", x[i:i + 1]).status_code for i in range(4)] == [200] * 4
        r = post(http, "shop", x[:1])
        assert r.status_code == 429 and r.json()["reason"] == "rate" and int(r.headers["Retry-After"]) >= 99
        assert "rate limit" in r.json()["error"]
        assert post(http, "shop", x[:5]).status_code == 413  # more than the burst: never answerable
        assert post(http, "lab", x[:6]).status_code == 200
        r = post(http, "lab", x[:1])
        assert r.status_code == 429 and r.json()["reason"] == "daily-quota"
        assert 0 < int(r.headers["Retry-After"]) <= 86_400
        assert post(http, "thief", x[:3]).status_code == 200
        r = post(http, "thief", x[:1])
        assert r.status_code == 403 and r.json()["reason"] == "total-quota" and "Retry-After" not in r.headers
        metrics = http.get("/metrics").text
    assert 'wmark_refusals_total{client="shop",reason="rate"} 1.0' in metrics
    assert 'wmark_refusals_total{client="lab",reason="daily-quota"} 1.0' in metrics
    assert 'wmark_queries_total{client="shop"} 4.0' in metrics and 'wmark_queries_total{client="lab"} 6.0' in metrics
    assert not any(token in metrics for token in CLIENTS.values())


class _Summing(torch.nn.Module):
    """Sums its inputs into every logit: infinite, so NaN probabilities, on inputs near FP32's largest value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1, keepdim=True).expand(-1, 10)


def test_a_request_costs_quota_once_the_model_runs_on_it_and_not_when_its_input_is_refused_before():
    """Counting attempts: a request that reaches the model costs quota whatever its outcome (here a 400 for NaN
    outputs), so failures give an extractor no free queries; one refused for its input before costs none."""
    app = app_with(_Summing(), {"clients": {"thief": {"quota": {"total": 3}}}})
    fine, huge, overflow = (np.full((1, *SHAPE), v, dtype=np.float32) for v in (0.5, 1e38, 3e38))
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        beyond = body(huge)
        beyond["inputs"][0]["data"][0] = 1e39  # beyond FP32: refused while decoding, before the gate
        refused_early = [http.post("/v2/models/m/infer", json=beyond, headers={"Authorization": f"Bearer "
                                                                                f"{CLIENTS['thief']}"}),
                         post(http, "thief", np.zeros((1, 1, 2, 2), dtype=np.float32))]
        nan_outputs = [post(http, "thief", overflow) for _ in range(2)]
        answered = post(http, "thief", fine)
        over = post(http, "thief", fine)
        metrics = http.get("/metrics").text
    assert [r.status_code for r in refused_early] == [400, 400]
    assert all(r.status_code == 400 and "NaN or infinite" in r.json()["error"] for r in nan_outputs)
    assert answered.status_code == 200
    assert over.status_code == 403 and "total quota of 3 (0 left)" in over.json()["error"]
    assert 'wmark_quota_used_total{client="thief"} 3.0' in metrics
    assert "# HELP wmark_queries_total Inputs admitted to the model, per client." in metrics
    assert 'wmark_queries_total{client="thief"} 3.0' in metrics and 'wmark_requests_total{client="thief"} 3.0' in metrics


def test_answer_modes_per_client(model):
    app = app_with(model, {"default": {"answer": "scores"},
                           "clients": {"lab": {"answer": "top-k", "top_k": 3}, "thief": {"answer": "label"}}})
    x = natural(5, 2)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        full = post(http, "shop", x).json()["outputs"]
        top = post(http, "lab", x).json()["outputs"]
        label = post(http, "thief", x).json()["outputs"]
        meta = http.get("/v2/models/m", headers={"Authorization": f"Bearer {CLIENTS['lab']}"}).json()
    np.testing.assert_allclose(np.asarray(full[0]["data"]).reshape(5, 10), probs, atol=1e-6)
    assert [o["name"] for o in top] == ["top_k_labels", "top_k_scores"] and top[0]["shape"] == [5, 3]
    labels = np.asarray(top[0]["data"]).reshape(5, 3)
    np.testing.assert_array_equal(labels, np.argsort(-probs, 1)[:, :3])
    np.testing.assert_allclose(np.asarray(top[1]["data"]).reshape(5, 3), np.sort(probs, 1)[:, ::-1][:, :3], atol=1e-6)
    assert label == [{"name": "label", "datatype": "INT64", "shape": [5], "data": probs.argmax(1).tolist()}]
    assert [o["name"] for o in meta["outputs"]] == ["top_k_labels", "top_k_scores"]


def test_labels_only_server_caps_every_policy_answer_mode(model):
    gate = Gate(policy=parse_policy({"default": {"answer": "top-k"}}, clients=list(CLIENTS)), clients=list(CLIENTS))
    app = build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, clients=CLIENTS, gate=gate,
                    labels_only=True)
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        out = post(http, "lab", natural(2, 9)).json()["outputs"]
        meta = http.get("/v2/models/m", headers={"Authorization": f"Bearer {CLIENTS['lab']}"}).json()
    assert [o["name"] for o in out] == ["label"] and [o["name"] for o in meta["outputs"]] == ["label"]


def test_alarm_switches_thief_to_label_only_or_blocks_and_is_logged(model, profile, tmp_path):
    log = tmp_path / "alarms.jsonl"
    app = app_with(model, {"default": {"on_alarm": {"action": "label-only"}},
                           "clients": {"lab": {"on_alarm": {"action": "block"}}}},
                   monitor=ExtractionMonitor(profile=profile), alarm_log=log)
    honest = natural(160, 3)
    noise = np.random.default_rng(4).random((160, *SHAPE), dtype=np.float32)
    names: dict[str, list[str]] = {"shop": [], "thief": []}
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(0, 160, 8):
            for who, x in (("shop", honest), ("thief", noise)):
                r = post(http, who, x[i:i + 8])
                assert r.status_code == 200
                names[who].append(r.json()["outputs"][0]["name"])
        statuses = [post(http, "lab", noise[i:i + 16]).status_code for i in range(0, 160, 16)]
        metrics = http.get("/metrics").text
    assert set(names["shop"]) == {"probabilities"}
    first = names["thief"].index("label")
    # The request that completes the first check (32 queries) is already answered with labels only.
    assert first == 3 and set(names["thief"][first:]) == {"label"}
    assert statuses[:2] == [200, 200] and statuses[-1] == 403
    alarms = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(a["client"], a["action"]) for a in alarms] == [("thief", "label-only"), ("lab", "block")]
    assert alarms[0]["queries"] == 32 and alarms[0]["signals"]["ood"] > 0.9 and alarms[0]["score"] > alarms[0]["threshold"]
    assert set(alarms[0]) == {"event", "client", "queries", "score", "threshold", "signals", "time", "action"}
    assert 'wmark_monitor_alarm{client="thief"} 1.0' in metrics and 'wmark_monitor_alarm{client="shop"} 0.0' in metrics
    assert 'wmark_monitor_signal{client="thief",signal="ood"} 1.0' in metrics
    assert 'wmark_refusals_total{client="lab",reason="blocked"}' in metrics
    assert "wmark_monitor_threshold" in metrics and "# TYPE wmark_queries_total counter" in metrics
    assert not any(token in metrics or token in log.read_text() for token in CLIENTS.values())


def test_throttle_action_and_metrics_token(model, profile):
    gate = Gate(policy=parse_policy({"default": {"on_alarm": {"action": "throttle", "queries_per_second": 0.01,
                                                              "burst": 8}}, "metrics_token_env": "X"},
                                    clients=list(CLIENTS)),
                clients=list(CLIENTS), monitor=ExtractionMonitor(profile=profile), metrics_token="m-secret")
    app = build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, clients=CLIENTS, gate=gate)
    noise = np.random.default_rng(5).random((64, *SHAPE), dtype=np.float32)
    with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        codes = [post(http, "thief", noise[i:i + 8]).status_code for i in range(0, 64, 8)]
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer m-secret"}).status_code == 200
    assert codes[:4] == [200] * 4 and codes[4] == 200 and codes[5] == 429  # burst of 8 left, then throttled


def test_mark_on_alarm_marks_only_the_flagged_client_from_its_alarm_on(model, profile, tmp_path):
    key = generate_key(owner="o", num_classes=10, input_shape=SHAPE)
    rule = build_tiebreak_rule(key=key, x=natural(400, 7), featurizer=penultimate_featurizer(model),
                               feature_space="served-penultimate", components=8)
    backend = LocalSuspect(model, input_shape=SHAPE)
    reference = TieBreakAPI(key=key, backend=backend, rule=rule)
    honest = natural(96, 3)
    noise = np.random.default_rng(4).random((96, *SHAPE), dtype=np.float32)
    with TieBreakLog(tmp_path / "log.sqlite", key=key) as log:
        gate = Gate(policy=parse_policy({"default": {"mark": "on-alarm"}, "clients": {"lab": {"mark": "always"}}},
                                        clients=list(CLIENTS)),
                    clients=list(CLIENTS), monitor=ExtractionMonitor(profile=profile))
        app = build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, clients=CLIENTS, gate=gate,
                        answerer=TieBreakAPI(key=key, backend=backend, rule=rule, log=log))
        got: dict[str, list[np.ndarray]] = {"shop": [], "thief": [], "lab": []}
        with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(0, 96, 8):
                for who, x in (("shop", honest), ("thief", noise), ("lab", honest)):
                    got[who].append(np.asarray(post(http, who, x[i:i + 8]).json()["outputs"][0]["data"]).reshape(8, 10))
        thief_logged, logged_clients = log.inputs("thief"), set(log.clients())
    bare_honest, bare_noise = backend.query(honest).scores, backend.query(noise).scores
    np.testing.assert_allclose(np.concatenate(got["shop"]), bare_honest, atol=1e-6)  # never flagged: never marked
    np.testing.assert_allclose(np.concatenate(got["lab"]), reference.query(honest).scores, atol=1e-6)
    assert logged_clients == {"thief", "lab"}  # the shop's queries were never marked, so never logged
    # The request that completes the first check (32 queries) raises the alarm; the next one is marked.
    thief = np.concatenate(got["thief"])
    np.testing.assert_allclose(thief[:32], bare_noise[:32], atol=1e-6)
    np.testing.assert_allclose(thief[32:], reference.query(noise[32:]).scores, atol=1e-6)
    assert not np.allclose(thief[32:], bare_noise[32:], atol=1e-4)
    marked = {tuple(np.round(v.reshape(-1), 5)) for v in noise[32:]}
    assert all(tuple(np.round(v.reshape(-1), 5)) in marked for v in thief_logged)


def _trickled_head(host: str, port: int, token: str) -> tuple[int, bytes]:
    """Send a request line and headers bearing ``token`` but never the blank line that ends them; return the
    client's own port and all the server sent before it closed the connection."""
    head = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n".encode()
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(head)
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
        return conn.getsockname()[1], got


def test_a_connection_closed_at_the_header_deadline_is_logged_and_counted(model, caplog):
    """A connection closed with HTTP 408 because its head never arrived left no trace: no log line, no metric."""
    gate = Gate(policy=None, clients=list(CLIENTS))
    app = build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, clients=CLIENTS, gate=gate)
    with caplog.at_level(logging.WARNING, logger="wmark.serve"), \
            serve_in_background(app, header_timeout=0.5, on_header_timeout=gate.header_timed_out) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        before = http.get("/metrics").text
        peer, got = _trickled_head(server.host, server.port, CLIENTS["thief"])
        after = http.get("/metrics").text
    assert got.startswith(b"HTTP/1.1 408 ")
    assert "\nwmark_header_timeouts_total 0.0\n" in before and "\nwmark_header_timeouts_total 1.0\n" in after
    line = f"closed the connection from 127.0.0.1:{peer}: its request line and headers did not arrive within 0.5 seconds"
    assert [r.getMessage() for r in caplog.records if r.name == "wmark.serve"] == [line]
    assert CLIENTS["thief"] not in caplog.text


def test_mark_on_alarm_needs_a_served_mark_and_a_monitor(model, profile):
    gate = Gate(policy=parse_policy({"default": {"mark": "on-alarm"}}, clients=list(CLIENTS)), clients=list(CLIENTS),
                monitor=ExtractionMonitor(profile=profile))
    with pytest.raises(UsageError, match="no API-side mark is served; serve with --mark tiebreak"):
        build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, clients=CLIENTS, gate=gate)
    key = generate_key(owner="o", num_classes=10, input_shape=SHAPE)
    rule = build_tiebreak_rule(key=key, x=natural(200, 7), featurizer=penultimate_featurizer(model),
                               feature_space="served-penultimate", components=4)
    unwatched = Gate(policy=parse_policy({"clients": {"shop": {"mark": "on-alarm"}}}, clients=list(CLIENTS)),
                     clients=list(CLIENTS))
    with pytest.raises(UsageError, match="no monitor raises alarms; add --monitor"):
        build_app(model=model, name="m", num_classes=10, input_shape=SHAPE, clients=CLIENTS, gate=unwatched,
                  answerer=TieBreakAPI(key=key, backend=LocalSuspect(model, input_shape=SHAPE), rule=rule))
    with pytest.raises(UsageError, match='Policy default.mark: is "sometimes"; use one of always, on-alarm.'):
        parse_policy({"default": {"mark": "sometimes"}}, clients=list(CLIENTS))


@pytest.mark.parametrize("policy, message", [
    ('{"default": {"quota": {"per_day": -1}}}', "Policy default.quota.per_day: must be zero or more, not -1."),
    ('{"clients": {"eve": {}}}',
     "Policy clients.eve: names an unknown client; the server's clients are lab, shop, thief."),
    ('{"default": {"on_alarm": {"action": "explode"}}}', "Policy default.on_alarm.action: is \"explode\""),
    ('{"default": {"speed": 3}}', "Policy default: has unknown field 'speed'"),
    ('{"default": {"mark": "on-alarm"}}', "The policy marks clients on alarm (\"mark\": \"on-alarm\") but no API-side"),
    ('{"default": {"rate": {"queries_per_second": "fast"}}}',
     "Policy default.rate.queries_per_second: must be a number, not \"fast\"."),
])
def test_bad_policy_files_exit_2_with_one_sentence(model, tmp_path, policy, message):
    weights = tmp_path / "m.safetensors"
    save_model(model, weights, metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps(CLIENTS))
    clients.chmod(0o600)
    (tmp_path / "p.json").write_text(policy)
    result = CliRunner().invoke(main, ["serve", "--arch", "fmnist-mlp", "--weights", str(weights), "--name", "m",
                                       "--port", "0", "--clients", str(clients), "--policy", str(tmp_path / "p.json")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1


def test_wmark_serve_policy_monitor_and_report(model, profile, tmp_path):
    weights = tmp_path / "m.safetensors"
    save_model(model, weights, metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    (tmp_path / "clients.json").write_text(json.dumps(CLIENTS))
    (tmp_path / "clients.json").chmod(0o600)
    (tmp_path / "policy.json").write_text(json.dumps({"default": {"on_alarm": {"action": "block"}},
                                                      "clients": {"shop": {"quota": {"total": 64}}}}))
    save_profile(profile, tmp_path / "profile.safetensors")
    log, state = tmp_path / "alarms.jsonl", tmp_path / "state.json"
    proc, url, _ = start_serve("--arch", "fmnist-mlp", "--weights", str(weights), "--name", "m", "--clients",
                               str(tmp_path / "clients.json"), "--policy", str(tmp_path / "policy.json"), "--monitor",
                               str(tmp_path / "profile.safetensors"), "--alarm-log", str(log), "--monitor-state",
                               str(state), "--header-timeout", "1")
    try:
        wait_ready(proc, url)
        with httpx.Client(base_url=url, timeout=30) as http:
            noise = np.random.default_rng(6).random((64, *SHAPE), dtype=np.float32)
            thief = [post(http, "thief", noise[i:i + 16]).status_code for i in range(0, 64, 16)]
            shop = [post(http, "shop", natural(32, 7)).status_code for _ in range(3)]
            peer, got = _trickled_head("127.0.0.1", int(url.rsplit(":", 1)[1]), CLIENTS["lab"])
            metrics = http.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    assert got.startswith(b"HTTP/1.1 408 ") and "\nwmark_header_timeouts_total 1.0\n" in metrics
    assert f"closed the connection from 127.0.0.1:{peer}: its request line and headers did not arrive" in stderr
    assert not any(t in stderr for t in CLIENTS.values())
    assert thief == [200, 200, 403, 403] and shop == [200, 200, 403]
    code, out = _run_cli("monitor", "report", "--alarm-log", str(log), "--state", str(state), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["alarms"] == 1 and doc["clients"]["thief"]["first_alarm"]["action"] == "block"
    assert doc["clients"]["thief"]["refusals"] == {"blocked": 2} and doc["clients"]["shop"]["queries_total"] == 64
    assert doc["clients"]["shop"]["refusals"] == {"total-quota": 1} and doc["clients"]["shop"]["alarms"] == 0
    code, out = _run_cli("monitor", "report", "--alarm-log", str(log))
    assert code == 0 and "thief: ALARM at 32 queries" in out and "action block" in out
    assert not any(t in log.read_text() + state.read_text() for t in CLIENTS.values())
    assert oct(os.stat(log).st_mode)[-3:] in ("644", "600", "664")


def _run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout


def test_monitor_calibrate_cli_writes_a_profile(model, tmp_path):
    weights = tmp_path / "m.safetensors"
    save_model(model, weights, metadata={"arch": "fmnist-mlp", "num_classes": 10, "input_shape": list(SHAPE)})
    x = torch.from_numpy(natural(800, 8))
    save_tensors({"x": x, "y": torch.zeros(800, dtype=torch.long)}, tmp_path / "data.safetensors")
    save_tensors({"x": x[:600], "stream": torch.arange(600) // 200}, tmp_path / "streams.safetensors")
    code, out = _run_cli("monitor", "calibrate", "--arch", "fmnist-mlp", "--weights", str(weights), "--data",
                         str(tmp_path / "data.safetensors"), "--streams", str(tmp_path / "streams.safetensors"),
                         "--dim", "3", "--out", str(tmp_path / "p.safetensors"))
    assert code == 0 and "from 3 honest streams, 600 queries; false-alarm bound 0.333 per stream" in out
    assert (tmp_path / "p.safetensors").is_file()
    code, _ = _run_cli("monitor", "report", "--alarm-log", str(tmp_path / "none.jsonl"))
    assert code == 2
