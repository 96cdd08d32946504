"""Requests per second of `wmark serve` with and without the policy gate and extraction monitor, side by side.

One process runs two servers on 127.0.0.1 over the same Fashion-MNIST CNN (from ``benchmarks/monitor.py``'s
cache): ``plain`` (per-client tokens only) and ``monitored`` (a policy with a rate limit and quotas that
never bite, the extraction monitor with a calibrated profile, an alarm log, Prometheus metrics). The
monitored client is first fed 4,096 queries so its nearest-distance store is full (the steady state). A
separate client process then loads one server at a time for ``--seconds`` with ``--concurrency``
keep-alive connections, alternating plain/monitored for ``--rounds`` rounds so that drift on a shared
machine hits both alike; requests carry one test image (interactive) or 64 (batch). The table gives the
median requests/s per server and the overhead = 1 − the median over rounds of monitored/plain (each round's
two runs back to back). ``gate_ms`` is the gate's own time per request (admission + monitor), measured
in-process without HTTP. ``cpu_ms_*`` is the server process's CPU time per request (median over rounds),
less sensitive to other load on a shared machine than requests/s; ``cpu_overhead`` = 1 − plain/monitored
is the requests/s a CPU-bound server loses.

Usage: nice -n 10 python benchmarks/serve_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import table, write_results  # noqa: E402
from monitor import TRAIN_SIZE, OWNER, probabilities, served_model, shop_stream  # noqa: E402

from wmark.data import load_dataset  # noqa: E402
from wmark.monitor.gate import Gate  # noqa: E402
from wmark.monitor.monitor import ExtractionMonitor, calibrate  # noqa: E402
from wmark.monitor.policy import parse_policy  # noqa: E402
from wmark.monitor.signals import fit_feature_map  # noqa: E402
from wmark.serve import build_app, serve_in_background  # noqa: E402

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


COLUMNS = ["inputs_per_request", "plain_rps", "monitored_rps", "overhead", "gate_ms", "cpu_ms_plain",
           "cpu_ms_monitored", "cpu_overhead"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    seconds = args.seconds or 1.5
    rounds = args.rounds or (3 if args.quick else 30)
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
        apps = {"plain": build_app(model=model, name="fm", num_classes=10, input_shape=(1, 28, 28), clients=CLIENTS),
                "monitored": build_app(model=model, name="fm", num_classes=10, input_shape=(1, 28, 28),
                                       clients=CLIENTS, gate=gate)}
        with serve_in_background(apps["plain"]) as plain, serve_in_background(apps["monitored"]) as monitored:
            urls = {"plain": plain.url, "monitored": monitored.url}
            for batch in (1, 64):
                body_file = Path(tmp) / f"body{batch}.json"
                x = test_x[4096:4096 + batch]
                body_file.write_text(json.dumps({"inputs": [{"name": "input", "shape": list(x.shape),
                                                             "datatype": "FP32", "data": x.reshape(-1).tolist()}]}))
                rates: dict[str, list[float]] = {"plain": [], "monitored": []}
                cpu: dict[str, list[float]] = {"plain": [], "monitored": []}
                for which in ("plain", "monitored"):  # warm-up
                    load(urls[which], 1.0, args.concurrency, body_file)
                for r in range(rounds):
                    order = ("plain", "monitored") if r % 2 == 0 else ("monitored", "plain")
                    for which in order:
                        rps, ms = load(urls[which], seconds, args.concurrency, body_file)
                        rates[which].append(rps)
                        cpu[which].append(ms)
                p, m = statistics.median(rates["plain"]), statistics.median(rates["monitored"])
                paired = [b / a for a, b in zip(rates["plain"], rates["monitored"])]
                cp, cm = statistics.median(cpu["plain"]), statistics.median(cpu["monitored"])
                rows.append({"inputs_per_request": batch, "plain_rps": p, "monitored_rps": m,
                             "overhead": 1 - statistics.median(paired), "gate_ms": gate_ms(gate, model, test_x, batch),
                             "cpu_ms_plain": cp, "cpu_ms_monitored": cm, "cpu_overhead": 1 - cp / cm,
                             "plain_all": rates["plain"], "monitored_all": rates["monitored"],
                             "cpu_ms_plain_all": cpu["plain"], "cpu_ms_monitored_all": cpu["monitored"]})
                print(table(rows[-1:], COLUMNS), flush=True)
        seen = monitor.status()["load"]["queries"]
    print(table(rows, COLUMNS))
    path = write_results("serve_throughput", {"rows": rows, "seconds_per_round": seconds, "rounds": rounds,
                                              "concurrency": args.concurrency, "monitored_queries": seen,
                                              "quick": args.quick})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
