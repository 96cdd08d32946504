"""The gauntlet: every watermarking scheme against every attack on real data, per model family, plus a null panel.

Protocol (in the spirit of Lukas et al., IEEE S&P 2022, with exact statistics):

* The training set is split once (fixed seed) into the owner's half and the attacker's half; attackers
  never see the owner's data or key. The owner trains a base CNN and fine-tunes it once per scheme.
* Rows are schemes: ``none`` (an unmarked fine-tune, the control), ``trigger`` (black-box trigger set),
  ``weights`` (white-box weight watermark), ``trigger+weights`` (both, Holm-combined), ``api-mark`` (the
  unmarked model served behind the keyed per-input marking API; only extraction applies),
  ``trigger+api-mark`` (trigger-set weights behind that API) and ``trigger+weights+api-tiebreak``, the full
  deployment: the trigger-set + weight-marked model served behind the keyed tie-break API
  (:mod:`wmark.schemes.tiebreak`; its rule built from the owner's half with reference surrogates and
  committed verification inputs, every client's near-tie queries logged). Its verdict combines, with the
  library's weighted Holm, the trigger set, the weight mark, the committed-input tie-break test and, for a
  surrogate, the log test on its thief's own logged queries; a copy should read ``copy`` and a surrogate
  ``extracted``.
* Columns are attacks: fine-tuning (all layers / last / re-initialised head), pruning, int8
  quantization, weight noise, neuron permutation + rescaling, renaming, a combined attack, and extraction
  (hard labels, soft labels, cross-architecture, each trained to convergence, and an early-stopped
  hard-label surrogate). An attack counts only if the attacked model keeps its
  test accuracy within 5 pp of the watermarked model (every accuracy is reported anyway).
* Null panel: independently trained models (seeds, data subsets, architectures) are checked with every
  row: the API rows against every logged thief's queries (and the full row without a log as well); the
  false accusations must be 0.

``--family`` picks the model family (:mod:`gauntlet_families`): ``cnn`` (the default, ``fmnist-cnn`` on
Fashion-MNIST 1×28×28, described above), ``resnet`` (``resnet-small`` with BatchNorm and residual adds on
Fashion-MNIST as 3×32×32; the residual-stream permutation replaces the plain-chain one and BatchNorm folding
is added) or ``text`` (``tiny-bert`` on Debian fortunes with a text key; hidden-space + head permutation and
fused QKV; ``tiny-bert`` and ``text-bow`` thieves). Each family's plan states its scale, its thieves and what
the library cannot run on it (refused with the reason, never shown as a cell).

Every decision is at alpha = 1e-6. Trained models are cached on disk keyed by configuration
(``benchmarks/cache/gauntlet``), so re-runs are cheap. Outputs: ``benchmarks/results/gauntlet.json``,
``gauntlet.md`` and ``gauntlet.png`` (``--quick`` writes ``gauntlet-quick.*``); for the other families
``gauntlet-<family>[-quick].*``.

Usage: python benchmarks/gauntlet.py [--family cnn|resnet|text] [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import CACHE, RESULTS, machine, table
from gauntlet_families import (
    EMBEDS,
    FULL_ROW,
    REWRITES,
    SCHEMES,
    Family,
    Plan,
    family,
    family_doc,
    family_lines,
    rewrite,
    sliced,
)
from tqdm.auto import tqdm

from wmark import api
from wmark.errors import UsageError
from wmark.evidence import alpha_share
from wmark.keys import save_key
from wmark.models import load_model
from wmark.schemes.api_mark import api_mark_test
from wmark.schemes.querylog import MarkLog, TieBreakLog
from wmark.schemes.tiebreak import (
    LOG_TEST_WEIGHT,
    LogInputs,
    open_tiebreak_rule,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
)
from wmark.suspects import LocalSuspect
from wmark.text import TextInputs
from wmark.verify import DEFAULT_ALPHA, TestResult, decide, trigger_set_test

TIEBREAK_QUERIES = 1000


class Workshop:
    """Makes (or finds in the cache) every model the gauntlet needs."""

    def __init__(self, fam: Family, plan: Plan, seed: int, quick: bool) -> None:
        self.fam, self.plan, self.seed = fam, plan, seed
        self.dir = fam.cache_dir(CACHE, quick, seed)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key_path = self.dir / "owner.key"
        self.key = fam.key(seed)
        save_key(self.key, self.key_path)
        self.info: dict[str, dict[str, Any]] = {}

    def path(self, config: dict[str, Any]) -> Path:
        # every model is keyed by the data it was trained or measured on as well (a quick run's slice changes it;
        # a slice file by its name, which holds its sizes, so that the cache can move)
        keyed = {**config, "data": [Path(spec).name for spec in (self.fam.owner, self.fam.attacker)]}
        digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
        return self.dir / f"{config['name']}-{digest}.safetensors"

    def get(self, config: dict[str, Any], make: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        """Return a cached model file and its info (accuracy, seconds), making it first if needed."""
        path = self.path(config)
        sidecar = path.with_suffix(".json")
        if not (path.exists() and sidecar.exists()):
            info = make(path)
            sidecar.write_text(json.dumps({k: v for k, v in info.items() if _jsonable(v)}, sort_keys=True))
        return path, json.loads(sidecar.read_text())

    def base(self) -> Path:
        p = self.plan
        return self.get({"name": "base", "epochs": p.base_epochs, "n": p.owner_samples, "seed": self.seed},
                        lambda out: api.train(arch=self.fam.arch, data=self.fam.owner, out=out, epochs=p.base_epochs, seed=self.seed,
                                              max_samples=p.owner_samples))[0]

    def marked(self, schemes: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
        p = self.plan
        name = "+".join(schemes) if schemes else "plain"
        # keyed by the base model it fine-tunes (its file name holds its configuration's digest)
        cfg = {"name": f"embed-{name}", "epochs": p.embed_epochs, "n": p.owner_samples, "seed": self.seed,
               "key": self.key.fingerprint(), "base": self.base().name}
        per_batch, lookahead = (p.trigger_per_batch, p.trigger_lookahead) if "trigger" in schemes else (None, None)
        cfg.update({k: v for k, v in (("trigger_per_batch", per_batch), ("lookahead", lookahead)) if v is not None})
        return self.get(cfg, lambda out: api.embed(
            key=self.key_path, arch=self.fam.arch, weights=self.base(), data=self.fam.owner, out=out, schemes=schemes,
            epochs=p.embed_epochs, seed=self.seed, max_samples=p.owner_samples, trigger_per_batch=per_batch,
            # a plan without lookahead mixes its triggers (a text key would otherwise get the margin's own pass)
            trigger_lookahead=None if lookahead == 0 else lookahead, trigger_mixing=True if lookahead == 0 else None))

    def attacked(self, source: Path, attack: str) -> tuple[Path, dict[str, Any]]:
        """Apply one weight-space or fine-tuning attack to ``source``."""
        p = self.plan
        # Keyed by the source model, not the row: rows that share a model (none / api-mark) share its attacks.
        cfg = {"name": f"{source.stem}-{attack}", "source": source.name, "epochs": p.attack_epochs,
               "n": p.attacker_samples}
        common = {"arch": self.fam.arch, "data": self.fam.attacker, "max_samples": p.attacker_samples}
        steps = self.fam.steps[attack]
        def make(out: Path) -> dict[str, Any]:
            current, info = source, {}
            for i, step in enumerate(steps):
                target = out if i == len(steps) - 1 else out.with_name(f"{out.stem}-step{i}.safetensors")
                if step["kind"] in REWRITES:
                    info = rewrite(step["kind"], weights=current, out=target, seed=step.get("seed", 0), **common)
                else:
                    info = api.attack(weights=current, out=target, **common, **step)
                current = target
            return info

        return self.get(cfg, make)

    def tiebreak_rule(self, served: Path) -> Path:
        """The tie-break rule for ``served`` (built from the owner's half, verification inputs committed)."""
        p = self.plan
        cfg = {"name": "tiebreak-rule", "served": served.name, "references": list(p.tiebreak_references),
               "repeats": p.tiebreak_reference_repeats, "verify": TIEBREAK_QUERIES, "seed": self.seed,
               "key": self.key.fingerprint()}
        # the cnn rule sees the owner's whole half (as it always has); the other families their own subset
        subset = None if self.fam.name == "cnn" else p.owner_samples
        if subset is not None:
            cfg["n"] = subset
        path = self.path(cfg)
        sidecar = path.with_suffix(".json")
        if not (path.exists() and sidecar.exists()):
            info = api.build_tiebreak(key=self.key_path, arch=self.fam.arch, weights=served, data=self.fam.owner, out=path,
                                      references=p.tiebreak_references, verify_count=TIEBREAK_QUERIES, seed=self.seed,
                                      reference_repeats=p.tiebreak_reference_repeats, max_samples=subset)
            sidecar.write_text(json.dumps({k: v for k, v in info.items() if _jsonable(v)}, sort_keys=True))
        return path

    def surrogate(self, row: str, victim: Path, labels: str, arch: str, marked_api: bool,
                  epochs: int, tiebreak: Path | None = None) -> tuple[Path, dict[str, Any]]:
        p = self.plan
        log = self.dir / f"{row}-api.sqlite"
        cfg = {"name": f"{row}-extract-{labels}-{arch}-{epochs}", "victim": victim.name, "q": p.extract_queries,
               "epochs": epochs, "marked_api": marked_api}
        if tiebreak is not None:
            cfg["tiebreak"] = tiebreak.name
        client = thief_client(labels, arch, epochs)
        return self.get(cfg, lambda out: api.extract(
            victim_arch=self.fam.arch, victim=victim, arch=arch, data=self.fam.attacker, out=out, labels=labels,
            queries=p.extract_queries, epochs=epochs, seed=self.seed,
            key=self.key_path if (marked_api or tiebreak is not None) else None,
            mark="tiebreak" if tiebreak is not None else ("flip" if marked_api else None), rule=tiebreak,
            log=log if (marked_api or tiebreak is not None) else None, client=client))

    def null_model(self, arch: str, seed: int, n: int | None, epochs: int) -> tuple[Path, dict[str, Any]]:
        return self.get({"name": f"null-{arch}", "seed": seed, "n": n, "epochs": epochs},
                        lambda out: api.train(arch=arch, data=self.fam.attacker, out=out, epochs=epochs, seed=seed,
                                              max_samples=n))


def thief_client(labels: str, arch: str, epochs: int) -> str:
    """The API account an extraction thief queries under (its marked queries are logged under it)."""
    return f"thief-{labels}-{arch}-{epochs}ep"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


class Tester:
    """Runs a scheme's tests on a suspect file (each component test once per suspect, then combined)."""

    def __init__(self, shop: Workshop, weights_references: dict[str, Path], anchor: Path, served: Path,
                 rule: Path) -> None:
        self.shop, self.key = shop, shop.key
        self.references, self.anchor = weights_references, anchor
        self.fam = shop.fam
        self.rule, self.served = open_tiebreak_rule(key=self.key, rule=rule, arch=self.fam.arch, served=served)
        self.text = TextInputs.from_key(self.key)
        self._tests: dict[tuple[str, ...], TestResult] = {}
        self._ranked: dict[str, LogInputs] = {}

    def _once(self, name: tuple[str, ...], make: Callable[[], TestResult]) -> TestResult:
        if name not in self._tests:
            self._tests[name] = make()
        return self._tests[name]

    def _suspect(self, path: Path, arch: str) -> LocalSuspect:
        model, _ = load_model(arch, path, num_classes=self.fam.num_classes, input_shape=self.fam.input_shape)
        return LocalSuspect(model, input_shape=self.fam.input_shape, expose_scores=False, text=self.text)

    def trigger(self, suspect: Path, arch: str, share: float = 1.0) -> TestResult:
        return self._once(("trigger", str(suspect), f"{share:.6f}"), lambda: trigger_set_test(
            key=self.key, suspect=self._suspect(suspect, arch), share=share))

    def weights(self, suspect: Path, row: str) -> TestResult:
        """The weight mark, aligned to the row's marked model (the weights-only model for the older rows)."""
        reference = self.references[row]
        return self._once(("weights", str(suspect), str(reference)), lambda: self._weights(suspect, reference))

    def _weights(self, suspect: Path, reference: Path) -> TestResult:
        try:
            verdict = api.verify_whitebox(key=self.shop.key_path, reference=reference, suspect=suspect,
                                          anchor=self.anchor)
        except UsageError as exc:
            # A suspect without any tensor of the marked layer's shape cannot carry the mark.
            return TestResult(name="weights", evidence_of="copy", null={}, log10_p=0.0, queries=0, matches=0,
                              method="no compatible tensor", details={"note": str(exc)})
        return verdict.tests[0]

    def api_mark(self, suspect: Path, arch: str, row: str, client: str) -> TestResult:
        model, _ = load_model(arch, suspect, num_classes=self.fam.num_classes, input_shape=self.fam.input_shape)
        with MarkLog(self.shop.dir / f"{row}-api.sqlite", key=self.key, create=False) as log:
            return api_mark_test(key=self.key, suspect=LocalSuspect(model, input_shape=self.fam.input_shape), log=log,
                                 client=client, max_queries=1000)

    def tiebreak(self, suspect: Path, arch: str) -> TestResult:
        """The committed verification inputs, asked with labels only."""
        return self._once(("tiebreak", str(suspect)), lambda: tiebreak_test(
            key=self.key, rule=self.rule, served=self.served, suspect=self._suspect(suspect, arch),
            queries=TIEBREAK_QUERIES))

    def tiebreak_log(self, suspect: Path, arch: str, client: str) -> TestResult:
        """The log test on the inputs ``client`` asked the tie-break API (ranked once per client, key-free)."""
        if client not in self._ranked:
            with TieBreakLog(self.shop.dir / f"{self.fam.full_row}-api.sqlite", key=self.key, create=False) as log:
                self._ranked[client] = select_log_inputs(key=self.key, rule=self.rule, served=self.served, log=log,
                                                         client=client)
        return self._once(("tiebreak-log", str(suspect), client), lambda: tiebreak_log_test(
            key=self.key, rule=self.rule, served=self.served, suspect=self._suspect(suspect, arch),
            chosen=self._ranked[client], queries=TIEBREAK_QUERIES))

    def run(self, scheme: str, suspect: Path, arch: str, *, row: str = "", client: str | None = None,
            functional_twin: Path | None = None) -> dict[str, Any]:
        """Every test of ``scheme`` on one suspect, combined into a verdict by (weighted) Holm."""
        blackbox_file = functional_twin or suspect
        tests: list[TestResult] = []
        parts = scheme.split("+")
        tiebreak = "api-tiebreak" in parts
        whitebox = self.fam.whitebox and ("none" in parts or "weights" in parts)
        if "none" in parts or "trigger" in parts:
            # next to the tie-break tests the trigger test stops at its share of alpha, as `wmark verify` does
            weights = [1.0] * (2 + whitebox) + ([LOG_TEST_WEIGHT] if client is not None else [])
            share = alpha_share(1.0, weights) if tiebreak else 1.0
            tests.append(self.trigger(blackbox_file, arch, share))
        if whitebox:
            tests.append(self.weights(suspect, scheme))
        if "api-mark" in parts and client is not None:
            tests.append(self.api_mark(blackbox_file, arch, row, client))
        if tiebreak:
            tests.append(self.tiebreak(blackbox_file, arch))
            if client is not None:
                tests.append(self.tiebreak_log(blackbox_file, arch, client))
        if not tests:
            # The API mark lives in answers, not weights: a copied checkpoint has no logged queries to replay.
            return {"decision": "n/a", "kind": "n/a", "log10_p": None, "queries": 0}
        verdict = decide(key=self.key, tests=tests, alpha=DEFAULT_ALPHA, suspect=str(suspect)).to_dict()
        return {"decision": verdict["decision"], "kind": verdict["kind"], "log10_p": verdict["log10_p"],
                "queries": verdict["queries"], "correction": verdict["correction"],
                "tests": {t["name"]: t["log10_p"] for t in verdict["tests"]}}


def run(fam: Family, plan: Plan, seed: int, quick: bool, rows: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    shop = Workshop(fam, plan, seed, quick)
    shop.fam = fam = sliced(fam, plan, shop.dir)
    # the older rows' weight test aligns to the weights-only model (the control's too, when it is made; else the
    # served model); the full row to its own served model
    older = {"weights", "trigger+weights"} | ({"none"} if fam.name == "cnn" else set())
    needed = set(rows) | {"none"} | ({"weights"} if fam.whitebox and set(rows) & older else set())
    marked = {row: shop.marked(EMBEDS[row]) for row in SCHEMES if row in needed}
    served = shop.marked(EMBEDS[fam.full_row])[0]
    rule = shop.tiebreak_rule(served)
    references = {row: marked["weights"][0] if "weights" in marked else served
                  for row in ("none", "weights", "trigger+weights")}
    references[fam.full_row] = served
    tester = Tester(shop, weights_references=references, anchor=shop.base(), served=served, rule=rule)
    plain_acc = marked["none"][1]["test_accuracy"]
    fidelity = {row: {"accuracy": info["test_accuracy"], "gap_pp": 100 * (plain_acc - info["test_accuracy"]),
                      "embed_seconds": info["seconds"]} for row, (_, info) in marked.items()}

    cells: list[dict[str, Any]] = []
    pairs = [(row, attack) for row in rows for attack in plan.attacks]
    jobs = [(row, attack) for row, attack in pairs
            if not attack.startswith("extract-") or plan.extract_rows is None or row in plan.extract_rows]
    for row, attack in tqdm(jobs, desc="gauntlet", unit="cell", dynamic_ncols=True):
        source, info = marked[row]
        served_marked = "api-" in row
        arch, client, twin = fam.arch, None, None
        if attack == "none":
            suspect, acc = source, info["test_accuracy"]
        elif attack.startswith("extract-"):
            labels, arch = fam.surrogates[attack]
            epochs = plan.early_stop_epochs if attack.endswith("-early") else plan.extract_epochs
            suspect, sinfo = shop.surrogate(row, source, labels, arch, served_marked, epochs,
                                            tiebreak=rule if row == fam.full_row else None)
            acc = sinfo["test_accuracy"]
            client = thief_client(labels, arch, epochs) if served_marked else None
        else:
            suspect, ainfo = shop.attacked(source, attack)
            acc = ainfo["test_accuracy"]
            if attack in fam.twins:
                # Renaming, folding or fusing changes no prediction but leaves a file the architecture no longer
                # loads: black-box tests query the functionally identical file before that step.
                twin = (source if fam.twins[attack] == "source"
                        else suspect.with_name(f"{suspect.stem}-step0.safetensors"))
        result = tester.run(row, suspect, arch, row=row, client=client, functional_twin=twin)
        within = acc is not None and acc >= info["test_accuracy"] - 0.05
        expected = _expected(row, attack)
        cells.append({"scheme": row, "attack": attack, "attacked_accuracy": acc, "counts": within,
                      "expected": expected, **result})
    null_panel = run_null_panel(shop, tester, plan, rows)
    rule_info = json.loads(rule.with_suffix(".json").read_text())
    return {"cells": cells, "null_panel": null_panel, "fidelity": fidelity,
            "not_run": [list(pair) for pair in pairs if pair not in jobs],
            "full_row": full_row_summary(cells, fam.full_row),
            "tiebreak_rule": {k: rule_info.get(k) for k in ("components", "references", "verification", "seconds")},
            "wall_seconds": time.perf_counter() - start}


def full_row_summary(cells: list[dict[str, Any]], full_row: str = FULL_ROW) -> dict[str, Any]:
    """Whether the full deployment row catches every attack that stays within the 5-pp accuracy budget."""
    counted = [c for c in cells if c["scheme"] == full_row and c["counts"]]
    missed = [c["attack"] for c in counted if c["decision"] != "detected"]
    return {"scheme": full_row, "attacks_in_budget": len(counted), "caught": len(counted) - len(missed),
            "missed": missed, "weakest_log10_p": max((c["log10_p"] for c in counted), default=None)}


def _expected(row: str, attack: str) -> str:
    """What an honest reader should expect (for the table's last column; never used to decide)."""
    if row == "none":
        return "not_detected"
    if attack.startswith("extract-"):
        return "detected" if "api-" in row else "not_detected"
    if row == "api-mark":
        return "n/a"
    return "detected"


def run_null_panel(shop: Workshop, tester: Tester, plan: Plan, schemes: list[str]) -> dict[str, Any]:
    """Independent models checked with every row run: the API rows against every logged thief's queries, the
    full row also without a log (as a copy is checked)."""
    clients: dict[str, list[str]] = {}
    extracted = [row for row in schemes if plan.extract_rows is None or row in plan.extract_rows]
    for row in ("api-mark", "trigger+api-mark"):
        if row in extracted:  # a row no thief queried has no log
            with MarkLog(shop.dir / f"{row}-api.sqlite", key=shop.key, create=False) as log:
                clients[row] = sorted(log.clients())
    full = shop.fam.full_row
    if full in extracted:
        with TieBreakLog(shop.dir / f"{full}-api.sqlite", key=shop.key, create=False) as tlog:
            clients[full] = sorted(tlog.clients())
    plain = [row for row in ("trigger", "weights", "trigger+weights", full) if row in schemes]
    rows, accusations, min_log10_p = [], 0, 0.0
    for arch, seed, n, epochs in tqdm(plan.null_models, desc="null panel", unit="model", dynamic_ncols=True):
        path, info = shop.null_model(arch, seed, n, epochs)
        checks = {row: tester.run(row, path, arch) for row in plain}
        for row, names in clients.items():
            for client in names:
                checks[f"{row}[{client}]"] = tester.run(row, path, arch, row=row, client=client)
        for name, res in checks.items():
            accusations += res["decision"] == "detected"
            min_log10_p = min(min_log10_p, res["log10_p"])
            rows.append({"model": f"{arch} seed {seed} n={n or 'all'}", "accuracy": info["test_accuracy"],
                         "scheme": name, "decision": res["decision"], "log10_p": res["log10_p"]})
    return {"models": len(plan.null_models), "checks": len(rows), "false_accusations": accusations,
            "min_log10_p": min_log10_p, "rows": rows}


def carry_rows(doc: dict[str, Any], earlier: dict[str, Any]) -> None:
    """Add the cells (and fidelity) of the rows this run did not measure from an earlier run, each labelled
    with that run's date; the null panel stays this run's own, the full-row summary reads the merged cells."""
    when = earlier["machine"]["date"]
    kept = [dict(c, measured=when) for c in earlier["cells"] if c["scheme"] not in doc["rows"]]
    if not kept:
        return
    order = {row: i for i, row in enumerate(SCHEMES)}
    doc["cells"] = sorted(kept + doc["cells"], key=lambda c: order.get(c["scheme"], len(order)))
    for row, fid in earlier["fidelity"].items():
        if row not in doc["rows"]:
            doc["fidelity"].setdefault(row, dict(fid, measured=when))
    doc["full_row"] = full_row_summary(doc["cells"], doc["full_row"]["scheme"])
    panel = earlier["null_panel"]
    doc["carried"] = {"from": when, "rows": sorted({c["scheme"] for c in kept}, key=lambda r: order.get(r, 99)),
                      "null_panel": {k: panel[k] for k in ("models", "checks", "false_accusations", "min_log10_p")}}


def write_outputs(doc: dict[str, Any], stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    heatmap(doc, RESULTS / f"{stem}.png")
    (RESULTS / f"{stem}.md").write_text(markdown(doc, f"{stem}.png"))


def _cell_text(cell: dict[str, Any]) -> str:
    if cell["decision"] == "n/a":
        return "n/a"
    mark = "✔" if cell["decision"] == "detected" else "✘"
    extra = f" {cell['kind']}" if cell["decision"] == "detected" and "api-" in cell["scheme"] else ""
    return f"{mark} {cell['log10_p']:.1f}{extra}"


def _cells(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any] | None]:
    """The cells by (scheme, attack), with None for the pairs the run's plan left out (a smoke run extracts only
    from some rows); any other missing pair is an error, not a blank."""
    by: dict[tuple[str, str], dict[str, Any] | None] = {(c["scheme"], c["attack"]): c for c in doc["cells"]}
    by.update({(s, a): None for s, a in doc.get("not_run", [])})
    return by


def markdown(doc: dict[str, Any], png: str) -> str:
    attacks = list(dict.fromkeys(c["attack"] for c in doc["cells"]))
    schemes = list(dict.fromkeys(c["scheme"] for c in doc["cells"]))
    by = _cells(doc)
    fam = doc.get("family")
    title = f"# Gauntlet: {fam['name']} family" if fam else "# Gauntlet"
    lines = [f"{title} ({'quick' if doc['quick'] else 'full'} run, seed {doc['seed']})", "",
             (f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs, torch {doc['machine']['torch']}; "
             f"wall time {doc['wall_seconds'] / 60:.1f} min; alpha = {DEFAULT_ALPHA:g}."), "",
             ("Each cell: ✔ detected / ✘ not detected, then log10 p (and the verdict's kind where the API mark "
             "takes part); – not run. Attacked accuracy is in the second table; *italic* marks an attack that "
             "lost more than 5 pp (it does not count)."), "", f"![heatmap]({png})", "",
             *([doc["note"], ""] if doc.get("note") else []), *family_lines(fam),
             *([(f"Rows measured in an earlier run ({doc['carried']['from']}) and kept, not re-run: "
                f"{', '.join(doc['carried']['rows'])}; the null panel below covers only the rows of this run."), ""]
               if doc.get("carried") else []),
             "| scheme | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for s in schemes:
        row = []
        for a in attacks:
            c = by[(s, a)]
            if c is None:
                row.append("–")
                continue
            text = _cell_text(c)
            row.append(text if c["counts"] or c["decision"] == "n/a" else f"*{text}*")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    lines += ["", "Attacked test accuracy:", "", "| scheme | " + " | ".join(attacks) + " |",
              "|---|" + "---|" * len(attacks)]
    for s in schemes:
        lines.append(f"| {s} | " + " | ".join(
            f"{by[(s, a)]['attacked_accuracy']:.3f}" if (by[(s, a)] or {}).get("attacked_accuracy") is not None
            else "" for a in attacks)
            + " |")
    lines += ["", ("Fidelity (test accuracy; gap vs the unmarked fine-tune) and embedding time (seconds as measured "
              "when the cached model was made, whatever the machine's load then; `benchmarks/embed_overhead.py` "
              "times embedding side by side):"), "",
              "| scheme | accuracy | gap (pp) | embed s |", "|---|---|---|---|"]
    for s, f in doc["fidelity"].items():
        when = " (earlier run)" if f.get("measured") else ""
        lines.append(f"| {s}{when} | {f['accuracy']:.4f} | {f['gap_pp']:+.2f} | {f['embed_seconds']:.1f} |")
    full = doc["full_row"]
    lines += ["", f"Full deployment ({full['scheme']}): {full['caught']} of {full['attacks_in_budget']} attacks within "
              f"the 5-pp budget caught" + (f"; missed: {', '.join(full['missed'])}" if full["missed"] else "")
              + (f"; weakest log10 p = {full['weakest_log10_p']:.2f}." if full["weakest_log10_p"] is not None else ".")]
    n = doc["null_panel"]
    lines += ["", (f"Null panel: {n['models']} independent models, {n['checks']} checks, "
              f"**{n['false_accusations']} false accusations**, smallest log10 p = {n['min_log10_p']:.2f}."), ""]
    if doc.get("carried"):
        e = doc["carried"]["null_panel"]
        lines += [(f"The earlier run's null panel (rows {', '.join(doc['carried']['rows'])}): {e['models']} models, "
                  f"{e['checks']} checks, {e['false_accusations']} false accusations, smallest log10 p = "
                  f"{e['min_log10_p']:.2f}."), ""]
    return "\n".join(lines)


def heatmap(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = list(dict.fromkeys(c["attack"] for c in doc["cells"]))
    schemes = list(dict.fromkeys(c["scheme"] for c in doc["cells"]))
    by = _cells(doc)
    grid = np.full((len(schemes), len(attacks)), np.nan)
    for i, s in enumerate(schemes):
        for j, a in enumerate(attacks):
            c = by[(s, a)]
            if c is not None and c["decision"] != "n/a":
                grid[i, j] = min(20.0, -c["log10_p"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(attacks), 1.2 + 0.6 * len(schemes)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=20, aspect="auto")
    for i, s in enumerate(schemes):
        for j, a in enumerate(attacks):
            c = by[(s, a)]
            text = ("–" if c is None else "n/a" if c["decision"] == "n/a"
                    else "✔" if c["decision"] == "detected" else "✘")
            ax.text(j, i, text, ha="center", va="center", color="white" if np.isnan(grid[i, j]) or grid[i, j] < 12
                    else "black", fontsize=11)
    ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right")
    ax.set_yticks(range(len(schemes)), schemes)
    fig.colorbar(im, ax=ax, label="−log10 p (capped at 20; 6 = alpha)")
    ax.set_title("wmark gauntlet: evidence per scheme and attack")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset for CI (under 5 minutes)")
    parser.add_argument("--family", choices=("cnn", "resnet", "text"), default="cnn",
                        help="model family: fmnist-cnn, resnet-small on 3x32x32 images, or tiny-bert on fortunes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=None, help="comma-separated rows to run (default: all of the family's)")
    parser.add_argument("--carry", type=Path, default=None,
                        help="an earlier results file whose cells of the rows not run are kept, labelled as such")
    parser.add_argument("--render", type=Path, default=None,
                        help="write the outputs again from a saved results file (with --carry: adding its rows)")
    args = parser.parse_args()
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        if args.carry is not None:
            carry_rows(doc, json.loads(args.carry.read_text()))
        write_outputs(doc, family(doc.get("family", {}).get("name", "cnn"), 1).stem(doc["quick"]))
        return
    plan = family(args.family, 1).plan(args.quick)
    fam = family(args.family, plan.attack_epochs)
    offered = list(fam.rows)
    asked = args.rows.split(",") if args.rows else (plan.rows or offered)
    rows = [r for r in offered if r in asked]
    unknown = set(asked) - set(offered)
    if unknown or not rows:
        parser.error(f"unknown rows {sorted(unknown)} for the {fam.name} family; choose among {', '.join(offered)}")
    torch.manual_seed(args.seed)
    result = run(fam, plan, args.seed, args.quick, rows)
    doc = {"quick": args.quick, "seed": args.seed, "alpha": DEFAULT_ALPHA, "machine": machine(), "rows": rows,
           **result}
    if fam.name != "cnn":
        doc["family"] = family_doc(fam, plan)
    elif plan.slice_data is not None:
        doc["slice"] = list(plan.slice_data)  # the first training and test images the run used
    if args.carry is not None:
        carry_rows(doc, json.loads(args.carry.read_text()))
    stem = fam.stem(args.quick)
    write_outputs(doc, stem)
    print(table(doc["cells"], ["scheme", "attack", "attacked_accuracy", "decision", "kind", "log10_p", "queries",
                               "expected"]))
    n = doc["null_panel"]
    full = doc["full_row"]
    print(f"\nfull row: {full['caught']} of {full['attacks_in_budget']} attacks in budget caught, missed {full['missed']}")
    print(f"null panel: {n['models']} models, {n['checks']} checks, {n['false_accusations']} false accusations, "
          f"min log10 p {n['min_log10_p']:.2f}; wall {doc['wall_seconds'] / 60:.1f} min")
    print(f"wrote {RESULTS / (stem + '.json')}, .md, .png")
    if n["false_accusations"]:
        sys.exit(1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
