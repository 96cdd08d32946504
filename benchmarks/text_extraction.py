"""Label-only extraction of a tie-break-marked text API on Debian fortunes: honest cost, thieves caught, null panel.

What it measures, on fresh keys:

* the victim: a tiny BERT trained from scratch on the owner's third of the fortunes (8 categories, texts of at
  most 64 MiniLM tokens), or with ``--victim minilm`` MiniLM fine-tuned on it (2 epochs, Adam 1e-4,
  cached on disk). A MiniLM model's answers and features are computed once per text (:class:`TextTable`: the
  same answers as running it, without rerunning MiniLM for every repeat of a text). The victim's accuracy is
  what it is (fortunes categories are hard; see the table);
* the rule: the served model's penultimate features, 4 ``text-bow`` reference surrogates distilled from the
  *unmarked* victim on the owner's texts, the owner's ``--commit`` most open texts committed (key-free);
* honest users' accuracy through the marked, label-only API on the test third (the cost);
* thieves: a ``text-bow`` and a ``tiny-bert`` surrogate distilled label-only from the marked API on the
  thief's own third, trained until within 5 pp of the victim (or the epoch cap); with ``--victim minilm`` a
  full MiniLM fine-tune (at most 3 epochs, stopped at the first epoch within 5 pp), a linear probe on frozen
  MiniLM features (stopped at the first check within 5 pp) and a ``text-bow``; the committed-input test and
  the log test on the thief's logged near-ties, combined by weighted Holm at alpha = 1e-6, reading the
  suspect's labels (as `wmark verify extraction` reads a model file without ``--with-scores``) and, beside, its
  probabilities (``scores_*``; not for the MiniLM probe);
* the null panel: independent text models (trained on true labels of other thirds, other seeds and
  architectures, and a surrogate distilled from the *unmarked* victim; with ``--victim minilm`` also MiniLM
  fine-tuned on the owner's third with another seed, on the thief's third, and distilled from the unmarked
  victim), tested the same way against every thief's log: none may be accused.

``python benchmarks/text_extraction.py`` (full: 3 keys, 1000 committed / 1000 logged queries, shift scales
``--betas`` 1 and 0.5 side by side on the same keys and thief seeds) or ``--quick`` (1 key, 300 / 300, fewer
epochs: the plumbing, not the full result). Writes
``benchmarks/results/text_extraction.json`` (``text_extraction_quick.json`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import cached, shared_key, table, write_results
from wmark.data import load_dataset
from wmark.distill import accuracy_reached, extract
from wmark.evidence import alpha_share, decide
from wmark.io import load_tensors, save_model, save_tensors
from wmark.keys import generate_key
from wmark.models import build_model, penultimate_featurizer
from wmark.schemes.tiebreak import (
    COST_CONFIDENCE,
    TieBreakAPI,
    TieBreakLog,
    accuracy_cost,
    accuracy_costs,
    build_tiebreak_rule,
    commit_verification_inputs,
    largest_beta_within,
    owner_texts,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
    train_reference_surrogates,
)
from wmark.schemes.tiebreak.features import COST_GRIDS, PUBLIC_MINILM
from wmark.schemes.tiebreak.inputs import served_scores
from wmark.schemes.tiebreak.rule import top_pairs
from wmark.schemes.tiebreak.sequential import tiebreak_log_sequential
from wmark.schemes.tiebreak.statistic import expected_signs, tiebreak_statistic, z_log10_p
from wmark.schemes.tiebreak.tests import LOG_TEST_WEIGHT
from wmark.suspects import LocalSuspect
from wmark.suspects.base import Answers
from wmark.text import MINILM, TextInputs, load_tokenizer, text_modality
from wmark.training import accuracy, make_loader, train_epochs

ALPHA = 1e-6
LENGTH = 64
VICTIM_LR = {"tiny-bert": 1e-3, "text-bow": 3e-3, "minilm-classifier": 1e-4}
VICTIM_ARCH = {"tiny-bert": "tiny-bert", "minilm": "minilm-classifier"}
READINGS = ("plain", "centred", "centred-proj")  # --readings: the label verdicts read these ways beside


def texts_and_labels(texts: Any, labels: torch.Tensor, text: TextInputs) -> tuple[np.ndarray, np.ndarray]:
    """The texts within the key's maximum length (what the API accepts) and their labels."""
    kept = set(owner_texts(list(texts), text))
    idx = [i for i, t in enumerate(texts) if t in kept]
    x = np.empty(len(idx), dtype=object)
    x[:] = [texts[i] for i in idx]
    return x, labels.numpy()[idx]


def train(arch: str, x: np.ndarray, y: np.ndarray, text: TextInputs, *, epochs: int, seed: int) -> torch.nn.Module:
    """A text classifier trained on true labels (Adam, batch 32)."""
    model = build_model(arch, num_classes=8, input_shape=(LENGTH,), seed=seed)
    ids = text.encode(list(x), pad_to_max=True)["input_ids"]
    train_epochs(model, make_loader(ids, torch.as_tensor(y), batch_size=32, seed=seed), epochs=epochs,
                 optimizer=torch.optim.Adam(model.parameters(), lr=VICTIM_LR[arch]), device=torch.device("cpu"))
    return model.eval()


def trained(arch: str, x: np.ndarray, y: np.ndarray, text: TextInputs, *, epochs: int, seed: int) -> torch.nn.Module:
    """:func:`train`, cached on disk for MiniLM (minutes per fine-tune on one core)."""
    if arch != "minilm-classifier":
        return train(arch, x, y, text, epochs=epochs, seed=seed)
    return _cached_minilm({"name": "text-extraction-minilm", "texts": _digest(x), "labels": _digest(y),
                           "epochs": epochs, "seed": seed}, lambda: train(arch, x, y, text, epochs=epochs, seed=seed))


def _digest(values: Any) -> str:
    import hashlib

    return hashlib.sha256("\n".join(map(str, values)).encode()).hexdigest()[:16]


def _cached_minilm(config: dict[str, Any], make: Any) -> torch.nn.Module:
    """A MiniLM classifier made by ``make()`` once per ``config`` and kept as safetensors in the benchmark cache."""
    path = cached(config, lambda p: save_model(make(), p))
    model = build_model("minilm-classifier", num_classes=8, input_shape=(LENGTH,), seed=0)
    model.load_state_dict(load_tensors(path)[0])
    return model.eval()


def fortunes_minilm_victim() -> dict[str, Any]:
    """The MiniLM victim fine-tuned on the owner's third of the fortunes (2 epochs, seed 0, cached) as a
    :class:`TextTable`, with its tokenization (``text``, ``modality``) and the owner's training and test texts within
    ``LENGTH`` tokens (``xo``, ``yo``, ``xe``, ``ye``): the setting the research scripts on its cost share."""
    tok = load_tokenizer(MINILM)
    text = TextInputs(tokenizer=tok, max_length=LENGTH)
    owner = load_dataset("fortunes@owner")
    xo, yo = texts_and_labels(owner.texts_train, owner.y_train, text)
    xe, ye = texts_and_labels(owner.texts_test, owner.y_test, text)
    victim = TextTable(trained("minilm-classifier", xo, yo, text, epochs=2, seed=0), text, description="victim MiniLM",
                       expose_scores=True)
    return {"text": text, "modality": text_modality(tokenizer=tok, name=MINILM, max_length=LENGTH), "xo": xo,
            "yo": yo, "xe": xe, "ye": ye, "victim": victim}


class TextTable:
    """A deterministic text classifier answering from a memo of its logits and penultimate features per text.

    The same answers as ``LocalSuspect(model, text=text)`` and the same features as its ``penultimate_featurizer``,
    each text run once: a MiniLM forward costs tens of milliseconds per text on one core, and the benchmark asks
    the same texts again for every key, shift scale and null check.
    """

    def __init__(self, model: torch.nn.Module, text: TextInputs, *, description: str, expose_scores: bool) -> None:
        self.model, self.text, self.description, self.expose_scores = model.eval(), text, description, expose_scores
        self.featurizer = penultimate_featurizer(model, encode=text.encode, batch_size=64)
        self.num_classes, self.input_shape = 8, (LENGTH,)
        self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _rows(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        texts = [str(t) for t in np.asarray(x, dtype=object).reshape(-1)]
        missing = sorted({t for t in texts if t not in self._memo}, key=len)
        with torch.no_grad():
            for i in range(0, len(missing), 64):
                chunk = missing[i:i + 64]
                logits, feats = self.featurizer.logits_and_features(self.text.encode(chunk))
                for t, lg, f in zip(chunk, logits.float().numpy(), feats.float().numpy()):
                    self._memo[t] = (lg, f)
        if not texts:
            return np.zeros((0, 8)), np.zeros((0, 0))
        return np.stack([self._memo[t][0] for t in texts]), np.stack([self._memo[t][1] for t in texts])

    def features(self, x: Any) -> np.ndarray:
        return self._rows(x)[1].astype(np.float32)

    def query(self, x: Any) -> Answers:
        logits = self._rows(x)[0].astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return Answers(labels=probs.argmax(1).astype(np.int64), scores=probs if self.expose_scores else None)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.query(x).labels == y).mean())


def verdict_of(key: Any, rule: Any, backend: Any, model: Any, text: TextInputs, chosen: Any,
               *, queries: int, log_queries: int, readings: bool = False, sequential: bool = False) -> dict[str, Any]:
    """The committed-input and log tests on the suspect's labels, combined by weighted Holm at ``ALPHA``; where the
    suspect has probabilities (a model, or a memo of one), the same tests reading them beside (``scores_*``)."""
    out = _verdict(key, rule, backend, _reading(model, text, scores=False), chosen, queries=queries,
                   log_queries=log_queries, use_scores=False, readings=readings, sequential=sequential)
    scored = _reading(model, text, scores=True)
    if scored is not None:
        out.update({f"scores_{k}": v for k, v in _verdict(key, rule, backend, scored, chosen, queries=queries,
                                                         log_queries=log_queries, use_scores=True).items()})
    return out


def _reading(model: Any, text: TextInputs, *, scores: bool) -> Any:
    """``model`` as a suspect answering labels only, or with its probabilities (None where it has none)."""
    if isinstance(model, torch.nn.Module):
        return LocalSuspect(model, input_shape=(LENGTH,), text=text, expose_scores=scores)
    if isinstance(model, TextTable):
        view = copy.copy(model)  # shares the memo
        view.expose_scores = scores
        return view
    return None if scores else model


class Recorder:
    """A suspect that keeps every input it was asked and the labels it answered (for :func:`other_readings`)."""

    def __init__(self, suspect: Any) -> None:
        self.suspect, self.asked, self.said = suspect, [], []
        self.num_classes = getattr(suspect, "num_classes", None)
        self.input_shape = getattr(suspect, "input_shape", None)
        self.description = getattr(suspect, "description", "suspect")

    def query(self, x: Any) -> Answers:
        answers = self.suspect.query(x)
        self.asked.append(np.asarray(x, dtype=object))
        self.said.append(np.asarray(answers.labels, dtype=np.int64))
        return answers

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.concatenate(self.asked), np.concatenate(self.said)
        self.asked, self.said = [], []
        return x, y


def head_basis(psi: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """An orthonormal basis (k×r) of the served log-probabilities' linear directions in a rule's whitened space,
    fitted by least squares on features ``psi`` and served ``scores`` of key-free inputs."""
    logp = np.log(np.maximum(scores, 1e-300))
    design = np.hstack([psi, np.ones((len(psi), 1))])
    coef = np.linalg.lstsq(design, logp - logp.mean(axis=1, keepdims=True), rcond=None)[0][:-1]
    q, r = np.linalg.qr(coef)
    return q[:, np.abs(np.diag(r)) > 1e-8 * np.abs(r).max()]


def other_readings(rule: Any, backend: Any, x: np.ndarray, answers: np.ndarray) -> dict[str, float]:
    """Research (``--readings``): ``Z`` of the same label answers read three ways by the library's statistic, each a
    function of the answers and key-free quantities (so exactly N(0, 1) under the null): ``plain`` signs;
    ``centred`` on the served model's expected sign (:func:`expected_signs`, the library's default for a text rule);
    ``centred-proj``, centred and with the served head's class directions (:func:`head_basis` on the rule's
    committed inputs) projected out of the features."""
    scores = served_scores(backend, x)
    _, lo, hi = top_pairs(scores)
    psi = rule.features(x)
    ref_x = rule.verification_inputs
    basis = head_basis(rule.features(ref_x), served_scores(backend, ref_x))
    centre = expected_signs(scores, lo, hi)
    return {name: tiebreak_statistic(rule=rule, psi=phi, lo=lo, hi=hi, answers=answers, centre=c)[0]
            for name, phi, c in (("plain", psi, None), ("centred", psi, centre),
                                 ("centred-proj", psi - (psi @ basis) @ basis.T, centre))}


def _verdict(key: Any, rule: Any, backend: Any, suspect: Any, chosen: Any,
             *, queries: int, log_queries: int, use_scores: bool, readings: bool = False,
             sequential: bool = False) -> dict[str, Any]:
    readings = readings and not use_scores
    asking = Recorder(suspect) if readings else suspect
    committed = tiebreak_test(key=key, rule=rule, served=backend, suspect=asking, queries=queries,
                              use_scores=use_scores)
    asked_committed = asking.take() if readings else None
    logged = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=asking, chosen=chosen,
                               queries=log_queries, use_scores=use_scores)
    verdict = decide(key=key, tests=[committed, logged], alpha=ALPHA, suspect="suspect")
    out = {"committed_log10_p": round(committed.log10_p, 2), "log_log10_p": round(logged.log10_p, 2),
           "verdict": verdict.kind, "verdict_log10_p": round(min(verdict.adjusted), 2)}
    if readings:
        assert asked_committed is not None
        z_committed = other_readings(rule, backend, *asked_committed)
        z_log = other_readings(rule, backend, *asking.take())
        mine = "centred" if "centred" in logged.details else "plain"  # the library's own reading
        if abs(z_committed[mine] - committed.details["z"]) > 1e-6 or abs(z_log[mine] - logged.details["z"]) > 1e-6:
            raise SystemExit("the recorded answers do not reproduce the library's Z")
        for name in READINGS:
            tests = [dataclasses.replace(committed, log10_p=z_log10_p(z_committed[name])),
                     dataclasses.replace(logged, log10_p=z_log10_p(z_log[name]))]
            read = decide(key=key, tests=tests, alpha=ALPHA, suspect="suspect")
            out.update({f"{name}_committed_log10_p": round(tests[0].log10_p, 2),
                        f"{name}_log_log10_p": round(tests[1].log10_p, 2), f"{name}_verdict": read.kind,
                        f"{name}_verdict_log10_p": round(min(read.adjusted), 2)})
    if sequential and not use_scores:
        out.update(sequential_readings(key, rule, backend, suspect, chosen, committed))
    if log_queries != queries:  # the same log test at the committed test's size, side by side
        fewer = tiebreak_log_test(key=key, rule=rule, served=backend, suspect=suspect, chosen=chosen, queries=queries,
                                  use_scores=use_scores)
        out[f"log_log10_p_at_{queries}"] = round(fewer.log10_p, 2)
    return out


SEQUENTIAL_READINGS = ("plain", "centred")  # --sequential: the sequential log test reads labels these ways


def sequential_readings(key: Any, rule: Any, backend: Any, suspect: Any, chosen: Any, committed: Any) -> dict[str, Any]:
    """Research (``--sequential``): the sequential log test on the suspect's labels read plain and centred, each
    stopping at its weighted-Holm share of ``ALPHA`` beside the committed-input test, and the verdict of each with
    the committed-input test as the library reads it."""
    share = alpha_share(LOG_TEST_WEIGHT, [committed.weight, LOG_TEST_WEIGHT])
    out: dict[str, Any] = {}
    for name in SEQUENTIAL_READINGS:
        seq = tiebreak_log_sequential(key=key, rule=rule, served=backend, suspect=suspect, chosen=chosen, alpha=ALPHA,
                                      share=share, use_scores=False, centred=name == "centred")
        verdict = decide(key=key, tests=[committed, seq], alpha=ALPHA, suspect="suspect")
        out.update({f"seq_{name}_log10_p": round(seq.log10_p, 2), f"seq_{name}_queries": seq.queries,
                    f"seq_{name}_stopped": seq.details["stopped"], f"seq_{name}_verdict": verdict.kind,
                    f"seq_{name}_verdict_log10_p": round(min(verdict.adjusted), 2)})
    return out


class MiniLMProbe:
    """A thief's surrogate on the public MiniLM encoder: a linear head on its frozen mean-pooled features.

    The encoder is deterministic, so its features are computed once per text (:func:`minilm_features`) and the
    probe answers from them: the same labels as ``minilm-classifier`` with that frozen encoder and this head,
    without rerunning MiniLM (25 texts/s on one shared core) for every verification query.
    """

    def __init__(self, head: torch.nn.Linear, features: dict[str, np.ndarray]) -> None:
        self.head, self.features = head.eval(), features
        self.num_classes, self.input_shape, self.description = 8, (LENGTH,), "MiniLM probe"

    def logits(self, x: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.head(torch.from_numpy(np.stack([self.features[str(t)] for t in x])))

    def query(self, x: Any) -> Answers:
        return Answers(labels=self.logits(x).argmax(1).numpy().astype(np.int64))

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.logits(x).argmax(1).numpy() == y).mean())


def minilm_features(texts: list[str], text: TextInputs) -> dict[str, np.ndarray]:
    """MiniLM's mean-pooled features of ``texts`` (the input of ``minilm-classifier``'s head), cached on disk."""
    import hashlib

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]

    def make(path: Path) -> None:
        model = build_model("minilm-classifier", num_classes=8, input_shape=(LENGTH,), seed=0).eval()
        feats = penultimate_featurizer(model, encode=text.encode, batch_size=64)(np.asarray(texts, dtype=object))
        save_tensors({"features": torch.from_numpy(feats)}, path, metadata={"texts": digest})

    path = cached({"name": "minilm-fortunes-features", "texts": digest}, make)
    feats = load_tensors(path)[0]["features"].numpy()
    return dict(zip(texts, feats))


def base_featurizer(features: dict[str, np.ndarray] | None) -> Any:
    """The public MiniLM encoder's cached mean-pooled features of each text, as a rule's featurizer (research: a map
    the MiniLM thief starts from, instead of the served model's fine-tuned features)."""
    assert features is not None

    def featurize(x: Any) -> np.ndarray:
        return np.stack([features[str(t)] for t in np.asarray(x, dtype=object).reshape(-1)]).astype(np.float32)

    return featurize


def probe_thief(api: TieBreakAPI, xa: np.ndarray, xe: np.ndarray, ye: np.ndarray, features: dict[str, np.ndarray],
                *, target: float | None, seed: int, max_epochs: int = 400) -> tuple[MiniLMProbe, int]:
    """A MiniLM-probe surrogate fitted (full-batch Adam) to the API's labels on the thief's texts, stopped at the
    first of every 20 epochs whose test accuracy reaches ``target`` (None: trained to the cap)."""
    labels = torch.as_tensor(np.asarray(api.query(xa).labels))
    feats = torch.from_numpy(np.stack([features[t] for t in xa]))
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats.shape[1], 8)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    probe = MiniLMProbe(head, features)
    for epoch in range(1, max_epochs + 1):
        head.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), labels).backward()
        optimizer.step()
        if target is not None and epoch % 20 == 0 and probe.accuracy(xe, ye) >= target:
            break
    return probe, epoch


def thieves(api: TieBreakAPI, log: TieBreakLog, *, key: Any, rule: Any, backend: Any, text: TextInputs,
            xa: np.ndarray, ids_e: torch.Tensor, y_e: torch.Tensor, xe: np.ndarray, ye: np.ndarray,
            victim_acc: float, cap: int, queries: int, log_queries: int, seed: int, archs: tuple[str, ...],
            features: dict[str, np.ndarray] | None = None, readings: bool = False, sequential: bool = False) -> Any:
    """The honest cost of ``api``, then per thief its label-only surrogate (trained until within 5 pp of the victim
    or the epoch cap) and the verdict on it; yields (row, the thief's ranked logged inputs)."""
    cost = accuracy_cost(api=api.for_client("honest"), x=xe, y=ye)
    common = {"victim_acc": round(victim_acc, 3), "api_acc": round(cost["api_accuracy"], 3),
              "cost_pp": round(cost["accuracy_cost_pp"], 2), "changed": round(cost["changed_fraction"], 3)}
    # the MiniLM probe twice: stopped at the first check within 5 pp (minimal), and trained to its cap (converged)
    for variant, target in (("minimal", victim_acc - 0.05), ("converged", None)):
        if features is None or f"minilm-probe-{variant}" not in archs:
            continue
        client = f"thief-minilm-probe-{variant}"
        probe, epochs = probe_thief(api.for_client(client), xa, xe, ye, features, target=target, seed=seed)
        chosen = select_log_inputs(key=key, rule=rule, served=backend, log=log, client=client)
        row = {"thief": f"minilm-probe ({variant})", **common, "surrogate_acc": round(probe.accuracy(xe, ye), 3),
               "epochs": epochs, "queries": len(xa), "logged": len(chosen.x),
               **verdict_of(key, rule, backend, probe, text, chosen, queries=queries, log_queries=log_queries,
                          readings=readings, sequential=sequential)}
        row["within_5pp"] = row["surrogate_acc"] >= victim_acc - 0.05
        yield row, chosen
    # "minilm-3ep" / "minilm-1ep": the MiniLM thief's whole 3-epoch or exactly one-epoch fine-tune, not stopped once
    # within 5 pp (one epoch: every setting's thief trains the same, so their evidence compares at equal training)
    fixed = {"minilm-3ep": 3, "minilm-1ep": 1}
    for t, name in enumerate(a for a in ("text-bow", "tiny-bert", "minilm-classifier", *fixed) if a in archs):
        client, arch = f"thief-{name}", "minilm-classifier" if name in fixed else name
        epochs = fixed.get(name) or {"text-bow": cap, "tiny-bert": max(3, cap // 3), "minilm-classifier": 3}[arch]
        stop = None if name in fixed else accuracy_reached(ids_e, y_e, victim_acc - 0.05)
        stolen = extract(api.for_client(client), x=xa, arch=arch, epochs=epochs, lr=VICTIM_LR[arch], batch_size=32,
                         seed=seed + t, text=text, stop=stop)
        chosen = select_log_inputs(key=key, rule=rule, served=backend, log=log, client=client)
        row = {"thief": name, **common, "surrogate_acc": round(accuracy(stolen.model, ids_e, y_e), 3),
               "epochs": stolen.epochs, "queries": stolen.queries, "logged": len(chosen.x),
               **verdict_of(key, rule, backend, stolen.model, text, chosen, queries=queries,
                            log_queries=log_queries, readings=readings, sequential=sequential)}
        row["within_5pp"] = row["surrogate_acc"] >= victim_acc - 0.05
        yield row, chosen


def text_key(k: int, keys_dir: Path | None, modality: dict[str, Any]) -> Any:
    """Key ``k``: fresh, or shared through ``keys_dir`` (:func:`benchmarks.common.shared_key`)."""
    return shared_key(k, keys_dir, lambda: generate_key(owner=f"Fortunes owner {k}", num_classes=8,
                                                          modality=modality))


# both maps are searched on the public map's grid (to 1.5), so that neither is capped where the other is not
RESEARCH_GRID = COST_GRIDS[PUBLIC_MINILM]


def scale_within(key: Any, backend: Any, rule: Any, xe: np.ndarray, ye: np.ndarray, max_cost: float) -> float:
    """The largest scale on :data:`RESEARCH_GRID` within ``max_cost`` points on the test third, chosen as the
    library chooses (:func:`largest_beta_within`)."""
    api = TieBreakAPI(key=key, backend=backend, rule=rule, beta=1.0, expose_scores=False)
    chosen = largest_beta_within(accuracy_costs(api=api, x=xe, y=ye, betas=RESEARCH_GRID), max_cost,
                                 confidence=COST_CONFIDENCE)
    if chosen is None:
        raise SystemExit(f"no scale costs at most {max_cost:g} pp on this key")
    return float(chosen["beta"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 key, 300/300 queries, fewer epochs: minutes.")
    parser.add_argument("--keys", type=int, default=None, help="Fresh keys (default 3; 1 with --quick).")
    parser.add_argument("--betas", default=None,
                        help="Scales of the keyed shift, comma-separated, measured side by side on the same keys and "
                             "thief seeds (default 1,0.5; 1 with --quick).")
    parser.add_argument("--victim", choices=sorted(VICTIM_ARCH), default="tiny-bert",
                        help="The served model: a tiny BERT from scratch (3 epochs), or MiniLM fine-tuned (2 epochs, "
                             "cached), whose thief fine-tunes MiniLM too and whose null panel adds three MiniLM "
                             "fine-tunes.")
    parser.add_argument("--victim-epochs", type=int, default=None, help="Epochs of the victim (3 tiny BERT, 2 MiniLM).")
    parser.add_argument("--thief-epochs", type=int, default=None, help="Thief epoch cap (default 20; 8 quick).")
    parser.add_argument("--minilm-thief", action="store_true",
                        help="Add a thief on the public MiniLM encoder (a linear probe on its frozen features, computed "
                             "once per text and cached: about 4 minutes on one core).")
    parser.add_argument("--log-queries", type=int, default=None,
                        help="Logged queries the log test asks (default: as many as the committed-input test).")
    parser.add_argument("--thieves", default=None,
                        help="Comma-separated thieves (text-bow, tiny-bert, minilm-classifier, minilm-3ep, minilm-1ep, "
                             "minilm-probe-minimal, minilm-probe-converged); default by victim.")
    parser.add_argument("--max-texts", type=int, default=None,
                        help="Keep at most this many texts of each third (a smoke run of the plumbing).")
    parser.add_argument("--name", default=None,
                        help="Results file name (default text_extraction, text_extraction_quick with --quick).")
    parser.add_argument("--components", type=int, default=None,
                        help="Principal directions of the served features the rule keeps (default: the library's).")
    parser.add_argument("--feature-map", choices=("served", "base"), default="served",
                        help="What the rule's keyed shift is read from: the served model's penultimate features (the "
                             "library's map) or, research, the public MiniLM encoder's mean-pooled features (the "
                             "encoder the MiniLM victim and thieves start from).")
    parser.add_argument("--max-cost", type=float, default=None,
                        help="Research: per key, serve the largest scale (0.05 to 1.5 in steps of 0.05) whose honest "
                             "cost on the test third is at most this many points with the library's confidence, as "
                             "`wmark tiebreak build --max-cost` picks up to 1 (replaces --betas).")
    parser.add_argument("--readings", action="store_true",
                        help="Research: read every label verdict's answers also with plain signs, centred on the served "
                             "model's expected sign, and centred with its head directions projected out (other_readings).")
    parser.add_argument("--sequential", action="store_true",
                        help="Research: also run the sequential log test on every label verdict's suspect, reading its "
                             "labels plain and centred (sequential_readings).")
    parser.add_argument("--keys-dir", type=Path, default=None,
                        help="Load the keys k0.key, k1.key, ... from here, or write fresh ones there (to compare "
                             "settings side by side in separate processes on the same keys and thief seeds).")
    args = parser.parse_args()
    quick = args.quick
    n_keys = args.keys or (1 if quick else 3)
    queries = 300 if quick else 1000
    cap = args.thief_epochs or (8 if quick else 20)
    betas = [float(b) for b in (args.betas or ("1" if quick else "1,0.5")).split(",")]
    start = time.perf_counter()
    tok = load_tokenizer(MINILM)
    modality = text_modality(tokenizer=tok, name=MINILM, max_length=LENGTH)
    text = TextInputs(tokenizer=tok, max_length=LENGTH)
    owner_ds, thief_ds = load_dataset("fortunes@owner"), load_dataset("fortunes@attacker")
    xo, yo = texts_and_labels(owner_ds.texts_train, owner_ds.y_train, text)
    xa, ya = texts_and_labels(thief_ds.texts_train, thief_ds.y_train, text)
    xe, ye = texts_and_labels(owner_ds.texts_test, owner_ds.y_test, text)
    if args.max_texts:
        (xo, yo), (xa, ya), (xe, ye) = ((v[:args.max_texts], w[:args.max_texts]) for v, w in ((xo, yo), (xa, ya), (xe, ye)))
    ids_e, y_e = text.encode(list(xe), pad_to_max=True)["input_ids"], torch.as_tensor(ye)
    print(f"texts: owner {len(xo)}, thief {len(xa)}, test {len(xe)}", flush=True)

    minilm = args.victim == "minilm"
    arch = VICTIM_ARCH[args.victim]
    victim_epochs = args.victim_epochs or (2 if minilm else 3)
    victim = trained(arch, xo, yo, text, epochs=victim_epochs, seed=0)
    victim_acc = accuracy(victim, ids_e, y_e)
    backend: Any = (TextTable(victim, text, description="victim MiniLM", expose_scores=True) if minilm
                    else LocalSuspect(victim, input_shape=(LENGTH,), text=text, description="victim tiny-bert"))
    refs = train_reference_surrogates(served=backend, x=xo, archs=["text-bow"], repeats=1, text=text)
    print(f"victim {victim_acc:.3f}; {len(refs)} references ({time.perf_counter() - start:.0f} s)", flush=True)
    archs: tuple[str, ...] = ("text-bow", "tiny-bert")
    if minilm:
        archs = ("minilm-classifier", "minilm-probe-minimal", "text-bow")
    elif args.minilm_thief:
        archs = ("minilm-probe-minimal", "minilm-probe-converged", "text-bow", "tiny-bert")
    if args.thieves:
        archs = tuple(args.thieves.split(","))
    log_queries = args.log_queries or queries
    features = None
    if any(a.startswith("minilm-probe") for a in archs) or args.feature_map == "base":
        needed = sorted(set(xa) | set(xe) | set(xo))
        features = minilm_features(needed, text)
        print(f"MiniLM features of {len(needed)} texts ({time.perf_counter() - start:.0f} s)", flush=True)

    panel: list[tuple[str, Any]] = [
        ("text-bow, thief third, true labels", train("text-bow", xa, ya, text, epochs=8, seed=1)),
        ("text-bow, owner third, true labels", train("text-bow", xo, yo, text, epochs=8, seed=2)),
        ("tiny-bert, thief third, true labels", train("tiny-bert", xa, ya, text, epochs=3, seed=3)),
        ("tiny-bert, owner third, seed 4", train("tiny-bert", xo, yo, text, epochs=3, seed=4)),
        ("text-bow, distilled from the unmarked victim", extract(backend, x=xa, arch="text-bow", epochs=8, seed=5,
                                                                  text=text).model),
        ("tiny-bert, distilled from the unmarked victim", extract(backend, x=xa, arch="tiny-bert", epochs=3, seed=6,
                                                                   text=text).model),
    ]
    if minilm:
        panel += [
            ("MiniLM, owner third, seed 1", TextTable(trained(arch, xo, yo, text, epochs=victim_epochs, seed=1), text,
                                                       description="MiniLM seed 1", expose_scores=False)),
            ("MiniLM, thief third, true labels", TextTable(trained(arch, xa, ya, text, epochs=victim_epochs, seed=2),
                                                            text, description="MiniLM thief third", expose_scores=False)),
            ("MiniLM, distilled from the unmarked victim", TextTable(_cached_minilm(
                {"name": "text-extraction-minilm-distilled", "texts": _digest(xa), "victim": [_digest(xo), _digest(yo), victim_epochs],
                 "seed": 3},
                lambda: extract(backend, x=xa, arch=arch, epochs=victim_epochs, lr=VICTIM_LR[arch], batch_size=32,
                                seed=3, text=text).model), text, description="MiniLM distilled", expose_scores=False)),
        ]
    panel_acc = {name: round(m.accuracy(xe, ye) if isinstance(m, TextTable) else accuracy(m, ids_e, y_e), 3)
                 for name, m in panel}
    print(f"panel trained ({time.perf_counter() - start:.0f} s)", flush=True)

    rows: list[dict[str, Any]] = []
    nulls: list[dict[str, Any]] = []
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"wmark-text-extraction-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    keyset = [text_key(k, args.keys_dir, modality) for k in range(n_keys)]
    kept = None
    for k, key in enumerate(keyset):
        featurizer = backend.features if minilm else penultimate_featurizer(victim, encode=text.encode)
        space = "served-penultimate"
        if args.feature_map == "base":
            featurizer, space = base_featurizer(features), "public-minilm-mean-pooled"
        rule = build_tiebreak_rule(key=key, x=xo, featurizer=featurizer, components=args.components,
                                   feature_space=space, text=text)
        kept = rule.components
        rule = commit_verification_inputs(rule, served=backend, x=xo, references=refs, count=queries, how="text-bow")
        if args.max_cost is not None:
            betas = [scale_within(key, backend, rule, xe, ye, args.max_cost)]
            print(f"key {k}: beta {betas[0]:g} within {args.max_cost:g} pp", flush=True)
        for beta in betas:
            with TieBreakLog(workdir / f"key{k}-beta{beta:g}.sqlite", key=key) as log:
                api = TieBreakAPI(key=key, backend=backend, rule=rule, beta=beta, expose_scores=False, log=log)
                for row, chosen in thieves(api, log, key=key, rule=rule, backend=backend, text=text, xa=xa,
                                           ids_e=ids_e, y_e=y_e, xe=xe, ye=ye, victim_acc=victim_acc, cap=cap,
                                           queries=queries, log_queries=log_queries, seed=100 + 10 * k,
                                           archs=archs, features=features, readings=args.readings,
                                           sequential=args.sequential):
                    rows.append({"key": k, "beta": beta, **row})
                    print(table([rows[-1]], list(rows[-1])), flush=True)
                    for name, model in panel:
                        nulls.append({"key": k, "beta": beta, "log_of": row["thief"], "model": name,
                                      **verdict_of(key, rule, backend, model, text, chosen, queries=queries,
                                                   log_queries=log_queries, readings=args.readings,
                                                   sequential=args.sequential)})
        print(f"key {k} done ({time.perf_counter() - start:.0f} s)", flush=True)
    accused = [n for n in nulls if n["verdict"] != "none"]
    accused_scores = [n for n in nulls if n.get("scores_verdict", "none") != "none"]
    caught = [r for r in rows if r["verdict"] == "extracted"]
    print()
    print(table(rows, ["key", "beta", "thief", "victim_acc", "api_acc", "cost_pp", "surrogate_acc", "within_5pp", "epochs",
                       "committed_log10_p", "log_log10_p", "verdict"]))
    print()
    print(table([{"model": name, "test_acc": acc,
                  "min_committed_log10_p": min(n["committed_log10_p"] for n in nulls if n["model"] == name),
                  "min_log_log10_p": min(n["log_log10_p"] for n in nulls if n["model"] == name),
                  "accused": sum(n["verdict"] != "none" for n in nulls if n["model"] == name)}
                 for name, acc in panel_acc.items()],
                ["model", "test_acc", "min_committed_log10_p", "min_log_log10_p", "accused"]))
    print(f"\nthieves caught at alpha {ALPHA:g}: {len(caught)}/{len(rows)}; independent models accused: "
          f"{len(accused)}/{len(nulls)} ({len(panel)} models x {n_keys} keys x {len(betas)} betas x 2 logs)")
    per_beta = {f"{b:g}": {"mean_cost_pp": round(float(np.mean([r["cost_pp"] for r in rows if r["beta"] == b])), 2),
                           "caught": sum(r["verdict"] == "extracted" for r in rows if r["beta"] == b),
                           "caught_in_scope": sum(r["verdict"] == "extracted" and r["within_5pp"] for r in rows
                                                  if r["beta"] == b),
                           "caught_in_scope_scores": sum(r.get("scores_verdict") == "extracted" and r["within_5pp"]
                                                         for r in rows if r["beta"] == b),
                           "in_scope": sum(r["within_5pp"] for r in rows if r["beta"] == b),
                           "thieves": sum(r["beta"] == b for r in rows)} for b in sorted({r["beta"] for r in rows})}
    print(table([{"beta": b, **v} for b, v in per_beta.items()], ["beta", "mean_cost_pp", "thieves", "in_scope",
                                                                 "caught", "caught_in_scope",
                                                                 "caught_in_scope_scores"]))
    print(f"independent models accused reading probabilities: {len(accused_scores)}/"
          f"{sum('scores_verdict' in n for n in nulls)}")
    other = {name: {"caught_in_scope": sum(r.get(f"{name}_verdict") == "extracted" and r["within_5pp"] for r in rows),
                    "caught": sum(r.get(f"{name}_verdict") == "extracted" for r in rows),
                    "independent_accused": sum(n.get(f"{name}_verdict", "none") != "none" for n in nulls),
                    "min_null_verdict_log10_p": min((n[f"{name}_verdict_log10_p"] for n in nulls
                                                     if f"{name}_verdict_log10_p" in n), default=0.0)}
             for name in READINGS if args.readings}
    if other:
        print(table([{"reading": k, **v} for k, v in other.items()],
                    ["reading", "caught", "caught_in_scope", "independent_accused", "min_null_verdict_log10_p"]))
    seq_summary = {name: {
        "stopped_on_evidence_in_scope": sum(r.get(f"seq_{name}_stopped") == "evidence" and r["within_5pp"] for r in rows),
        "caught_in_scope": sum(r.get(f"seq_{name}_verdict") == "extracted" and r["within_5pp"] for r in rows),
        "median_queries_in_scope_stopped": float(np.median(
            [r[f"seq_{name}_queries"] for r in rows if r.get(f"seq_{name}_stopped") == "evidence" and r["within_5pp"]]
            or [float("nan")])),
        "null_stopped_on_evidence": sum(n.get(f"seq_{name}_stopped") == "evidence" for n in nulls),
        "independent_accused": sum(n.get(f"seq_{name}_verdict", "none") != "none" for n in nulls),
        "min_null_log10_p": min((n[f"seq_{name}_log10_p"] for n in nulls if f"seq_{name}_log10_p" in n), default=0.0)}
        for name in SEQUENTIAL_READINGS if args.sequential}
    if seq_summary:
        print(table([{"sequential": k, **v} for k, v in seq_summary.items()], ["sequential", *next(iter(
            seq_summary.values()))]))
    doc = {"quick": quick, "alpha": ALPHA, "betas": sorted({r["beta"] for r in rows}), "max_cost": args.max_cost, "thief_epoch_cap": cap, "keys": n_keys, "queries": queries, "log_queries": log_queries,
           "victim": {"arch": "MiniLM fine-tuned" if minilm else "tiny-bert (from scratch)", "epochs": victim_epochs,
                      "accuracy": round(victim_acc, 4)},
           "minilm_thief": bool(args.minilm_thief), "texts": {"owner": len(xo), "thief": len(xa), "test": len(xe), "max_tokens": LENGTH},
           "components": kept, "feature_map": args.feature_map,
           "references": "4 text-bow (hard 3/6/10 epochs, soft 4), distilled from the unmarked victim on the owner's texts",
           "thieves": rows, "null_panel": {"models": panel_acc, "tests": nulls, "accused": len(accused)},
           "summary": {"caught": len(caught), "thieves": len(rows), "in_scope": sum(r["within_5pp"] for r in rows),
                       "per_beta": per_beta, "independent_accused": len(accused), "independent_tests": len(nulls),
                       "other_readings": other, "sequential_readings": seq_summary,
                       "independent_accused_scores": len(accused_scores),
                       "independent_tests_scores": sum("scores_verdict" in n for n in nulls),
                       "min_null_verdict_log10_p_scores": min((n["scores_verdict_log10_p"] for n in nulls
                                                               if "scores_verdict" in n), default=None)},
           "seconds": round(time.perf_counter() - start, 1)}
    path = write_results(args.name or ("text_extraction_quick" if quick else "text_extraction"), doc)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
