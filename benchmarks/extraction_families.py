"""The tie-break extraction mark against thieves from many families, verified leave-family-out (issue #19).

The power measured in ``benchmarks/extraction_tiebreak.py`` is in-sample: the reference surrogates that choose
the verification inputs (``fmnist-cnn`` and ``fmnist-mlp`` distilled with Adam, hard labels for 3/6/10 epochs,
soft for 4) and the library's defaults (21 log-test rounds, 4 followed references, log-test weight 8, beta 1)
were chosen on the same two families the thieves came from. This benchmark trains thieves from other
families through the marked API and verifies each with references that leave its own family out.

Setting (shared with ``extraction_tiebreak.py`` through ``common.tiebreak_setting``): the extraction victim
served with its scores, the owner's half for the rule and the references, the attacker's half as the thieves'
images and test set. Per fresh key one rule is built (serving does not depend on the committed inputs), and
its 1000 verification inputs are committed four times, with four reference subsets: ``all`` (the 32
references: the in-sample reading), ``cnn`` (the 16 ``fmnist-cnn`` references), ``mlp`` (the 16 ``fmnist-mlp``
ones) and ``none`` (the served model's nearest ties, no references). The subset also ranks each client's log
and chooses which references the log test's rounds follow.

Thief families (each trains from ``api.for_client(family)`` on the attacker's images and stops at its first
epoch within ``SCOPE_PP`` (5) pp of the victim's accuracy, at most ``SCOPE_CAP`` (40) epochs: the *minimal in-scope*
thief; one that never gets there is tested too and reported out of scope):

* ``cnn-adam-hard``, ``mlp-adam-hard``: the library's ``extract`` (``fmnist-cnn`` / ``fmnist-mlp``, Adam, hard
  labels): the reference panel's own families.
* ``cnn-adam-soft``: ``extract`` on the marked probabilities; this client alone is served *with scores*.
* ``bn-cnn-sgd``: a BatchNorm CNN with dropout, SGD + momentum, label smoothing 0.1, random shifts
  (``tiebreak_cost.bn_sgd_thief``; its own choice of 10k queries).
* ``wide-cnn-dropout``: a CNN with 48/96 channels, dropout 0.25/0.5, AdamW (weight decay 0.05).
* ``cnn-noised-queries``: ``extract`` (``fmnist-cnn``) on the attacker's images plus Gaussian noise sigma 0.1,
  clipped to [0, 1]: the log holds the noised images.
* ``cnn-other-pool``: ``extract`` (``fmnist-cnn``) on another query distribution: 5000 attacker images, 3203
  flipped or rotated ones and scikit-learn's 1797 handwritten digits upsampled to 28×28 (bundled with
  scikit-learn: nothing downloads).
* ``ensemble``: a CNN and an MLP trained on one set of answers, one epoch each per round, the suspect their
  averaged logits (stops when the average is in scope); both reference families, so verified with none.
* ``resnet-like``: ``extract`` with ``resnet-small`` (a residual CNN with BatchNorm) on 1×28×28.
* ``top1-rounded``: ``extract(labels="top1", decimals=1)``: the top-1 label and its confidence rounded to one
  decimal; served with scores (it reads only those two numbers).

Leave-family-out (LFO): conv-family thieves are verified with the ``mlp`` subset, ``mlp-adam-hard`` with the
``cnn`` subset, the ensemble with ``none``; the in-sample verdict uses ``all``. A verdict is the library's
weighted Holm (``wmark.evidence.decide``) at alpha = 1e-6 over the trigger set (not run: p = 1), the committed
inputs (weight 1) and the client's log test (weight 8, 1000 queries in 21 rounds). Every thief is also tested
under all four subsets (in the JSON). With ``--sequential`` (default in full mode) the LFO log test also runs
sequentially (``tiebreak_log_sequential``: the queries it needs). ``--variants`` (default all) adds other
readings of every thief and null on the LFO and ``all`` subsets: ``log2000`` (the log test asking 2000 logged
inputs) and ``labels`` (both tests reading the suspect's labels only, as `wmark verify extraction` reads a model
file without ``--with-scores``); the main reading is the suspect's probabilities.

Null panel (key-free, built once): the extraction independents (``common.extraction_independents``), the
unmarked victim, a surrogate of every family distilled from the *unmarked* victim (seed 1: the same queries and
initialisation as the first key's thieves, only the mark missing: the hardest nulls) and three true-label
models of other families. Each is asked, under every key, the committed inputs of all four subsets and every
distinct (client log, subset) a thief's verdict read; a verdict-level accusation is weighted Holm at 1e-6
over [1, committed, log] as for the thieves. Identical logs (thieves that sent the same queries) are checked
once. The logs do not depend on beta (the log keeps the served model's near ties of the client's fixed
queries): the beta 0.5 pass checks that its logs equal beta 1's and reuses those null checks.

Cost: ``accuracy_cost`` (the served vs the marked labels on the attacker's 10k test images) per key and beta.

Usage: nice -n 10 python benchmarks/extraction_families.py [--quick] [--keys 3] [--betas 1,0.5] [--families a,b]
       python benchmarks/extraction_families.py --rescore benchmarks/results/extraction_families.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import (
    SCOPE_CAP,
    SCOPE_PP,
    cached_references,
    extraction_independents,
    shared_key,
    table,
    tiebreak_setting,
    write_results,
)
from tiebreak_cost import bn_cnn, bn_sgd_thief
from torch import nn

from wmark.distill import extract, query_victim
from wmark.evidence import alpha_share
from wmark.keys import generate_key
from wmark.models import build_model, load_model, penultimate_featurizer
from wmark.schemes.tiebreak import (
    LOG_TEST_WEIGHT,
    TieBreakAPI,
    TieBreakLog,
    accuracy_cost,
    build_tiebreak_rule,
    commit_verification_inputs,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
)
from wmark.schemes.tiebreak.sequential import tiebreak_log_sequential
from wmark.stats import holm
from wmark.suspects import LocalSuspect

ALPHA = 1e-6
WEIGHTS = [1.0, 1.0, LOG_TEST_WEIGHT]  # trigger set (not run: p = 1), committed inputs, log test
LOG_SHARE = alpha_share(LOG_TEST_WEIGHT, WEIGHTS)
QUERIES = 10_000
SHAPE = (1, 28, 28)
SUBSETS = ("all", "cnn", "mlp", "none")
LFO_SUBSET = {"conv": "mlp", "mlp": "cnn", "both": "none"}
# other readings beside the library's (the suspect's probabilities, 1000 logged queries in 21 rounds), on the LFO
# and all subsets: the log test asking 2000 logged queries; both tests reading only the suspect's labels; both
# tests centred on the served model's own evidence (probabilities or labels)
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "log2000": {"log": {"queries": 2000}, "committed": {}},
    "labels": {"log": {"use_scores": False}, "committed": {"use_scores": False}},
    # each answer's evidence less the served model's own (its clipped lean, or its expected sign): key-free
    "centred": {"log": {"centred": True}, "committed": {"centred": True}},
    "labels-centred": {"log": {"use_scores": False, "centred": True},
                       "committed": {"use_scores": False, "centred": True}},
}
Train = Callable[[Any, np.ndarray, int, Callable[[nn.Module], bool]], tuple[nn.Module, int]]


@dataclass(frozen=True)
class Family:
    """A thief family: how it trains, whether it is served scores, and which reference family it belongs to."""

    name: str
    group: str
    scores: bool
    train: Train


def query_pool(x: np.ndarray, seed: int) -> np.ndarray:
    """The 10k attacker images a thief asks: the same seeded choice as ``extract``'s."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:QUERIES]
    return np.asarray(x[order.numpy()], dtype=np.float32)


def fit(model: nn.Module, x: np.ndarray, targets: torch.Tensor, *, optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module, seed: int, in_scope: Callable[[nn.Module], bool], batch: int = 64,
        epochs: int = SCOPE_CAP,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> tuple[nn.Module, int]:
    """Train until ``in_scope`` (checked after each epoch) or ``epochs``; returns the model in eval mode.
    ``augment`` transforms each batch (drawing from the same seeded generator)."""
    xs, gen = torch.from_numpy(x), torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), batch):
            idx = perm[i:i + batch]
            optimizer.zero_grad()
            loss_fn(model(xs[idx] if augment is None else augment(xs[idx], gen)), targets[idx]).backward()
            optimizer.step()
        model.eval()
        if in_scope(model):
            return model, epoch
    return model, epochs


def library(arch: str, labels: str = "hard", decimals: int = 2,
            queries: Callable[[np.ndarray, int], np.ndarray] | None = None) -> Train:
    """A thief that is the library's ``extract`` (Adam), optionally on its own query set."""
    def train(api: Any, x: np.ndarray, seed: int, in_scope: Callable[[nn.Module], bool]) -> tuple[nn.Module, int]:
        xq = x if queries is None else queries(x, seed)
        res = extract(api, x=xq, arch=arch, labels=labels, queries=min(QUERIES, len(xq)),  # type: ignore[arg-type]
                      epochs=SCOPE_CAP, seed=seed, decimals=decimals, stop=in_scope)
        return res.model.eval(), res.epochs
    return train


def noised(x: np.ndarray, seed: int) -> np.ndarray:
    """The thief's images plus N(0, 0.1²) noise, clipped to the pixel range."""
    rng = np.random.default_rng(10_000 + seed)
    xq = query_pool(x, seed)
    return np.clip(xq + rng.normal(0.0, 0.1, xq.shape).astype(np.float32), 0.0, 1.0)


def other_pool(x: np.ndarray, seed: int) -> np.ndarray:
    """5000 attacker images, the rest flipped or rotated, plus scikit-learn's digits upsampled to 28×28."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).unsqueeze(1)
    digits = torch.nn.functional.interpolate(digits, size=SHAPE[1:], mode="bilinear", align_corners=False).numpy()
    xq = query_pool(x, seed)
    rest = xq[5000:QUERIES - len(digits)].copy()
    third = len(rest) // 3
    rest[:third] = rest[:third, :, :, ::-1]
    rest[third:2 * third] = rest[third:2 * third, :, ::-1, :]
    rest[2 * third:] = np.rot90(rest[2 * third:], k=1, axes=(2, 3))
    pool = np.concatenate([xq[:5000], rest, digits.clip(0.0, 1.0)]).astype(np.float32)
    return pool[np.random.default_rng(20_000 + seed).permutation(len(pool))]


def wide_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(48, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
                         nn.Flatten(), nn.Linear(96 * 49, 256), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(256, num_classes))


def wide_dropout(api: Any, x: np.ndarray, seed: int, in_scope: Callable[[nn.Module], bool]) -> tuple[nn.Module, int]:
    xq = query_pool(x, seed)
    labels, _ = query_victim(api, xq)
    return wide_fit(xq, torch.as_tensor(labels), seed, in_scope)


def wide_fit(xq: np.ndarray, y: torch.Tensor, seed: int, in_scope: Callable[[nn.Module], bool],
             epochs: int = SCOPE_CAP) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    model = wide_cnn()
    return fit(model, xq, y, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05),
               loss_fn=nn.CrossEntropyLoss(), seed=seed, in_scope=in_scope, epochs=epochs)


class Ensemble(nn.Module):
    """The averaged logits of several surrogates (what the ensemble thief deploys)."""

    def __init__(self, *members: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def ensemble(api: Any, x: np.ndarray, seed: int, in_scope: Callable[[nn.Module], bool]) -> tuple[nn.Module, int]:
    """A CNN and an MLP on one set of answers, one epoch each per round, until their average is in scope."""
    xq = query_pool(x, seed)
    labels, _ = query_victim(api, xq)
    y, xs = torch.as_tensor(labels), torch.from_numpy(xq)
    members = [build_model(arch, num_classes=10, input_shape=SHAPE, seed=seed) for arch in ("fmnist-cnn", "fmnist-mlp")]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in members]
    net, gen = Ensemble(*members), torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, SCOPE_CAP + 1):
        for member, opt in zip(members, opts):
            member.train()
            perm = torch.randperm(len(xs), generator=gen)
            for i in range(0, len(xs), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                loss_fn(member(xs[idx]), y[idx]).backward()
                opt.step()
        net.eval()
        if in_scope(net):
            return net, epoch
    return net, SCOPE_CAP


def bn_sgd(api: Any, x: np.ndarray, seed: int, in_scope: Callable[[nn.Module], bool]) -> tuple[nn.Module, int]:
    model, epochs = bn_sgd_thief(api, x, seed=seed, in_scope=in_scope)
    return model.eval(), epochs


FAMILIES = {f.name: f for f in (
    Family("cnn-adam-hard", "conv", False, library("fmnist-cnn")),
    Family("mlp-adam-hard", "mlp", False, library("fmnist-mlp")),
    Family("cnn-adam-soft", "conv", True, library("fmnist-cnn", labels="soft")),
    Family("bn-cnn-sgd", "conv", False, bn_sgd),
    Family("wide-cnn-dropout", "conv", False, wide_dropout),
    Family("cnn-noised-queries", "conv", False, library("fmnist-cnn", queries=noised)),
    Family("cnn-other-pool", "conv", False, library("fmnist-cnn", queries=other_pool)),
    Family("ensemble", "both", False, ensemble),
    Family("resnet-like", "conv", False, library("resnet-small")),
    Family("top1-rounded", "conv", True, library("fmnist-cnn", labels="top1", decimals=1)),
)}
QUICK_FAMILIES = ("cnn-adam-hard", "mlp-adam-hard", "bn-cnn-sgd", "ensemble")


def verdict_log10_p(committed: float, logged: float) -> float:
    """The verdict's smallest weighted-Holm-adjusted log10 p (trigger set at p = 1): extracted when <= log10 alpha."""
    return min(holm([0.0, committed, logged], WEIGHTS))


def digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype="<f4").tobytes()).hexdigest()[:16]


def never(model: nn.Module) -> bool:
    """A stop rule that never stops: train the fixed number of epochs."""
    return False


def true_label_nulls(setting: Any, quick: bool) -> list[tuple[str, nn.Module]]:
    """Models of other families trained on true labels (never on any API's answers)."""
    att_x, att_y = setting.attacker.x_train.numpy(), setting.attacker.y_train
    order = torch.randperm(len(att_x), generator=torch.Generator().manual_seed(77))[:QUERIES]
    xa, ya = np.asarray(att_x[order.numpy()], dtype=np.float32), torch.as_tensor(att_y[order]).long()
    out = []
    torch.manual_seed(77)
    model = bn_cnn()
    out.append(("bn-cnn, true labels of 10k attacker images (SGD, 3 ep)",
                fit(model, xa, ya, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                                                             weight_decay=5e-4),
                    loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1), seed=77, in_scope=never, batch=128,
                    epochs=3)[0]))
    if quick:
        return out
    xo = np.asarray(setting.x_owner[:QUERIES], dtype=np.float32)
    yo = torch.as_tensor(load_owner_labels()[:QUERIES]).long()
    out.append(("wide-cnn-dropout, true labels of 10k owner images (AdamW, 3 ep)",
                wide_fit(xo, yo, 78, never, epochs=3)[0]))
    model = build_model("resnet-small", num_classes=10, input_shape=SHAPE, seed=79)
    out.append(("resnet-small, true labels of 10k attacker images (Adam, 2 ep)",
                fit(model, xa, ya, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                    loss_fn=nn.CrossEntropyLoss(), seed=79, in_scope=never, epochs=2)[0]))
    return out


def load_owner_labels() -> np.ndarray:
    from wmark.data import load_dataset

    return load_dataset("fashion-mnist@owner").y_train.numpy()


def null_panel(setting: Any, families: list[Family], quick: bool) -> list[dict[str, Any]]:
    """The innocent models (key-free): independents, the unmarked victim, family surrogates of the *unmarked*
    victim (seed 1) and true-label models of other families."""
    nulls: list[dict[str, Any]] = [{"model": "unmarked victim", "kind": "victim", "net": setting.victim}]
    for name, arch, path in extraction_independents()[:5 if quick else None]:
        nulls.append({"model": f"independent {name}", "kind": "independent", "net": load_model(arch, path)[0].eval()})
    label_only = LocalSuspect(setting.victim, input_shape=SHAPE, description="unmarked victim, labels")
    x = setting.attacker.x_train.numpy()
    for fam in families:
        t0 = time.perf_counter()
        net, epochs = fam.train(setting.served if fam.scores else label_only, x, 1, setting.in_scope)
        nulls.append({"model": f"{fam.name} distilled from the unmarked victim ({epochs} ep)", "kind": "distilled",
                      "net": net.eval(), "epochs": epochs})
        print(f"  null {fam.name}: {epochs} ep in {time.perf_counter() - t0:.0f} s", flush=True)
    for name, net in true_label_nulls(setting, quick):
        nulls.append({"model": name, "kind": "true labels", "net": net.eval()})
    return nulls


def summarise(rows: list[dict[str, Any]], null_checks: list[dict[str, Any]], costs: list[dict[str, Any]],
              betas: list[float]) -> dict[str, Any]:
    """Per beta and family: in scope, caught (LFO / in-sample), p-values, epochs; the null panel; the cost."""
    lg = np.log10(ALPHA)
    out: dict[str, Any] = {"alpha": ALPHA, "weights": {"trigger-set": 1.0, "api-tiebreak": 1.0,
                                                       "api-tiebreak-log": LOG_TEST_WEIGHT}}
    for beta in betas:
        per: dict[str, Any] = {}
        for fam in dict.fromkeys(r["family"] for r in rows if r["beta"] == beta):
            sel = [r for r in rows if r["beta"] == beta and r["family"] == fam]
            scope = [r for r in sel if r["within_5pp"]]
            entry: dict[str, Any] = {"thieves": len(sel), "in_scope": len(scope),
                                     "lfo_subset": sel[0]["lfo_subset"],
                                     "mean_epochs": float(np.mean([r["epochs"] for r in sel])),
                                     "accuracy": [round(r["accuracy"], 4) for r in sel]}
            readings = [("lfo", "verdict_lfo"), ("in_sample", "verdict_all")]
            readings += [(f"{tag}_{v}", f"{field}_{v}") for v in VARIANTS for tag, field in readings[:2]
                         if all(f"{field}_{v}" in r for r in sel)]
            for tag, field in readings:
                vals = [r[field] for r in scope]
                entry[f"caught_{tag}"] = int(sum(v <= lg for v in vals))
                entry[f"caught_{tag}_all_thieves"] = int(sum(r[field] <= lg for r in sel))
                entry[f"median_log10_p_{tag}"] = float(np.median(vals)) if vals else None
                entry[f"worst_log10_p_{tag}"] = float(max(vals)) if vals else None
            # the verdict under each reference subset (``none`` is free of every family)
            entry["caught_by_subset"] = {s: int(sum(verdict_log10_p(r["tests"][s]["committed"], r["tests"][s]["log"]) <= lg
                                                    for r in scope)) for s in SUBSETS}
            entry["worst_log10_p_by_subset"] = {
                s: float(max(verdict_log10_p(r["tests"][s]["committed"], r["tests"][s]["log"]) for r in scope))
                if scope else None for s in SUBSETS}
            for s in SUBSETS:
                entry[f"log_test_log10_p_{s}"] = [round(r["tests"][s]["log"], 2) for r in sel]
                entry[f"committed_log10_p_{s}"] = [round(r["tests"][s]["committed"], 2) for r in sel]
            seq = [r for r in scope if "seq_queries" in r]
            if seq:
                entry["sequential_caught"] = int(sum(r["log10_p_seq"] <= lg for r in seq))
                entry["sequential_queries_median"] = float(np.median([r["seq_queries"] for r in seq]))
                entry["sequential_queries_worst"] = int(max(r["seq_queries"] for r in seq))
            per[fam] = entry
        scope = [r for r in rows if r["beta"] == beta and r["within_5pp"]]
        mine = [c for c in costs if c["beta"] == beta]
        out[f"beta {beta:g}"] = {
            "families": per,
            "in_scope": len(scope),
            "caught_lfo": int(sum(r["verdict_lfo"] <= lg for r in scope)),
            "caught_in_sample": int(sum(r["verdict_all"] <= lg for r in scope)),
            **{f"caught_{tag}_{v}": int(sum(r[f"verdict_{field}_{v}"] <= lg for r in scope))
               for v in VARIANTS for tag, field in (("lfo", "lfo"), ("in_sample", "all"))
               if all(f"verdict_{field}_{v}" in r for r in scope)},
            "caught_lfo_outside_reference_families": int(sum(r["verdict_lfo"] <= lg for r in scope
                                                             if r["family"] not in ("cnn-adam-hard", "mlp-adam-hard",
                                                                                    "cnn-adam-soft"))),
            "in_scope_outside_reference_families": int(sum(r["family"] not in ("cnn-adam-hard", "mlp-adam-hard",
                                                                               "cnn-adam-soft") for r in scope)),
            "caught_by_subset": {s: int(sum(verdict_log10_p(r["tests"][s]["committed"], r["tests"][s]["log"]) <= lg
                                            for r in scope)) for s in SUBSETS},
            "accuracy_cost_pp_mean": float(np.mean([c["accuracy_cost_pp"] for c in mine])) if mine else None,
            "accuracy_cost_pp_by_key": [round(c["accuracy_cost_pp"], 2) for c in mine],
            "changed_fraction_mean": float(np.mean([c["changed_fraction"] for c in mine])) if mine else None}
    single = [c["log10_p"] for c in null_checks]
    verdicts = [c["verdict_log10_p"] for c in null_checks if "verdict_log10_p" in c]
    out["null_panel"] = {
        "models": len({c["model"] for c in null_checks}),
        "checks": len(single), "verdict_checks": len(verdicts),
        "false_accusations_single_test": int(sum(v <= lg for v in single)),
        "false_accusations_verdict": int(sum(v <= lg for v in verdicts)),
        "min_log10_p_single_test": float(min(single)) if single else None,
        "min_verdict_log10_p": float(min(verdicts)) if verdicts else None,
        "min_log10_p_by_kind": {kind: float(min(c["log10_p"] for c in null_checks if c["kind"] == kind))
                                for kind in dict.fromkeys(c["kind"] for c in null_checks)},
        "by_test": {test: {"checks": len(sel), "false_accusations_verdict": int(sum(c["verdict_log10_p"] <= lg
                                                                                    for c in sel)),
                           "min_verdict_log10_p": float(min(c["verdict_log10_p"] for c in sel))}
                    for test in dict.fromkeys(c["test"] for c in null_checks if "verdict_log10_p" in c)
                    for sel in [[c for c in null_checks if c["test"] == test and "verdict_log10_p" in c]]}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one key, beta 1, four families, a smaller null panel")
    parser.add_argument("--keys", type=int, default=None, help="fresh keys (default 3, --quick 1)")
    parser.add_argument("--betas", default=None, help="shift scales, comma-separated (default 1,0.5; --quick 1)")
    parser.add_argument("--families", default=None, help="comma-separated families (default all)")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                        help="also the sequential LFO log test of every thief (default: on, off with --quick)")
    parser.add_argument("--name", default=None, help="results file name (default extraction_families[_quick])")
    parser.add_argument("--keys-dir", type=Path, default=None,
                        help="load the keys k0.key, k1.key, ... from here, or write fresh ones there (to run betas "
                             "side by side in separate processes on the same keys)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="other readings of every thief and null, comma-separated: "
                             f"{', '.join(VARIANTS)} (default all)")
    parser.add_argument("--no-variants", dest="variants", action="store_const", const="",
                        help="the library's reading only")
    parser.add_argument("--rescore", type=Path, default=None, help="recompute the summary of a saved run from its rows")
    args = parser.parse_args()
    if args.rescore is not None:
        doc = json.loads(args.rescore.read_text())
        doc["summary"] = summarise(doc["rows"], doc["null_checks"], doc["costs"], doc["betas"])
        args.rescore.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(json.dumps({k: v for k, v in doc["summary"].items() if k.startswith("beta")}, indent=1))
        return
    keys = args.keys or (1 if args.quick else 3)
    betas = [float(b) for b in (args.betas or ("1" if args.quick else "1,0.5")).split(",")]
    names = args.families.split(",") if args.families else list(QUICK_FAMILIES if args.quick else FAMILIES)
    families = [FAMILIES[n.strip()] for n in names]
    sequential = (not args.quick) if args.sequential is None else args.sequential
    chosen_variants = [v for v in (v.strip() for v in args.variants.split(",")) if v]
    if set(chosen_variants) - set(VARIANTS):
        parser.error(f"--variants: choose among {', '.join(VARIANTS)}")
    variants = {v: VARIANTS[v] for v in chosen_variants}
    name = args.name or ("extraction_families_quick" if args.quick else "extraction_families")
    start = time.perf_counter()
    setting = tiebreak_setting()
    served, victim = setting.served, setting.victim
    featurizer = penultimate_featurizer(victim)
    x_att = setting.attacker.x_train.numpy()
    references = cached_references(setting, {})
    subsets = {"all": references, "cnn": [r for r in references if r[0] == "fmnist-cnn"],
               "mlp": [r for r in references if r[0] == "fmnist-mlp"], "none": []}
    print(f"{len(references)} references, victim {setting.victim_accuracy:.4f}, {time.perf_counter() - start:.0f} s",
          flush=True)
    t0 = time.perf_counter()
    nulls = null_panel(setting, families, args.quick)
    null_seconds = time.perf_counter() - t0
    print(f"{len(nulls)} null models in {null_seconds:.0f} s", flush=True)

    rows: list[dict[str, Any]] = []
    null_checks: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    rules: dict[int, dict[str, Any]] = {}
    keyset = [family_key(k, args.keys_dir) for k in range(keys)]
    checked: dict[tuple[int, str, str], float] = {}  # (key, log digest, subset) -> a null model's log10 p, per model
    log_digests: dict[tuple[float, int, str], str] = {}
    tmp = tempfile.TemporaryDirectory(prefix="wmark-families-")

    def write(done: str) -> None:
        doc = {"summary": summarise(rows, null_checks, costs, betas), "rows": rows, "null_checks": null_checks,
               "costs": costs, "progress": done, "complete": done == "complete", "keys": keys, "betas": betas,
               "families": names, "victim_accuracy": setting.victim_accuracy, "scope_pp": SCOPE_PP,
               "scope_cap": SCOPE_CAP, "references": {s: len(v) for s, v in subsets.items()},
               "null_models": [{k: v for k, v in n.items() if k not in ("net", "_committed")} for n in nulls],
               "null_seconds": null_seconds, "seconds": time.perf_counter() - start,
               "threads": torch.get_num_threads()}
        write_results(name, doc)

    for beta in betas:
        for k, key in enumerate(keyset):
            if k not in rules:
                t0 = time.perf_counter()
                base = build_tiebreak_rule(key=key, x=setting.x_owner, featurizer=featurizer,
                                           feature_space="served-penultimate")
                rules[k] = {s: commit_verification_inputs(base, served=served, x=setting.x_owner, references=refs,
                                                          count=1000, how=f"{s} references")
                            for s, refs in subsets.items()}
                print(f"key {k}: rule and four commitments in {time.perf_counter() - t0:.0f} s", flush=True)
            log = TieBreakLog(Path(tmp.name) / f"k{k}-b{beta:g}.sqlite", key=key)
            label_api = TieBreakAPI(key=key, backend=served, rule=rules[k]["all"], beta=beta, log=log,
                                    expose_scores=False)
            scored_api = TieBreakAPI(key=key, backend=served, rule=rules[k]["all"], beta=beta, log=log)
            cost = accuracy_cost(api=label_api, x=setting.xt, y=setting.yt)
            costs.append({"key": k, "beta": beta, **cost})
            print(json.dumps(costs[-1]), flush=True)
            thieves = []
            for fam in families:
                t0 = time.perf_counter()
                net, epochs = fam.train((scored_api if fam.scores else label_api).for_client(fam.name), x_att, 1 + k,
                                        setting.in_scope)
                thieves.append((fam, net.eval(), epochs, time.perf_counter() - t0))
            for fam, net, epochs, train_s in thieves:
                suspect = LocalSuspect(net, input_shape=SHAPE, description=fam.name)
                acc = float((suspect.query(setting.xt).labels == setting.yt).mean())
                tests: dict[str, dict[str, float]] = {}
                chosen = {}
                for s in SUBSETS:
                    committed = tiebreak_test(key=key, rule=rules[k][s], served=served, suspect=suspect)
                    chosen[s] = select_log_inputs(key=key, rule=rules[k][s], served=served, log=log, client=fam.name)
                    logged = tiebreak_log_test(key=key, rule=rules[k][s], served=served, suspect=suspect,
                                               chosen=chosen[s])
                    tests[s] = {"committed": committed.log10_p, "log": logged.log10_p, "z_log": logged.details["z"],
                                "z_committed": committed.details["z"]}
                lfo = LFO_SUBSET[fam.group]
                for s in dict.fromkeys((lfo, "all")):
                    for variant, kw in variants.items():
                        res = tiebreak_log_test(key=key, rule=rules[k][s], served=served, suspect=suspect,
                                                chosen=chosen[s], **kw["log"])
                        tests[s][variant], tests[s][f"z_{variant}"] = res.log10_p, res.details["z"]
                        tests[s][f"committed_{variant}"] = (
                            tiebreak_test(key=key, rule=rules[k][s], served=served, suspect=suspect,
                                          **kw["committed"]).log10_p if kw["committed"] else tests[s]["committed"])
                raw = log.inputs(fam.name)
                log_digests[(beta, k, fam.name)] = digest(raw)
                row = {"key": k, "beta": beta, "family": fam.name, "group": fam.group, "served_scores": fam.scores,
                       "epochs": epochs, "accuracy": acc,
                       "within_5pp": bool(acc >= setting.victim_accuracy - SCOPE_PP / 100),
                       "train_seconds": train_s, "logged_inputs": len(raw),
                       "log_digest": log_digests[(beta, k, fam.name)], "lfo_subset": lfo, "tests": tests,
                       "verdict_lfo": verdict_log10_p(tests[lfo]["committed"], tests[lfo]["log"]),
                       "verdict_all": verdict_log10_p(tests["all"]["committed"], tests["all"]["log"])}
                for variant in variants:
                    row[f"verdict_lfo_{variant}"] = verdict_log10_p(tests[lfo][f"committed_{variant}"],
                                                                    tests[lfo][variant])
                    row[f"verdict_all_{variant}"] = verdict_log10_p(tests["all"][f"committed_{variant}"],
                                                                    tests["all"][variant])
                if sequential:
                    t0 = time.perf_counter()
                    seq = tiebreak_log_sequential(key=key, rule=rules[k][lfo], served=served, suspect=suspect,
                                                  chosen=chosen[lfo], alpha=ALPHA, share=LOG_SHARE)
                    row.update(log10_p_seq=seq.log10_p, seq_queries=seq.queries, seq_stopped=seq.details["stopped"],
                               seq_seconds=time.perf_counter() - t0)
                rows.append(row)
                print(table([row], ["key", "beta", "family", "epochs", "accuracy", "within_5pp", "verdict_lfo",
                                    "verdict_all", "seq_queries"]), flush=True)
                # the null panel on this thief's log, under its LFO subset and all references (once per distinct log)
                t0 = time.perf_counter()
                for s in dict.fromkeys((lfo, "all")):
                    tag = (k, row["log_digest"], s)
                    if tag in checked:
                        continue
                    checked[tag] = 0.0
                    for null in nulls:
                        innocent = LocalSuspect(null["net"], input_shape=SHAPE, description=null["model"])
                        res = tiebreak_log_test(key=key, rule=rules[k][s], served=served, suspect=innocent,
                                                chosen=chosen[s])
                        committed = committed_null(null, k, s, key, rules, served, innocent, null_checks)
                        null_checks.append({"key": k, "model": null["model"], "kind": null["kind"], "test": "log",
                                            "subset": s, "log_of": fam.name, "log_digest": row["log_digest"],
                                            "log10_p": res.log10_p,
                                            "verdict_log10_p": verdict_log10_p(committed, res.log10_p)})
                        for variant, kw in variants.items():
                            other = tiebreak_log_test(key=key, rule=rules[k][s], served=served, suspect=innocent,
                                                      chosen=chosen[s], **kw["log"])
                            paired = (committed_null(null, k, s, key, rules, served, innocent, null_checks,
                                                     reading=variant, **kw["committed"])
                                      if kw["committed"] else committed)
                            null_checks.append({"key": k, "model": null["model"], "kind": null["kind"],
                                                "test": variant, "subset": s, "log_of": fam.name,
                                                "log_digest": row["log_digest"], "log10_p": other.log10_p,
                                                "verdict_log10_p": verdict_log10_p(paired, other.log10_p)})
                if time.perf_counter() - t0 > 1:
                    print(f"  null checks on {fam.name}'s log: {time.perf_counter() - t0:.0f} s", flush=True)
            if beta != betas[0]:
                same = all(log_digests[(beta, k, f.name)] == log_digests[(betas[0], k, f.name)] for f in families)
                costs[-1]["logs_equal_first_beta"] = same
            log.close()
            write(f"beta {beta:g}, key {k}")
            print(f"beta {beta:g} key {k} done at {time.perf_counter() - start:.0f} s", flush=True)
    write("complete")
    tmp.cleanup()
    summary = summarise(rows, null_checks, costs, betas)
    for beta in betas:
        fams = summary[f"beta {beta:g}"]["families"]
        print(f"\nbeta {beta:g}: cost {summary[f'beta {beta:g}']['accuracy_cost_pp_mean']:.2f} pp")
        print(table([{"family": f, **v} for f, v in fams.items()],
                    ["family", "lfo_subset", "thieves", "in_scope", "caught_lfo", "caught_in_sample",
                     "median_log10_p_lfo", "worst_log10_p_lfo", "median_log10_p_in_sample", "worst_log10_p_in_sample",
                     "mean_epochs", "sequential_queries_median"]))
    print(json.dumps(summary["null_panel"], indent=1))
    print(f"{time.perf_counter() - start:.0f} s")


def family_key(k: int, keys_dir: Path | None) -> Any:
    """Key ``k``: fresh, or shared through ``keys_dir`` (:func:`benchmarks.common.shared_key`)."""
    return shared_key(k, keys_dir, lambda: generate_key(owner=f"Families Owner {k}", num_classes=10,
                                                          input_shape=SHAPE))


def committed_null(null: dict[str, Any], k: int, s: str, key: Any, rules: dict[int, dict[str, Any]], served: Any,
                   innocent: LocalSuspect, null_checks: list[dict[str, Any]], *, reading: str = "",
                   **kwargs: Any) -> float:
    """A null model's committed-input log10 p under key ``k`` and subset ``s`` (run and recorded once per
    ``reading``, whose ``kwargs`` go to ``tiebreak_test``)."""
    cache = null.setdefault("_committed", {})
    if (k, s, reading) not in cache:
        res = tiebreak_test(key=key, rule=rules[k][s], served=served, suspect=innocent, **kwargs)
        cache[(k, s, reading)] = res.log10_p
        null_checks.append({"key": k, "model": null["model"], "kind": null["kind"],
                            "test": f"committed_{reading}" if reading else "committed", "subset": s,
                            "log10_p": res.log10_p})
    return float(cache[(k, s, reading)])


if __name__ == "__main__":
    main()
