"""The extraction monitor on Fashion-MNIST traffic: when thieves are flagged, how often honest clients are.

Protocol. The owner's half of the training set is split: its first 20,000 images train the served CNN
(2 epochs) and fit the monitor's feature space; the other 10,000 are the pool of the *calibration* honest
streams. The *evaluation* honest streams draw from the test set, so calibration and evaluation never share
an image. Thieves draw from the attacker's half.

Honest clients are shops: each has a catalogue (200–1,000 images of each of 2–3 core classes, 5 % of
queries from any class), re-sends popular items (20–40 % repeats from its recent history) and drifts
slowly (every ~2,000 queries one core class may be swapped for another). ``interactive`` shops send one
query at a time in random order; ``batch`` shops send category runs of 128 (a catalogue job). Streams are
20,000 queries long. The alarm is calibrated on the calibration streams for a 1 % per-stream false-alarm
rate (split conformal: see :mod:`wmark.monitor.monitor`). One *broad* honest client sends the whole test set
once, in random order.

Thieves: ``natural-random`` (5,000 random attacker images, one per request), ``natural-10k`` (the
extraction benchmarks' 10,000-query extraction: a random permutation of the attacker half, 256 per
request), ``jbda`` (Papernot et al. 2017: 100 seed images, a substitute MLP trained on the API's labels,
each round adds x + 0.1·sign(∇ substitute) of every point, until 3,200 queries), ``noise`` (uniform noise
images), and thieves spread over 5 tokens (natural data dealt at random, natural data dealt by class — two
classes per token, the careful thief — and JBDA dealt at random). Each thief runs with several seeds; the
table gives the median and the worst query count at the first alarm.

The monitor is driven in-process through the same per-client code the server runs
(:func:`wmark.monitor.monitor.run_stream`), with checks every 32 queries exactly as one-query requests put
them. ``--e2e`` adds a small run through a real server on 127.0.0.1 (alarm log, label-only action, metrics).

Usage: nice -n 10 python benchmarks/monitor.py [--quick] [--e2e]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import cached, table, write_results

from wmark import api
from wmark.data import load_dataset
from wmark.models import load_model
from wmark.monitor.monitor import MonitorProfile, calibrate_maxima, run_stream
from wmark.monitor.signals import SIGNALS, MonitorConfig, fit_feature_map
from wmark.training import predict_logits

OWNER, ATTACKER = "fashion-mnist@owner", "fashion-mnist@attacker"
TRAIN_SIZE = 20_000


def served_model() -> tuple[Path, torch.nn.Module]:
    path = cached({"name": "monitor-served-cnn", "data": OWNER, "samples": TRAIN_SIZE, "epochs": 2, "seed": 0},
                  lambda p: api.train(arch="fmnist-cnn", data=OWNER, out=p, epochs=2, seed=0, max_samples=TRAIN_SIZE))
    model, _ = load_model("fmnist-cnn", path)
    return path, model.eval()


def probabilities(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return torch.softmax(predict_logits(model, torch.from_numpy(np.ascontiguousarray(x))), 1).numpy()


def shop_stream(pool_x: np.ndarray, pool_y: np.ndarray, *, n: int, rng: np.random.Generator, style: str,
                num_classes: int = 10) -> np.ndarray:
    """Indices into the pool of one task-specific honest client (see the module docstring)."""
    by_class = [np.flatnonzero(pool_y == c) for c in range(num_classes)]
    catalogue = [rng.choice(ix, size=min(len(ix), int(rng.integers(200, 1001))), replace=False) for ix in by_class]
    core = list(rng.choice(num_classes, size=int(rng.integers(2, 4)), replace=False))
    weights = rng.dirichlet(np.ones(len(core)) * 2)
    repeat_p = rng.uniform(0.2, 0.4)
    out: list[int] = []
    run_class, run_left = 0, 0
    while len(out) < n:
        if len(out) % 2000 == 0 and out and rng.random() < 0.5:
            # Slow drift: one core class gives way to another.
            core[int(rng.integers(len(core)))] = int(rng.integers(num_classes))
            weights = rng.dirichlet(np.ones(len(core)) * 2)
        if out and rng.random() < repeat_p:
            out.append(out[-1 - int(rng.integers(min(len(out), 500)))])
            continue
        if style == "batch":
            if run_left == 0:
                run_class, run_left = int(rng.choice(core, p=weights)), 128
            c = run_class if rng.random() > 0.05 else int(rng.integers(num_classes))
            run_left -= 1
        else:
            c = int(rng.choice(core, p=weights)) if rng.random() > 0.05 else int(rng.integers(num_classes))
        out.append(int(rng.choice(catalogue[c])))
    return np.asarray(out[:n])


def jbda_stream(x_seed: np.ndarray, oracle: torch.nn.Module, *, total: int, seed: int, step: float = 0.1
                ) -> np.ndarray:
    """JBDA (Papernot et al. 2017): query the seeds, then each round every point's x + step·sign(∇)."""
    torch.manual_seed(seed)
    sub = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    points = torch.from_numpy(x_seed)
    queries = [points]
    while sum(len(q) for q in queries) < total:
        with torch.no_grad():
            labels = oracle(points).argmax(1)
        opt = torch.optim.Adam(sub.parameters(), lr=1e-3)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(sub(points), labels).backward()
            opt.step()
        x = points.clone().requires_grad_(True)
        sub(x).gather(1, labels[:, None]).sum().backward()
        assert x.grad is not None
        new = (points + step * x.grad.sign()).clamp(0, 1).detach()
        queries.append(new)
        points = torch.cat([points, new])
    return torch.cat(queries).numpy()[:total]


VARIANTS = {"all five signals": SIGNALS, "without near_tie": tuple(s for s in SIGNALS if s != "near_tie"),
            "PRADA alone": ("prada",)}


class Trace:
    """One stream's signals at every check (computed once, then scored under every alarm variant)."""

    def __init__(self, probe: MonitorProfile, x: np.ndarray, probs: np.ndarray, chunk: int | None = None) -> None:
        checks = run_stream(probe, x, probs, chunk=chunk)
        self.queries = np.asarray([q for q, _ in checks])
        self.values = np.asarray([[sig[s] for s in SIGNALS] for _, sig in checks]).reshape(len(checks), len(SIGNALS))
        self.length = len(x)

    def maxima(self) -> dict[str, float]:
        return {s: float(self.values[:, j].max(initial=0.0)) for j, s in enumerate(SIGNALS)}

    def first(self, profile: MonitorProfile, only: str | None = None) -> tuple[int | None, float, str]:
        """First alarm (queries), highest score, and the signal that drove it (``only``: that signal alone)."""
        scales = profile.calibration["scales"]
        used = [s for s in SIGNALS if s in scales and (only is None or s == only)]
        if not used or not len(self.queries):
            return None, 0.0, ""
        ratios = np.stack([self.values[:, SIGNALS.index(s)] / scales[s] for s in used], 1)
        score = ratios.max(1)
        over = np.flatnonzero(score > profile.calibration["threshold"])
        at = int(over[0]) if len(over) else int(score.argmax())
        return (int(self.queries[at]) if len(over) else None), float(score.max()), used[int(ratios[at].argmax())]


def summary(name: str, traces: list[Trace], group: str, profile: MonitorProfile) -> dict[str, Any]:
    runs = [t.first(profile) for t in traces]
    hits = [q for q, _, _ in runs if q is not None]
    row: dict[str, Any] = {
        "client": name, "group": group, "runs": len(runs), "flagged": len(hits),
        "median_at": statistics.median(hits) if hits else "-",
        "worst_at": max(hits) if len(hits) == len(runs) else "never", "length": traces[0].length,
        "signal": statistics.mode(sig for _, _, sig in runs), "max_score": max(sc for _, sc, _ in runs)}
    for s in profile.calibration["scales"]:
        alone = [t.first(profile, only=s)[0] for t in traces]
        got = [q for q in alone if q is not None]
        row[f"by_{s}"] = f"{len(got)}/{len(alone)}" + (f" med {statistics.median(got):g}" if got else "")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer streams (minutes)")
    parser.add_argument("--e2e", action="store_true", help="also a small run through a real server")
    parser.add_argument("--target-rate", type=float, default=0.01)
    args = parser.parse_args()
    start = time.perf_counter()
    n_cal, n_eval, length, seeds = (30, 10, 20_000, 3) if args.quick else (150, 100, 20_000, 10)
    owner, attacker, full = load_dataset(OWNER), load_dataset(ATTACKER), load_dataset("fashion-mnist")
    _, model = served_model()
    fit_x = owner.x_train[:TRAIN_SIZE].numpy()
    cal_x, cal_y = owner.x_train[TRAIN_SIZE:].numpy(), owner.y_train[TRAIN_SIZE:].numpy()
    test_x, test_y = full.x_test.numpy(), full.y_test.numpy()
    att_x, att_y = attacker.x_train.numpy(), attacker.y_train.numpy()
    cal_p, test_p, att_p = (probabilities(model, x) for x in (cal_x, test_x, att_x))
    fmap = fit_feature_map(x=fit_x, dim=32)
    config = MonitorConfig()
    probe = MonitorProfile(fmap, 10, config)

    t0 = time.perf_counter()
    rng = np.random.default_rng(1000)
    cal = []
    for i in range(n_cal):
        idx = shop_stream(cal_x, cal_y, n=length, rng=rng, style=("interactive", "batch")[i % 2])
        cal.append(Trace(probe, cal_x[idx], cal_p[idx]).maxima())
    calib_s = time.perf_counter() - t0
    profiles = {name: calibrate_maxima(maxima=cal, feature_map=fmap, num_classes=10, config=config,
                                       target_rate=args.target_rate, signals=sig) for name, sig in VARIANTS.items()}
    for name, prof in profiles.items():
        print(f"{name}: calibrated on {n_cal} streams × {length} ({calib_s:.0f} s): threshold "
              f"{prof.calibration['threshold']:.3f}, bound {prof.calibration['false_alarm_bound']:.3g}, "
              f"scales {prof.calibration['scales']}", flush=True)

    traces: dict[tuple[str, str], list[Trace]] = {}
    rng = np.random.default_rng(2000)
    for style in ("interactive", "batch"):
        traces[(f"shop-{style}", "honest")] = [
            Trace(probe, test_x[idx], test_p[idx]) for idx in
            (shop_stream(test_x, test_y, n=length, rng=rng, style=style) for _ in range(n_eval))]
        print(f"evaluated {n_eval} {style} shops", flush=True)
    traces[("broad (whole test set once)", "honest-broad")] = [
        Trace(probe, test_x[p], test_p[p]) for p in (np.random.default_rng(s).permutation(len(test_x))
                                                     for s in range(seeds))]
    thief_names = ("natural-random", "natural-10k", "jbda", "noise")
    for name in thief_names:
        traces[(name, "thief")] = []
    spread_names = ("natural dealt at random", "natural by class", "jbda dealt at random")
    spread: dict[str, list[list[Trace]]] = {k: [] for k in spread_names}
    for s in range(seeds):
        r = np.random.default_rng(3000 + s)
        pick = r.choice(len(att_x), size=5000, replace=False)
        traces[("natural-random", "thief")].append(Trace(probe, att_x[pick], att_p[pick]))
        perm = torch.randperm(len(att_x), generator=torch.Generator().manual_seed(s)).numpy()[:10_000]
        traces[("natural-10k", "thief")].append(Trace(probe, att_x[perm], att_p[perm], chunk=256))
        seed_idx = np.concatenate([r.choice(np.flatnonzero(att_y == c), 10, replace=False) for c in range(10)])
        jx = jbda_stream(att_x[seed_idx], model, total=3200, seed=s)
        jp = probabilities(model, jx)
        traces[("jbda", "thief")].append(Trace(probe, jx, jp))
        nx = r.random((2000, 1, 28, 28), dtype=np.float32)
        traces[("noise", "thief")].append(Trace(probe, nx, probabilities(model, nx)))
        tokens = r.integers(5, size=10_000)
        spread["natural dealt at random"].append([Trace(probe, att_x[perm][tokens == t], att_p[perm][tokens == t])
                                                  for t in range(5)])
        by_class = [perm[np.isin(att_y[perm], (2 * t, 2 * t + 1))] for t in range(5)]
        spread["natural by class"].append([Trace(probe, att_x[ix], att_p[ix]) for ix in by_class])
        tj = r.integers(5, size=len(jx))
        spread["jbda dealt at random"].append([Trace(probe, jx[tj == t], jp[tj == t]) for t in range(5)])
    print(f"thieves traced ({time.perf_counter() - start:.0f} s)", flush=True)

    results: dict[str, Any] = {}
    columns = ["client", "group", "runs", "flagged", "median_at", "worst_at", "length", "signal", "max_score"]
    for variant, prof in profiles.items():
        rows = [summary(name, ts, group, prof) for (name, group), ts in traces.items()]
        for name, per_seed in spread.items():
            row = summary(f"5 tokens: {name}", [t for runs in per_seed for t in runs], "thief-5-tokens", prof)
            # Queries the thief got in all before its last token was flagged, per seed ('never': one never was).
            got = []
            for runs in per_seed:
                firsts = [t.first(prof)[0] for t in runs]
                got.append(sum(firsts) if all(q is not None for q in firsts) else None)  # type: ignore[misc]
            done = [g for g in got if g is not None]
            row["all_tokens_flagged_after_total"] = statistics.median(done) if done else "never"
            row["seeds_all_tokens_flagged"] = f"{len(done)}/{len(got)}"
            rows.append(row)
        honest = [r for r in rows if r["group"] == "honest"]
        rate = sum(r["flagged"] for r in honest) / sum(r["runs"] for r in honest)
        print(f"\n== {variant} (honest task-specific false alarms {rate:.2%})")
        print(table(rows, columns + [f"by_{s}" for s in prof.calibration["scales"]]))
        results[variant] = {"calibration": prof.calibration, "rows": rows, "honest_false_alarm_rate": rate}
    doc: dict[str, Any] = {"quick": args.quick, "variants": results, "calibration_seconds": calib_s,
                           "calibration_streams": n_cal, "evaluation_streams_per_style": n_eval,
                           "stream_length": length, "thief_seeds": seeds, "near_radius": fmap.near_radius,
                           "ood_radius": fmap.ood_radius, "config": config.to_dict()}
    if args.e2e:
        doc["e2e"] = end_to_end(profiles["all five signals"], test_x, test_y, att_x)
        print(doc["e2e"])
    doc["seconds"] = time.perf_counter() - start
    print(f"wrote {write_results('monitor_quick' if args.quick else 'monitor', doc)} ({doc['seconds']:.0f} s)")


def end_to_end(profile: MonitorProfile, test_x: np.ndarray, test_y: np.ndarray, att_x: np.ndarray) -> dict[str, Any]:
    """A shop and a noise thief through a real server: the thief's answers turn label-only after its alarm."""
    import json
    import tempfile

    import httpx

    from wmark.monitor.gate import Gate
    from wmark.monitor.monitor import ExtractionMonitor
    from wmark.monitor.policy import parse_policy
    from wmark.serve import build_app, serve_in_background

    _, model = served_model()
    clients = {"shop": "shop-token", "thief": "thief-token"}
    policy = parse_policy({"default": {"on_alarm": {"action": "label-only"}}}, clients=list(clients))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "alarms.jsonl"
        gate = Gate(policy=policy, clients=list(clients), monitor=ExtractionMonitor(profile=profile), alarm_log=log)
        app = build_app(model=model, name="fm", num_classes=10, input_shape=(1, 28, 28), clients=clients, gate=gate)
        shop = shop_stream(test_x, test_y, n=2000, rng=np.random.default_rng(5), style="interactive")
        noise = np.random.default_rng(6).random((2000, 1, 28, 28), dtype=np.float32)
        outputs: dict[str, list[str]] = {"shop": [], "thief": []}
        with serve_in_background(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(0, 2000, 16):
                for who, x in (("shop", test_x[shop[i:i + 16]]), ("thief", noise[i:i + 16])):
                    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                        "data": x.reshape(-1).tolist()}]}
                    r = http.post("/v2/models/fm/infer", json=body, headers={"Authorization": f"Bearer {clients[who]}"})
                    r.raise_for_status()
                    outputs[who].append(r.json()["outputs"][0]["name"])
            metrics = http.get("/metrics").text
        alarms = [json.loads(line) for line in log.read_text().splitlines()]
    return {"alarms": alarms,
            "thief_label_only_from_request": outputs["thief"].index("label") if "label" in outputs["thief"] else None,
            "shop_label_only_requests": outputs["shop"].count("label"),
            "metrics_alarm_lines": [m for m in metrics.splitlines() if m.startswith("wmark_monitor_alarm{")]}


if __name__ == "__main__":
    main()
