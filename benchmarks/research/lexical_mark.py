"""Pre-check: does a label-only MiniLM thief learn a keyed *lexical* shift from a text API? (#17, research)

The tie-break mark misses MiniLM thieves that stop after one epoch. This tries another kind of text mark:

* the key draws a set of words ``W`` (from the owner's vocabulary, a document-frequency band) and, from an
  independent stream, a class ``s_w`` for each, uniform over the C classes;
* the API adds ``delta`` to the logit of ``s_w`` for every keyed word ``w`` a text contains, so close calls on
  texts with keyed words lean to the keyed class (``delta`` large: every such text answers ``s_w``);
* the test appends each keyed word to ``n`` probe texts (the owner's test texts closest to a tie, with no keyed
  word) and counts, per word and class ``c``, ``D_w(c)`` = answers ``c`` with the word minus answers ``c``
  without. The statistic is ``T = sum_w D_w(s_w)``. A suspect that never saw the key's answers is independent of
  the classes ``s_w`` (drawn independently of ``W``, the probes and the suspect), so under the null ``T`` is a sum
  of independent uniform draws from the known rows ``D_w(.)``: its distribution is their exact convolution.

Reported per shift: the honest cost through the API (test texts), the one-epoch MiniLM thief's accuracy and the
test's log10 p on it, and the same test on null models (MiniLM distilled one epoch from the *unmarked* victim,
MiniLM fine-tuned on true labels). ``python benchmarks/research/lexical_mark.py --seeds 0,1``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import write_results
from benchmarks.text_extraction import LENGTH, VICTIM_LR, fortunes_minilm_victim, texts_and_labels, trained
from wmark.data import load_dataset
from wmark.distill import extract
from wmark.suspects import LocalSuspect
from wmark.suspects.base import Answers

WORD = re.compile(r"[a-z]+")


def words_of(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def keyed_words(seed: int, xo: np.ndarray, tok: Any, *, m: int, band: tuple[float, float]) -> tuple[list[str], np.ndarray]:
    """``m`` words from the owner's texts whose document frequency lies in ``band`` (single wordpieces of at least
    three letters), and their classes, from two independent streams of ``seed``."""
    df: dict[str, int] = {}
    for t in xo:
        for w in words_of(str(t)):
            df[w] = df.get(w, 0) + 1
    lo, hi = band[0] * len(xo), band[1] * len(xo)
    pool = sorted(w for w, n in df.items() if lo <= n <= hi and len(w) >= 3 and tok.tokenize(w) == [w])
    words = list(np.random.default_rng([seed, 1]).choice(pool, size=m, replace=False))
    classes = np.random.default_rng([seed, 2]).integers(0, 8, size=m)
    return words, classes


class LexicalAPI:
    """The victim's answers with ``delta`` added to ``s_w``'s logit for every keyed word in the text (label-only)."""

    def __init__(self, victim: Any, words: list[str], classes: np.ndarray, delta: float) -> None:
        self.victim, self.delta = victim, delta
        self.shift = dict(zip(words, classes.tolist()))
        self.num_classes, self.input_shape, self.description = 8, (LENGTH,), f"lexical delta {delta}"

    def logits(self, x: Any) -> np.ndarray:
        texts = [str(t) for t in np.asarray(x, dtype=object).reshape(-1)]
        z = self.victim._rows(texts)[0].astype(np.float64).copy()
        for i, t in enumerate(texts):
            for w in words_of(t) & self.shift.keys():
                z[i, self.shift[w]] += self.delta
        return z

    def query(self, x: Any) -> Answers:
        return Answers(labels=self.logits(x).argmax(1).astype(np.int64), scores=None)


def labels_of(model: Any, texts: list[str], text: Any) -> np.ndarray:
    x = np.empty(len(texts), dtype=object)
    x[:] = texts
    if isinstance(model, torch.nn.Module):
        return LocalSuspect(model, input_shape=(LENGTH,), text=text).query(x).labels
    return model.query(x).labels


def lexical_test(model: Any, probes: list[str], words: list[str], classes: np.ndarray, text: Any) -> dict[str, Any]:
    """``T = sum_w D_w(s_w)`` and its exact null tail (the convolution of the uniform draws over each row)."""
    base = labels_of(model, probes, text)
    rows = []
    for w in words:
        marked = labels_of(model, [f"{p} {w}" for p in probes], text)
        rows.append(np.bincount(marked, minlength=8) - np.bincount(base, minlength=8))
    d = np.stack(rows)
    observed = int(d[np.arange(len(words)), classes].sum())
    n = len(probes)
    dist = np.zeros(2 * n * len(words) + 1)
    dist[n * len(words)] = 1.0  # the offset: value v sits at index v + n·m
    for row in d:
        nxt = np.zeros_like(dist)
        for c in range(8):
            nxt += np.roll(dist, int(row[c])) / 8.0
        dist = nxt
    tail = dist[observed + n * len(words):].sum()
    mean = d.mean(axis=1).sum()
    sd = float(np.sqrt(d.var(axis=1).sum()))
    return {"T": observed, "null_mean": round(float(mean), 2), "z": round((observed - mean) / max(sd, 1e-9), 2),
            "log10_p": round(float(np.log10(max(tail, 1e-300))), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="Key seeds, comma-separated.")
    parser.add_argument("--deltas", default="3,6,100", help="Logit shifts, comma-separated.")
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--band", default="0.005,0.02", help="Document-frequency band of the keyed words.")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--name", default="research_lexical_mark")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    s = fortunes_minilm_victim()
    text, victim, xo, xe, ye = s["text"], s["victim"], s["xo"], s["xe"], s["ye"]
    thief_ds = load_dataset("fortunes@attacker")
    xa, ya = texts_and_labels(thief_ds.texts_train, thief_ds.y_train, text)
    band = tuple(float(v) for v in args.band.split(","))
    victim_acc = victim.accuracy(xe, ye)
    print(f"victim acc {victim_acc:.3f} ({time.time() - t0:.0f} s)", flush=True)
    nulls = {
        "minilm distilled 1 epoch from the unmarked victim": extract(
            victim, x=xa, arch="minilm-classifier", epochs=1, lr=VICTIM_LR["minilm-classifier"], batch_size=32,
            seed=11, text=text).model.eval(),
        "minilm true labels, thief third, 1 epoch": trained("minilm-classifier", xa, ya, text, epochs=1, seed=12),
    }
    rows = []
    for seed in (int(v) for v in args.seeds.split(",")):
        words, classes = keyed_words(seed, xo, text.tokenizer, m=args.words, band=band)
        keyed = set(words)
        lengths = {t: len(text.tokenizer.tokenize(str(t))) for t in xe}
        z = victim._rows(xe)[0]
        top = np.sort(z, axis=1)
        margin = top[:, -1] - top[:, -2]
        order = [i for i in np.argsort(margin) if not (words_of(str(xe[i])) & keyed) and lengths[xe[i]] <= LENGTH - 8]
        probes = [str(xe[i]) for i in order[:args.probes]]
        cover = float(np.mean([bool(words_of(str(t)) & keyed) for t in xa]))
        print(f"key {seed}: words {words} classes {classes.tolist()}; thief texts with a keyed word {cover:.3f}",
              flush=True)
        for name, model in nulls.items():
            row = {"seed": seed, "suspect": name, **lexical_test(model, probes, words, classes, text)}
            print(row, flush=True)
            rows.append(row)
        for delta in (float(v) for v in args.deltas.split(",")):
            api = LexicalAPI(victim, words, classes, delta)
            cost = victim_acc - float((api.query(xe).labels == ye).mean())
            stolen = extract(api, x=xa, arch="minilm-classifier", epochs=1, lr=VICTIM_LR["minilm-classifier"],
                             batch_size=32, seed=100 + seed, text=text).model.eval()
            acc = float((labels_of(stolen, [str(t) for t in xe], text) == ye).mean())
            row = {"seed": seed, "delta": delta, "cost_pp": round(100 * cost, 2), "suspect": "thief 1 epoch",
                   "thief_acc": round(acc, 3), "victim_acc": round(victim_acc, 3),
                   "api_lex_answers_changed": round(float((api.query(xa).labels != victim.query(xa).labels).mean()), 4),
                   **lexical_test(stolen, probes, words, classes, text)}
            print(row, f"({time.time() - t0:.0f} s)", flush=True)
            rows.append(row)
    write_results(args.name, {"config": vars(args), "rows": rows, "seconds": round(time.time() - t0)})


if __name__ == "__main__":
    main()
