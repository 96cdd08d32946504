"""Requests per second of `wmark serve`: unmarked, gated, and tie-break marked, side by side.

One process runs four servers on 127.0.0.1 over the same Fashion-MNIST CNN (from ``benchmarks/monitor.py``'s
cache), all with per-client tokens:

* ``plain``: the unmarked model;
* ``monitored``: a policy with a rate limit and quotas that never bite, the extraction monitor with a calibrated
  profile, an alarm log, Prometheus metrics; the client is first fed 4,096 queries so its nearest-distance
  store is full (the steady state);
* ``marked``: the tie-break API mark with a query log, as ``wmark serve --mark tiebreak --log`` runs it (scores
  and the rule's features from one forward pass);
* ``marked-2pass``: the same mark with a featurizer the API cannot share a pass with (the model runs twice),
  to show what the single pass saves.

A separate client process loads one server at a time for ``--seconds`` with ``--concurrency`` keep-alive
connections; every round runs all four in a rotated order so that drift on a shared machine hits them alike;
requests carry one test image (interactive) or 64 (batch). Per server the table gives the median
requests/s, ``vs_plain`` = the median over rounds of its requests/s over plain's in the same round, and the
server process's CPU milliseconds per request (``cpu_ms``, less sensitive to other load on a shared machine;
``cpu_vs_plain`` = plain's over its own, the throughput ratio a CPU-bound server would see). ``gate_ms`` is
the gate's own time per request (admission + monitor), measured in-process without HTTP.

Usage: nice -n 10 python benchmarks/serve_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import table, write_results
from monitor import OWNER, TRAIN_SIZE, probabilities, served_model, shop_stream

from wmark.data import load_dataset
from wmark.keys import generate_key
from wmark.models import penultimate_featurizer
from wmark.monitor.gate import Gate
from wmark.monitor.monitor import ExtractionMonitor, calibrate
from wmark.monitor.policy import parse_policy
from wmark.monitor.signals import fit_feature_map
from wmark.schemes.querylog import TieBreakLog
from wmark.schemes.tiebreak import TieBreakAPI, build_tiebreak_rule
from wmark.serve import build_app, serve_in_background
from wmark.suspects import LocalSuspect

CLIENTS = {"load": "load-token", "other": "other-token"}
LOAD = r"""
import json, sys, threading, time
import httpx
url, token, seconds, concurrency, body_file = sys.argv[1:6]
body = open(body_file).read()
headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
counts = []
def worker():
    n = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        end = time.perf_counter() + float(seconds)
        while time.perf_counter() < end:
            r = http.post("/v2/models/fm/infer", content=body, headers=headers)
            assert r.status_code == 200, r.text
            n += 1
    counts.append(n)
threads = [threading.Thread(target=worker) for _ in range(int(concurrency))]
start = time.perf_counter()
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"requests": sum(counts), "seconds": time.perf_counter() - start}))
"""


SERVERS = ("plain", "monitored", "marked", "marked-2pass")
COLUMNS = ["inputs_per_request", "server", "rps", "vs_plain", "cpu_ms", "cpu_vs_plain", "gate_ms"]


def gate_ms(gate: Gate, model: Any, x: np.ndarray, batch: int, requests: int = 300) -> float:
    """Milliseconds per request spent in the gate (admission, monitor, metrics), without HTTP."""
    requests = min(requests, len(x) // batch)
    probs = probabilities(model, x[:requests * batch])
    start = time.perf_counter()
    for i in range(requests):
        rows = slice(i * batch, (i + 1) * batch)
        gate.admit("other", batch)
        gate.after_answer("other", x[rows], probs[rows])
    return (time.perf_counter() - start) / requests * 1e3


def load(url: str, seconds: float, concurrency: int, body_file: Path) -> tuple[float, float]:
    """Requests/s the client process got, and the server process's CPU milliseconds per request."""
    cpu = time.process_time()
    out = subprocess.run([sys.executable, "-c", LOAD, url, CLIENTS["load"], str(seconds), str(concurrency),
                          str(body_file)], capture_output=True, text=True, check=True)
    cpu = time.process_time() - cpu
    doc = json.loads(out.stdout)
    return doc["requests"] / doc["seconds"], cpu / doc["requests"] * 1e3


def marked_api(model: Any, x_owner: np.ndarray, key: Any, log: TieBreakLog, *, one_pass: bool) -> TieBreakAPI:
    """The tie-break API over ``model``; ``one_pass=False`` hides the featurizer's model from it."""
    feat = penultimate_featurizer(model)
    rule = build_tiebreak_rule(key=key, x=x_owner, featurizer=feat if one_pass else (lambda v: feat(v)),
                               feature_space="served-penultimate")
    return TieBreakAPI(key=key, backend=LocalSuspect(model, input_shape=(1, 28, 28)), rule=rule, log=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    seconds = args.seconds or 1.5
    rounds = args.rounds or (3 if args.quick else 20)
    _, model = served_model()
    owner, full = load_dataset(OWNER), load_dataset("fashion-mnist")
    cal_x, cal_y = owner.x_train[TRAIN_SIZE:].numpy(), owner.y_train[TRAIN_SIZE:].numpy()
    fmap = fit_feature_map(x=owner.x_train[:TRAIN_SIZE].numpy(), dim=32)
    rng = np.random.default_rng(0)
    streams = [(cal_x[i], probabilities(model, cal_x[i])) for i in
               (shop_stream(cal_x, cal_y, n=2000, rng=rng, style="interactive") for _ in range(6))]
    profile = calibrate(feature_map=fmap, streams=streams, num_classes=10)
    test_x = full.x_test.numpy()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        policy = parse_policy({"default": {"rate": {"queries_per_second": 1e6, "burst": 100_000},
                                           "quota": {"per_day": 10**12, "total": 10**12},
                                           "on_alarm": {"action": "log"}}}, clients=list(CLIENTS))
        monitor = ExtractionMonitor(profile=profile)
        gate = Gate(policy=policy, clients=list(CLIENTS), monitor=monitor, alarm_log=Path(tmp) / "alarms.jsonl")
        for i in range(0, 4096, 64):  # steady state: the client's store is full
            x = test_x[i:i + 64]
            gate.after_answer("load", x, probabilities(model, x))
        x_owner = owner.x_train[:5000].numpy()
        key = generate_key(owner="benchmark", num_classes=10, input_shape=(1, 28, 28))
        logs = [TieBreakLog(Path(tmp) / f"log{i}.sqlite", key=key) for i in range(2)]
        common = {"model": model, "name": "fm", "num_classes": 10, "input_shape": (1, 28, 28), "clients": CLIENTS}
        apps = {"plain": build_app(**common), "monitored": build_app(**common, gate=gate),
                "marked": build_app(**common, answerer=marked_api(model, x_owner, key, logs[0], one_pass=True)),
                "marked-2pass": build_app(**common, answerer=marked_api(model, x_owner, key, logs[1], one_pass=False))}
        with contextlib.ExitStack() as stack:
            urls = {name: stack.enter_context(serve_in_background(app)).url for name, app in apps.items()}
            for batch in (1, 64):
                body_file = Path(tmp) / f"body{batch}.json"
                x = test_x[4096:4096 + batch]
                body_file.write_text(json.dumps({"inputs": [{"name": "input", "shape": list(x.shape),
                                                             "datatype": "FP32", "data": x.reshape(-1).tolist()}]}))
                rates: dict[str, list[float]] = {name: [] for name in SERVERS}
                cpu: dict[str, list[float]] = {name: [] for name in SERVERS}
                for name in SERVERS:  # warm-up
                    load(urls[name], 1.0, args.concurrency, body_file)
                for r in range(rounds):
                    for name in SERVERS[r % len(SERVERS):] + SERVERS[:r % len(SERVERS)]:
                        rps, ms = load(urls[name], seconds, args.concurrency, body_file)
                        rates[name].append(rps)
                        cpu[name].append(ms)
                for name in SERVERS:
                    paired = [b / a for a, b in zip(rates["plain"], rates[name])]
                    row = {"inputs_per_request": batch, "server": name, "rps": statistics.median(rates[name]),
                           "vs_plain": statistics.median(paired), "cpu_ms": statistics.median(cpu[name]),
                           "cpu_vs_plain": statistics.median(cpu["plain"]) / statistics.median(cpu[name]),
                           "rps_all": rates[name], "cpu_ms_all": cpu[name]}
                    if name == "monitored":
                        row["gate_ms"] = gate_ms(gate, model, test_x, batch)
                    rows.append(row)
                print(table(rows[-len(SERVERS):], COLUMNS), flush=True)
        seen = monitor.status()["load"]["queries"]
        logged = [log.clients().get("load", {}) for log in logs]
        for log in logs:
            log.close()
    print(table(rows, COLUMNS))
    summary = [{k: v for k, v in row.items() if not k.endswith("_all")} for row in rows]
    path = write_results("serve_throughput", {"summary": summary, "rows": rows, "seconds_per_round": seconds, "rounds": rounds,
                                              "concurrency": args.concurrency, "monitored_queries": seen,
                                              "marked_log": logged, "quick": args.quick})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
