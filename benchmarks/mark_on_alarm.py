"""Marking only the clients the extraction monitor flags: what honest clients pay, what a thief's verdict keeps.

The tie-break mark costs every client about 3 pp of accuracy at beta 1 on Fashion-MNIST (it changes close
calls). With the policy ``"mark": "on-alarm"`` the served mark answers a client only after the extraction
monitor's alarm for it; until then the client gets the bare model's answers. This measures both sides on the
tie-break benchmarks' victim (``common.tiebreak_setting``, 88.1 %):

* **Honest clients.** The monitor's feature space is fitted on the owner's first 20,000 training images and
  its alarm calibrated for a 1 % per-stream false-alarm rate on honest *shop* streams (``monitor.shop_stream``:
  2–3 core classes, repeats, drift) drawn from the owner's other 10,000 images; the evaluation shops draw from
  the test set (no image shared), each 10,000 queries long, one query per request. A shop pays nothing before
  its alarm and the marked answers' cost after it; its cost is the served answers' accuracy against the bare
  model's on its own queries (true labels). The *broad* honest client sends the whole test set once in random
  order (by distribution it is a natural-data thief, so it is flagged). Side by side: the cost of marking
  every answer (``"mark": "always"``, the default) on the same streams. The monitor is driven in-process
  through the same per-client code the server runs (``wmark.monitor.monitor.run_stream``).
* **Thieves.** Per fresh key, a real server on 127.0.0.1 (``wmark.serve.build_app``, label-only, per-client
  tokens, the policy ``{"default": {"mark": "on-alarm"}}``, the calibrated monitor, the tie-break mark at
  ``--beta`` with its log). Thieves of three families of ``extraction_families.py`` query 10,000 attacker
  images through it (HTTP, one input per request) and stop at their first epoch within 5 pp of the victim; the same
  thief (same seed and queries) is trained side by side on the always-marked API in-process. Both are
  verified the library's way (weighted Holm at alpha = 1e-6: the 1000 committed inputs, chosen with all 32
  references, and the client's own log test, 1000 queries in 21 rounds), and again leave-family-out (the
  committed inputs and the log's ranking from the other architecture's 16 references only, as in
  ``extraction_families.py``); two independent models are tested on every log.

Usage: nice -n 10 python benchmarks/mark_on_alarm.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import cached_references, extraction_independents, table, tiebreak_setting, write_results
from extraction_families import FAMILIES, LFO_SUBSET, SHAPE, family_key, load_owner_labels, verdict_log10_p
from monitor import Trace, probabilities, shop_stream

from wmark.models import load_model, penultimate_featurizer
from wmark.monitor.gate import Gate
from wmark.monitor.monitor import ExtractionMonitor, MonitorProfile, calibrate_maxima
from wmark.monitor.policy import parse_policy
from wmark.monitor.signals import MonitorConfig, fit_feature_map
from wmark.schemes.querylog import TieBreakLog
from wmark.schemes.tiebreak import (
    TieBreakAPI,
    build_tiebreak_rule,
    commit_verification_inputs,
    tiebreak_log_test,
    tiebreak_test,
)
from wmark.serve import build_app, serve_in_background
from wmark.suspects import LocalSuspect
from wmark.suspects.http import open_http_suspect

ALPHA = 1e-6
FIT_SIZE = 20_000
STREAM = 10_000
THIEF_FAMILIES = ("cnn-adam-hard", "mlp-adam-hard", "bn-cnn-sgd")


def stream_cost(idx: np.ndarray, alarm_at: int | None, bare_ok: np.ndarray, marked_ok: np.ndarray) -> tuple[float, float]:
    """(pp lost marking on alarm, pp lost marking always) on one stream of test-set indices."""
    served = bare_ok[idx].copy()
    if alarm_at is not None:
        served[alarm_at:] = marked_ok[idx][alarm_at:]  # one query per request: marked from the next query on
    base = bare_ok[idx].mean()
    return 100.0 * float(base - served.mean()), 100.0 * float(base - marked_ok[idx].mean())


def honest_side(setting: Any, profile: MonitorProfile, probe: MonitorProfile, n_eval: int, broad_runs: int
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each evaluation shop's and broad client's first alarm (queries), or None."""
    xt, yt = setting.xt, setting.yt
    pt = probabilities(setting.victim, xt)
    rng = np.random.default_rng(2000)
    shops = []
    for i in range(n_eval):
        style = ("interactive", "batch")[i % 2]
        idx = shop_stream(xt, yt, n=STREAM, rng=rng, style=style)
        shops.append({"style": style, "idx": idx, "alarm_at": Trace(probe, xt[idx], pt[idx]).first(profile)[0]})
    broad = []
    for s in range(broad_runs):
        idx = np.random.default_rng(s).permutation(len(xt))
        broad.append({"idx": idx, "alarm_at": Trace(probe, xt[idx], pt[idx]).first(profile)[0]})
    return shops, broad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one key, one thief family, fewer streams")
    parser.add_argument("--keys", type=int, default=None, help="fresh keys (default 2, --quick 1)")
    parser.add_argument("--beta", type=float, default=1.0, help="the mark's shift scale")
    parser.add_argument("--keys-dir", type=Path, default=None, help="share keys with other runs (see extraction_families)")
    parser.add_argument("--name", default=None, help="results file name (default mark_on_alarm[_quick])")
    args = parser.parse_args()
    keys = args.keys or (1 if args.quick else 2)
    n_cal, n_eval, broad_runs = (30, 20, 2) if args.quick else (150, 200, 10)
    families = [FAMILIES[n] for n in (THIEF_FAMILIES[:1] if args.quick else THIEF_FAMILIES)]
    name = args.name or ("mark_on_alarm_quick" if args.quick else "mark_on_alarm")
    start = time.perf_counter()
    setting = tiebreak_setting()
    served, victim = setting.served, setting.victim
    x_owner, y_owner = setting.x_owner, load_owner_labels()
    x_att = setting.attacker.x_train.numpy()

    t0 = time.perf_counter()
    fmap = fit_feature_map(x=x_owner[:FIT_SIZE], dim=32)
    config = MonitorConfig()
    probe = MonitorProfile(fmap, 10, config)
    cal_x, cal_y = x_owner[FIT_SIZE:], y_owner[FIT_SIZE:]
    cal_p = probabilities(victim, cal_x)
    rng = np.random.default_rng(1000)
    maxima = []
    for i in range(n_cal):
        idx = shop_stream(cal_x, cal_y, n=STREAM, rng=rng, style=("interactive", "batch")[i % 2])
        maxima.append(Trace(probe, cal_x[idx], cal_p[idx]).maxima())
    profile = calibrate_maxima(maxima=maxima, feature_map=fmap, num_classes=10, config=config, target_rate=0.01)
    shops, broad = honest_side(setting, profile, probe, n_eval, broad_runs)
    monitor_s = time.perf_counter() - t0
    flagged = [s["alarm_at"] for s in shops if s["alarm_at"] is not None]
    print(f"monitor: calibrated on {n_cal} streams, {len(flagged)}/{n_eval} honest shops and "
          f"{sum(b['alarm_at'] is not None for b in broad)}/{broad_runs} broad clients flagged ({monitor_s:.0f} s)",
          flush=True)

    featurizer = penultimate_featurizer(victim)
    references = cached_references(setting, {})
    independents = [(n, load_model(arch, path)[0].eval()) for n, arch, path in extraction_independents()[:2]]
    bare_ok = served.query(setting.xt).labels == setting.yt
    costs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    nulls: list[dict[str, Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="wmark-mark-on-alarm-")
    for k in range(keys):
        key = family_key(k, args.keys_dir)
        t0 = time.perf_counter()
        base = build_tiebreak_rule(key=key, x=x_owner, featurizer=featurizer, feature_space="served-penultimate")
        subsets = {"all": references, "cnn": [r for r in references if r[0] == "fmnist-cnn"],
                   "mlp": [r for r in references if r[0] == "fmnist-mlp"]}
        rules = {s: commit_verification_inputs(base, served=served, x=x_owner, references=refs, count=1000,
                                               how=f"{s} references") for s, refs in subsets.items()}
        rule = rules["all"]
        print(f"key {k}: rule and commitments in {time.perf_counter() - t0:.0f} s", flush=True)
        always = TieBreakAPI(key=key, backend=served, rule=rule, beta=args.beta, expose_scores=False)
        marked_ok = always.query(setting.xt).labels == setting.yt
        per_shop = [stream_cost(s["idx"], s["alarm_at"], bare_ok, marked_ok) for s in shops]
        per_broad = [stream_cost(b["idx"], b["alarm_at"], bare_ok, marked_ok) for b in broad]
        costs.append({"key": k, "beta": args.beta,
                      "shops": len(shops), "shops_flagged": len(flagged),
                      "shop_cost_pp_on_alarm": statistics.fmean(c for c, _ in per_shop),
                      "shop_cost_pp_always": statistics.fmean(a for _, a in per_shop),
                      "shop_cost_pp_on_alarm_worst": max(c for c, _ in per_shop),
                      "broad_cost_pp_on_alarm": statistics.fmean(c for c, _ in per_broad),
                      "broad_cost_pp_always": statistics.fmean(a for _, a in per_broad)})
        print(json.dumps(costs[-1]), flush=True)

        tokens = {fam.name: secrets.token_urlsafe(16) for fam in families}
        with TieBreakLog(Path(tmp.name) / f"k{k}-on-alarm.sqlite", key=key) as log_on, \
                TieBreakLog(Path(tmp.name) / f"k{k}-always.sqlite", key=key) as log_always:
            gate = Gate(policy=parse_policy({"default": {"mark": "on-alarm"}}, clients=list(tokens)),
                        clients=list(tokens), monitor=ExtractionMonitor(profile=profile))
            app = build_app(model=victim, name="victim", num_classes=10, input_shape=SHAPE, labels_only=True,
                            clients=tokens, gate=gate,
                            answerer=TieBreakAPI(key=key, backend=served, rule=rule, beta=args.beta, log=log_on,
                                                 expose_scores=False))
            side = TieBreakAPI(key=key, backend=served, rule=rule, beta=args.beta, log=log_always, expose_scores=False)
            with serve_in_background(app) as server:
                for fam in families:
                    thieves = {}
                    t0 = time.perf_counter()
                    remote = open_http_suspect(url=f"{server.url}/v2/models/victim", protocol="v2", num_classes=10,
                                               input_shape=SHAPE, token=tokens[fam.name])
                    try:
                        thieves["on-alarm"] = (*fam.train(remote, x_att, 1 + k, setting.in_scope),
                                               time.perf_counter() - t0)
                    finally:
                        remote.close()
                    t0 = time.perf_counter()
                    thieves["always"] = (*fam.train(side.for_client(fam.name), x_att, 1 + k, setting.in_scope),
                                         time.perf_counter() - t0)
                    alarm = gate.clients[fam.name].alarm
                    for mode, (net, epochs, seconds) in thieves.items():
                        log = log_on if mode == "on-alarm" else log_always
                        suspect = LocalSuspect(net.eval(), input_shape=SHAPE, description=fam.name)
                        acc = float((suspect.query(setting.xt).labels == setting.yt).mean())
                        committed = tiebreak_test(key=key, rule=rule, served=served, suspect=suspect)
                        logged = tiebreak_log_test(key=key, rule=rule, served=served, suspect=suspect, log=log,
                                                   client=fam.name)
                        rows.append({"key": k, "family": fam.name, "mark": mode, "epochs": epochs, "accuracy": acc,
                                     "within_5pp": bool(acc >= setting.victim_accuracy - 0.05),
                                     "flagged_at": None if mode == "always" or alarm is None else alarm["queries"],
                                     "logged_inputs": len(log.inputs(fam.name)), "train_seconds": seconds,
                                     "committed_log10_p": committed.log10_p, "log_log10_p": logged.log10_p,
                                     "verdict_log10_p": verdict_log10_p(committed.log10_p, logged.log10_p)})
                        rows[-1]["extracted"] = bool(rows[-1]["verdict_log10_p"] <= np.log10(ALPHA))
                        # leave-family-out: the committed inputs and the log's ranking from the other family's
                        # references only
                        lfo = rules[LFO_SUBSET[fam.group]]
                        c_lfo = tiebreak_test(key=key, rule=lfo, served=served, suspect=suspect).log10_p
                        l_lfo = tiebreak_log_test(key=key, rule=lfo, served=served, suspect=suspect, log=log,
                                                  client=fam.name).log10_p
                        rows[-1].update(lfo_subset=LFO_SUBSET[fam.group], verdict_lfo_log10_p=verdict_log10_p(c_lfo, l_lfo))
                        rows[-1]["extracted_lfo"] = bool(rows[-1]["verdict_lfo_log10_p"] <= np.log10(ALPHA))
                        print(table([rows[-1]], ["key", "family", "mark", "epochs", "accuracy", "flagged_at",
                                                 "logged_inputs", "verdict_log10_p", "extracted",
                                                 "verdict_lfo_log10_p"]), flush=True)
                        for null_name, net0 in independents:
                            innocent = LocalSuspect(net0, input_shape=SHAPE, description=null_name)
                            c0 = tiebreak_test(key=key, rule=rule, served=served, suspect=innocent).log10_p
                            l0 = tiebreak_log_test(key=key, rule=rule, served=served, suspect=innocent, log=log,
                                                   client=fam.name).log10_p
                            nulls.append({"key": k, "model": null_name, "log_of": f"{fam.name} ({mode})",
                                          "verdict_log10_p": verdict_log10_p(c0, l0)})
    tmp.cleanup()
    summary = {
        "honest_shops": n_eval, "honest_shops_flagged": len(flagged),
        "shop_cost_pp_on_alarm_mean": statistics.fmean(c["shop_cost_pp_on_alarm"] for c in costs),
        "shop_cost_pp_always_mean": statistics.fmean(c["shop_cost_pp_always"] for c in costs),
        "broad_cost_pp_on_alarm_mean": statistics.fmean(c["broad_cost_pp_on_alarm"] for c in costs),
        "broad_cost_pp_always_mean": statistics.fmean(c["broad_cost_pp_always"] for c in costs),
        "broad_flagged": f"{sum(b['alarm_at'] is not None for b in broad)}/{broad_runs}",
        "broad_flagged_at_median": statistics.median([b["alarm_at"] for b in broad if b["alarm_at"] is not None]
                                                     or [0]),
        "thieves_flagged": f"{sum(r['flagged_at'] is not None for r in rows if r['mark'] == 'on-alarm')}/"
                           f"{sum(r['mark'] == 'on-alarm' for r in rows)}",
        "caught_on_alarm": sum(r["extracted"] for r in rows if r["mark"] == "on-alarm"),
        "caught_always": sum(r["extracted"] for r in rows if r["mark"] == "always"),
        "caught_lfo_on_alarm": sum(r["extracted_lfo"] for r in rows if r["mark"] == "on-alarm"),
        "caught_lfo_always": sum(r["extracted_lfo"] for r in rows if r["mark"] == "always"),
        "thieves_per_mode": sum(r["mark"] == "always" for r in rows),
        "in_scope_on_alarm": sum(r["within_5pp"] for r in rows if r["mark"] == "on-alarm"),
        "in_scope_always": sum(r["within_5pp"] for r in rows if r["mark"] == "always"),
        "paired_verdict_difference": [
            round(a["verdict_log10_p"] - b["verdict_log10_p"], 2) for a, b in
            zip([r for r in rows if r["mark"] == "on-alarm"], [r for r in rows if r["mark"] == "always"], strict=True)],
        "independent_checks": len(nulls),
        "independent_accused": int(sum(n["verdict_log10_p"] <= np.log10(ALPHA) for n in nulls)),
        "min_independent_verdict_log10_p": min((n["verdict_log10_p"] for n in nulls), default=0.0),
    }
    doc = {"summary": summary, "costs": costs, "rows": rows, "null_checks": nulls, "beta": args.beta, "keys": keys,
           "calibration_streams": n_cal, "stream_length": STREAM, "victim_accuracy": setting.victim_accuracy,
           "calibration": profile.calibration, "monitor_seconds": monitor_s,
           "shop_alarms": [s["alarm_at"] for s in shops], "broad_alarms": [b["alarm_at"] for b in broad],
           "seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}
    print(json.dumps(summary, indent=1))
    print(f"wrote {write_results(name, doc)} ({doc['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
