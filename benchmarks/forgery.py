"""Forgery: can a dishonest accuser make wmark accuse an independent model? And is tampering caught?

(a) False claim from transferable adversarial examples (Liu et al., USENIX Security 2024). The accuser trains
    its own Fashion-MNIST models, crafts targeted PGD examples on their ensemble toward labels it picks, and
    presents them as "triggers" against independent models. A naive verifier (count matches on the presented
    inputs, binomial test at 1/C) is measured for contrast. wmark never takes triggers from the accuser: it
    regenerates them from the key, so the accuser's only lever is its key, and every path (model file
    sequential and fixed, HTTP with a transcript, the tie-break test with a rule the accuser built for its own
    served model, white-box against the accuser's own weight-marked reference) is run with it. Also shown: none of the adversarial inputs is among the triggers wmark asks, and a key
    file whose trigger parameters were edited is refused (by its own commitment, and, re-committed, by the
    commitment in the accuser's signed release).
(b) Key search: an accuser generates N keys and keeps the one that fits an independent model best. Measured:
    the best log10 p over N and the time; the bound P(best p <= t) <= N t; the projected cost of reaching
    alpha; and that the best key is refused against the commitment in the signed release.
(c) Tampering: one flipped byte of a signed model (weights, metadata), its provenance statement, its bundle,
    a signed report, a report, a transcript is detected; reports re-check to the same verdict (also in a fresh
    process).

Usage: ``python benchmarks/forgery.py --quick`` (minutes on 2 CPU cores; writes
``benchmarks/results/forgery_quick.json``) or without ``--quick`` (16 independent models trained longer, 2,000
keys; writes ``benchmarks/results/forgery.json``). Prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cached, table, write_results

from wmark import api
from wmark.data import load_dataset
from wmark.errors import UsageError
from wmark.keys import generate_key, load_key, save_key
from wmark.models import load_model
from wmark.recheck import recheck
from wmark.schemes.trigger_set import generate_triggers
from wmark.signing import (
    EvidenceError,
    check_key_provenance,
    generate_signing_key,
    provenance_path,
    sign_file,
    sign_model,
    signature_path,
    verify_file,
    verify_model,
)
from wmark.stats import binomial_log10_sf
from wmark.suspects import LocalSuspect
from wmark.transcript import input_sha256
from wmark.verify import trigger_set_test

ALPHA = 1e-6


def train_models(specs: list[tuple[str, int]], *, data: str, samples: int, epochs: int, tag: str) -> list[tuple[str, Path]]:
    out = []
    for arch, seed in specs:
        config = {"name": f"forgery-{tag}-{arch}", "seed": seed, "data": data, "samples": samples, "epochs": epochs}
        path = cached(config, lambda p, a=arch, s=seed: api.train(arch=a, data=data, out=p, epochs=epochs, seed=s,
                                                                   max_samples=samples))
        out.append((arch, path))
    return out


def craft_adversarial(models: list[torch.nn.Module], x: torch.Tensor, target: torch.Tensor, *, eps: float,
                      steps: int) -> torch.Tensor:
    """Targeted L-infinity PGD on the mean log-softmax of an ensemble (the accuser's own models)."""
    adv = x.clone()
    step = 2.5 * eps / steps
    for _ in range(steps):
        adv.requires_grad_(True)
        logp = torch.stack([torch.log_softmax(m(adv), 1) for m in models]).mean(0)
        loss = torch.nn.functional.nll_loss(logp, target)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = (adv.detach() - step * grad.sign()).clamp(x - eps, x + eps).clamp(0.0, 1.0)
    return adv.detach()


def flip_detected(path: Path, offsets: list[int], check: Any) -> tuple[int, int]:
    """Flip one byte at each offset in turn; count how often ``check()`` raises EvidenceError."""
    original = path.read_bytes()
    caught = 0
    for off in offsets:
        data = bytearray(original)
        data[off % len(data)] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            check()
        except EvidenceError:
            caught += 1
        except UsageError:
            caught += 1  # an unreadable file is refused too (exit 2)
        finally:
            path.write_bytes(original)
    return caught, len(offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 independent models, 200 keys (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    quick = args.quick
    n_independent = 10 if quick else 16
    n_keys = 200 if quick else 2000
    samples, epochs = (10_000, 1) if quick else (30_000, 2)
    work = Path(tempfile.mkdtemp(prefix="wmark-forgery-"))
    ds = load_dataset("fashion-mnist")
    results: dict[str, Any] = {"quick": quick, "alpha": ALPHA}

    # Independent models: never saw any key. Accuser's own models: trained on the other half of the data.
    archs = ["fmnist-mlp", "fmnist-cnn"]
    independents = train_models([(archs[i % 2], 100 + i) for i in range(n_independent)], data="fashion-mnist@owner",
                                samples=samples, epochs=epochs, tag="independent")
    accuser_files = train_models([("fmnist-cnn", 1), ("fmnist-mlp", 2), ("fmnist-cnn-wide", 3)],
                                 data="fashion-mnist@attacker", samples=samples, epochs=epochs, tag="accuser")
    accuser = [load_model(a, p)[0].eval() for a, p in accuser_files]
    loaded = [(a, p, load_model(a, p)[0].eval()) for a, p in independents]

    # (a) The accuser's "triggers": targeted adversarial examples toward labels it picked.
    rng = np.random.default_rng(7)
    n_adv = 100
    pick = rng.choice(len(ds.x_test), n_adv, replace=False)
    x, y = ds.x_test[pick], ds.y_test[pick]
    target = torch.from_numpy((y.numpy() + rng.integers(1, 10, n_adv)) % 10)
    start = time.perf_counter()
    adv = craft_adversarial(accuser, x, target, eps=0.2 if quick else 0.15, steps=40)
    craft_s = time.perf_counter() - start
    with torch.no_grad():
        on_own = float(np.mean([(m(adv).argmax(1) == target).float().mean().item() for m in accuser]))

    signer_private, signer_public = work / "accuser.pem", work / "accuser.pub.pem"
    generate_signing_key(private_key=signer_private, public_key=signer_public)
    acc_key = generate_key(owner="Dishonest Accuser")
    acc_key_file = work / "accuser.key"
    save_key(acc_key, acc_key_file)
    reference = work / "accuser-weights-marked.safetensors"
    api.embed(key=acc_key_file, arch="fmnist-mlp", weights=accuser_files[1][1], data="fashion-mnist@attacker",
              out=reference, schemes=("trigger", "weights"), epochs=1, max_samples=samples)
    release = sign_model(path=reference, private_key=signer_private)
    rule = work / "accuser-tiebreak.safetensors"
    api.build_tiebreak(key=acc_key_file, arch="fmnist-mlp", weights=reference, data="fashion-mnist@attacker",
                       out=rule, references=[], verify_count=300)

    trigger_digests = {input_sha256(t) for t in generate_triggers(acc_key).inputs.numpy()}
    adv_digests = {input_sha256(a) for a in adv.numpy()}
    rows = []
    rechecks: list[dict[str, Any]] = []
    from wmark.serve import build_app, serve_in_background

    for i, (arch, path, model) in enumerate(loaded):
        with torch.no_grad():
            answers = model(adv).argmax(1)
        matches = int((answers == target).sum())
        row: dict[str, Any] = {"model": f"{arch}#{i}", "naive_matches": matches,
                               "naive_log10_p": binomial_log10_sf(matches, n_adv, 0.1)}
        for mode in ("sequential", "fixed"):
            verdict = api.verify(key=acc_key_file, arch=arch, suspect=path, mode=mode)
            report = work / f"r-{i}-{mode}.html"
            api.write_report(verdict=verdict, key=acc_key_file, path=report)
            row[f"file_{mode}"] = verdict.log10_p
            outcome = recheck(report=report.with_suffix(".json"), key=acc_key_file)
            rechecks.append({"path": f"file-{mode}", "model": i, "status": outcome.status,
                             "delta": abs(outcome.recomputed["log10_p"] - outcome.original["log10_p"])})
        app = build_app(model=model, name="m", num_classes=10, input_shape=(1, 28, 28), labels_only=True)
        transcript, report = work / f"t-{i}.sqlite", work / f"r-{i}-http.html"
        with serve_in_background(app) as server:
            verdict = api.verify_remote(key=acc_key_file, url=server.url, model_name="m", concurrency=4,
                                        transcript=transcript, report=report, transcript_sync="process")
        row["http_sequential"] = verdict.log10_p
        outcome = recheck(report=report.with_suffix(".json"), key=acc_key_file, transcript=transcript)
        rechecks.append({"path": "http", "model": i, "status": outcome.status,
                         "delta": abs(outcome.recomputed["log10_p"] - outcome.original["log10_p"])})
        verdict = api.verify(key=acc_key_file, arch=arch, suspect=path, mode="fixed", rule=rule, rule_queries=300)
        row["tiebreak_combined"] = verdict.log10_p
        row["tiebreak_test"] = verdict.tests[1].log10_p
        api.write_report(verdict=verdict, key=acc_key_file, path=work / f"r-{i}-tiebreak.html")
        outcome = recheck(report=work / f"r-{i}-tiebreak.json", key=acc_key_file)
        rechecks.append({"path": "file-fixed + tiebreak", "model": i, "status": outcome.status,
                         "delta": abs(outcome.recomputed["log10_p"] - outcome.original["log10_p"])})
        try:
            row["whitebox"] = api.verify_whitebox(key=acc_key_file, reference=reference, suspect=path).log10_p
        except UsageError as exc:
            row["whitebox"] = "refused: no layer shaped like the reference's" if "no tensor of shape" in str(exc) \
                else f"refused: {exc}"
        paths = [row[k] for k in ("file_sequential", "file_fixed", "http_sequential", "tiebreak_combined", "whitebox")
                 if isinstance(row[k], float)]
        row["wmark_min_log10_p"] = min(paths)
        row["wmark_reaches_alpha"] = min(paths) <= math.log10(ALPHA)
        rows.append(row)
        print(f"model {i}: naive {row['naive_log10_p']:.1f}, wmark min {row['wmark_min_log10_p']:.2f}", flush=True)

    edited = json.loads(acc_key_file.read_text())
    edited["schemes"]["trigger"]["pattern"] = "lowfreq-noise"
    (work / "edited.key").write_text(json.dumps(edited))
    refusals = {}
    try:
        load_key(work / "edited.key")
        refusals["edited_key_file"] = "accepted"
    except UsageError as exc:
        refusals["edited_key_file"] = f"refused: {exc}"
    from dataclasses import replace

    recommitted = replace(acc_key, schemes={**acc_key.schemes, "trigger": {**acc_key.schemes["trigger"],
                                                                         "pattern": "lowfreq-noise"}})
    try:
        check_key_provenance(key=recommitted, model=reference, public_key=signer_public)
        refusals["recommitted_key_vs_signed_release"] = "accepted"
    except EvidenceError as exc:
        refusals["recommitted_key_vs_signed_release"] = f"refused: {exc}"
    naive_hits = sum(r["naive_log10_p"] <= math.log10(ALPHA) for r in rows)
    wmark_hits = sum(r["wmark_reaches_alpha"] for r in rows)
    results["false_claim"] = {
        "independent_models": len(rows), "adversarial_inputs": n_adv, "craft_seconds": craft_s,
        "targeted_success_on_accuser_models": on_own,
        "naive_verifier_reaching_alpha": naive_hits, "wmark_reaching_alpha_any_path": wmark_hits,
        "adversarial_inputs_among_wmark_triggers": len(trigger_digests & adv_digests),
        "refusals": refusals, "rows": rows,
    }
    print(table(rows, ["model", "naive_matches", "naive_log10_p", "file_sequential", "file_fixed", "http_sequential",
                       "tiebreak_test", "whitebox", "wmark_reaches_alpha"]))
    print(f"naive verifier: {naive_hits} of {len(rows)} independent models at alpha = {ALPHA:g}; wmark: {wmark_hits} "
          f"of {len(rows)} (any path); adversarial inputs among wmark's triggers: {len(trigger_digests & adv_digests)}")

    # (b) Key search against one independent model.
    _, path0, model0 = loaded[0]
    suspect = LocalSuspect(model0, input_shape=(1, 28, 28), description=str(path0))
    start = time.perf_counter()
    best_p, best_key = 0.0, None
    all_p = []
    for _ in range(n_keys):
        k = generate_key(owner="Dishonest Accuser")
        p = trigger_set_test(key=k, suspect=suspect, mode="fixed").log10_p
        all_p.append(p)
        if p < best_p or best_key is None:
            best_p, best_key = p, k
    search_s = time.perf_counter() - start
    per_key = search_s / n_keys
    assert best_key is not None
    try:
        check_key_provenance(key=best_key, model=reference, public_key=signer_public)
        best_refused = "accepted"
    except EvidenceError as exc:
        best_refused = f"refused: {exc}"
    results["key_search"] = {
        "keys": n_keys, "seconds": search_s, "seconds_per_key": per_key, "best_log10_p": best_p,
        "best_log10_p_corrected_for_search": min(0.0, best_p + math.log10(n_keys)),
        "share_of_keys_at_or_below_log10_p_minus_2": float(np.mean(np.asarray(all_p) <= -2)),
        "projected_cpu_hours_to_reach_alpha": per_key / ALPHA / 3600,
        "best_key_vs_signed_release": best_refused,
        "what_the_report_shows": {"key_created": best_key.created, "key_commitment": best_key.commitment(),
                                  "release_commitment": release["commitment"]},
    }
    print(f"key search: best log10 p over {n_keys} keys = {best_p:.2f} in {search_s:.1f} s "
          f"({per_key * 1000:.1f} ms/key); bound best-of-N: log10 p + log10 N = {best_p + math.log10(n_keys):.2f}; "
          f"projected {per_key / ALPHA / 3600:.0f} CPU-hours to reach alpha; against the signed release: {best_refused}")

    # (c) Tampering.
    offsets = random.Random(0).sample(range(10**6), 25)
    model_bytes = reference.stat().st_size
    header = int.from_bytes(reference.read_bytes()[:8], "little")
    tamper = {}

    def check_release() -> None:
        verify_model(path=reference, public_key=signer_public)

    tamper["signed_model_weights"] = flip_detected(reference, [8 + header + o % (model_bytes - 8 - header)
                                                               for o in offsets], check_release)
    tamper["signed_model_metadata"] = flip_detected(reference, [8 + o % header for o in offsets], check_release)
    tamper["provenance_statement"] = flip_detected(provenance_path(reference), offsets, check_release)
    tamper["model_signature_bundle"] = flip_detected(signature_path(reference), offsets, check_release)
    report_json = work / "r-0-fixed.json"
    sign_file(path=report_json, private_key=signer_private)
    tamper["signed_report_signature"] = flip_detected(
        report_json, offsets, lambda: verify_file(path=report_json, public_key=signer_public))
    tamper["report_recheck"] = flip_detected(report_json, offsets,
                                             lambda: recheck(report=report_json, key=acc_key_file))
    transcript0, http_report = work / "t-0.sqlite", work / "r-0-http.json"
    tamper["transcript_recheck"] = flip_detected(
        transcript0, offsets, lambda: recheck(report=http_report, key=acc_key_file, transcript=transcript0))
    fresh = subprocess.run([sys.executable, "-m", "wmark.cli", "recheck", "--report", str(http_report), "--key",
                            str(acc_key_file), "--transcript", str(transcript0), "--json"], check=False, capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    fresh_doc = json.loads(fresh.stdout) if fresh.returncode in (0, 1) else {"error": fresh.stderr}
    results["tampering"] = {name: {"detected": c, "flips": n} for name, (c, n) in tamper.items()}
    results["recheck"] = {"reports": len(rechecks), "same": sum(r["status"] == "same" for r in rechecks),
                          "partial": sum(r["status"] == "partial" for r in rechecks),
                          "max_abs_delta_log10_p": max(r["delta"] for r in rechecks),
                          "fresh_process": {"exit": fresh.returncode, "status": fresh_doc.get("status")}}
    results["release"] = {k: v for k, v in release.items() if k != "model"}
    print(table([{"target": k, "detected": f"{c} of {n}"} for k, (c, n) in tamper.items()], ["target", "detected"]))
    print(f"recheck: {results['recheck']['same']} of {len(rechecks)} reports give the same verdict, "
          f"{results['recheck']['partial']} partial "
          f"(max |delta log10 p| {results['recheck']['max_abs_delta_log10_p']:.2g}); fresh process exit "
          f"{fresh.returncode}")
    print(f"wrote {write_results('forgery_quick' if quick else 'forgery', results)}")
    shutil.rmtree(work)  # the accuser's keys, reports and transcripts were only needed for the checks above


if __name__ == "__main__":
    main()
