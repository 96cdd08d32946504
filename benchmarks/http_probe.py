"""Probe throughput against a local `wmark serve` process, and the cost of the durable transcript.

Starts `wmark serve` (fmnist-cnn, label-only, v2) in its own process on 127.0.0.1, then sends the same
trigger queries with concurrency 1 and 8, each without the SQLite transcript and with it at both
durabilities (``fsync``: every answer fsync'd; ``process``: survives kill -9, not an OS crash), a fresh file
per run so nothing is reused. Rounds alternate the four configurations so drift on a shared machine hits
all of them alike; medians are reported. Prints a table and writes benchmarks/results/http_probe.json.

Usage: python benchmarks/http_probe.py [--queries 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from wmark.io import save_model
from wmark.keys import generate_key
from wmark.models import build_model
from wmark.schemes.trigger_set import generate_triggers
from wmark.suspects.http import HttpOptions, open_http_suspect
from wmark.suspects.probe import ProbeSuspect
from wmark.transcript import Transcript

RESULTS = Path(__file__).parent / "results" / "http_probe.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(weights: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from wmark.cli import main; main()", "serve", "--arch", "fmnist-cnn",
           "--weights", str(weights), "--name", "bench", "--port", str(port), "--labels-only"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def _run(url: str, key, inputs, *, concurrency: int, transcript: Path | None, durability: str = "fsync") -> float:
    suspect = open_http_suspect(url=url, protocol="v2", model_name="bench", num_classes=10,
                                input_shape=(1, 28, 28), options=HttpOptions(concurrency=concurrency))
    log = Transcript(transcript, key_commitment=key.commitment(), suspect=suspect.description,
                     protocol="v2", durability=durability) if transcript else None
    probe = ProbeSuspect(suspect, transcript=log)
    start = time.perf_counter()
    # The verifier asks `concurrency` triggers per step in sequential mode; mimic that here.
    for i in range(0, len(inputs), concurrency):
        answers = probe.query(inputs[i:i + concurrency])
        assert (answers.labels >= 0).all()
    seconds = time.perf_counter() - start
    suspect.close()
    if log is not None:
        log.close()
    return len(inputs) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    key = generate_key(owner="bench", num_classes=10, input_shape=(1, 28, 28), num_triggers=args.queries)
    inputs = generate_triggers(key).inputs.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "m.safetensors"
        save_model(build_model("fmnist-cnn", num_classes=10, input_shape=(1, 28, 28), seed=0), weights,
                   metadata={"arch": "fmnist-cnn", "num_classes": 10, "input_shape": [1, 28, 28]})
        port = _free_port()
        server = _start_server(weights, port)
        url = f"http://127.0.0.1:{port}"
        configs = [(c, t) for c in (1, 8) for t in ("none", "fsync", "process")]
        qps: dict[tuple[int, str], list[float]] = {cfg: [] for cfg in configs}
        try:
            _run(url, key, inputs[:20], concurrency=1, transcript=None)  # warm-up
            for r in range(args.rounds):
                for c, sync in configs:
                    path = None if sync == "none" else Path(tmp) / f"t-{r}-{c}-{sync}.sqlite"
                    qps[(c, sync)].append(_run(url, key, inputs, concurrency=c, transcript=path,
                                               durability=sync))
        finally:
            server.terminate()
            server.wait(timeout=10)
    med = {cfg: statistics.median(v) for cfg, v in qps.items()}
    rows = []
    for c in (1, 8):
        rows.append({"concurrency": c, "qps_without_transcript": round(med[(c, "none")], 1),
                     "qps_transcript_fsync": round(med[(c, "fsync")], 1),
                     "qps_transcript_process": round(med[(c, "process")], 1),
                     "time_ratio_fsync": round(med[(c, "none")] / med[(c, "fsync")], 3),
                     "time_ratio_process": round(med[(c, "none")] / med[(c, "process")], 3),
                     "runs_qps": {sync: [round(x, 1) for x in qps[(c, sync)]] for sync in ("none", "fsync", "process")}})
    print(f"{'concurrency':>11} {'q/s none':>9} {'q/s fsync':>10} {'q/s process':>12} {'ratio fsync':>12} "
          f"{'ratio process':>14}")
    for row in rows:
        print(f"{row['concurrency']:>11} {row['qps_without_transcript']:>9} {row['qps_transcript_fsync']:>10} "
              f"{row['qps_transcript_process']:>12} {row['time_ratio_fsync']:>12} {row['time_ratio_process']:>14}")
    doc = {
        "benchmark": "http_probe",
        "what": "label-only v2 queries per second to a local `wmark serve` (fmnist-cnn) process; transcript is "
                "SQLite WAL, one commit per answer, fsync'd (fsync) or not (process: survives kill -9); "
                "medians over rounds",
        "queries_per_run": args.queries, "rounds": args.rounds, "rows": rows,
        "speedup_concurrency_8_over_1": round(med[(8, "none")] / med[(1, "none")], 2),
        "ratio": "time with transcript / time without (= q/s without / q/s with), same server, alternating rounds",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
