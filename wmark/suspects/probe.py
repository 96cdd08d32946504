"""A suspect wrapper that records every query in a transcript, resumes from it, and mixes in cover traffic.

:class:`ProbeSuspect` sits between the verifier and a remote suspect. For each batch of trigger queries it

1. interleaves ordinary in-distribution inputs (cover traffic), so the probe looks like normal use; only
   the triggers' answers go back to the verifier, so cover answers never enter the statistic;
2. looks every input up in the :class:`~wmark.transcript.Transcript` and reuses answers given earlier
   (after a crash the same command resumes without asking again);
3. records the rest as pending, sends them, and commits each answer as it arrives.

Cover inputs and their positions are derived from a seed (from the key, by default) and from the running
trigger count only, so a resumed run asks the very same cover queries and finds them in the transcript.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wmark.errors import UsageError
from wmark.suspects.base import Answers, Suspect
from wmark.suspects.http import Outcome
from wmark.text import is_text_array
from wmark.transcript import Transcript, input_sha256

MAX_COVER_RATIO = 1000


class CoverTraffic:
    """Ordinary inputs to interleave with triggers.

    Before the t-th trigger, ``Poisson(ratio)`` cover inputs are sent (a count drawn from ``seed`` and ``t``
    only), taken from ``inputs`` in a seeded random order.

    Args:
        inputs: In-distribution inputs (N×input_shape), or an array of strings for a text suspect.
        ratio: Mean number of cover queries per trigger query.
        seed: Seed of the order and the counts.
    """

    def __init__(self, inputs: np.ndarray, *, ratio: float, seed: int) -> None:
        # NaN, infinity and huge ratios reach numpy's Poisson draw otherwise, which fails naming no option
        if not (0 < ratio <= MAX_COVER_RATIO):
            raise UsageError(f"The cover ratio must be a number above 0 and at most {MAX_COVER_RATIO}, got {ratio}.")
        if len(inputs) == 0:
            raise UsageError("The cover data set is empty.")
        # Texts stay strings: a text suspect is asked the text itself, as it is asked its triggers.
        self.inputs = np.asarray(inputs, dtype=object) if is_text_array(inputs) else np.asarray(inputs, dtype=np.float32)
        self.ratio = float(ratio)
        self.seed = int(seed)
        self.order = np.random.default_rng([self.seed, 0]).permutation(len(self.inputs))
        self._cursor = 0

    def before(self, t: int) -> list[np.ndarray]:
        """The cover inputs to send before trigger number ``t``."""
        count = int(np.random.default_rng([self.seed, 1, t]).poisson(self.ratio))
        picked = []
        for _ in range(count):
            picked.append(self.inputs[self.order[self._cursor % len(self.order)]])
            self._cursor += 1
        return picked


@dataclass
class ProbeStats:
    """What a probe did: queries sent now and answers reused from the transcript, by role."""

    sent: dict[str, int] = field(default_factory=lambda: {"trigger": 0, "cover": 0})
    reused: dict[str, int] = field(default_factory=lambda: {"trigger": 0, "cover": 0})
    statuses: dict[str, int] = field(default_factory=dict)
    answers_with_scores: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"sent": dict(self.sent), "reused": dict(self.reused), "statuses": dict(self.statuses),
                "answers_with_scores": self.answers_with_scores}


class ProbeSuspect:
    """Wraps a suspect with a transcript and optional cover traffic (either may be ``None``).

    Args:
        inner: The suspect; an :class:`~wmark.suspects.http.HttpSuspect` streams answers one by one, any
            other suspect is asked one input at a time.
        transcript: Where queries and answers are recorded and resumed from.
        cover: Cover traffic to interleave.
    """

    def __init__(self, inner: Suspect, *, transcript: Transcript | None = None,
                 cover: CoverTraffic | None = None) -> None:
        self.inner = inner
        self.transcript = transcript
        self.cover = cover
        self.description = inner.description
        self.num_classes = inner.num_classes
        self.input_shape = inner.input_shape
        self.stats = ProbeStats()
        self._triggers_planned = 0

    def query(self, inputs: np.ndarray) -> Answers:
        x = np.asarray(inputs, dtype=object) if is_text_array(inputs) else np.asarray(inputs, dtype=np.float32)
        plan: list[tuple[np.ndarray, str, int]] = []
        for j in range(len(x)):
            if self.cover is not None:
                plan.extend((c, "cover", -1) for c in self.cover.before(self._triggers_planned))
            plan.append((x[j], "trigger", j))
            self._triggers_planned += 1
        labels = np.full(len(x), -1, dtype=np.int64)
        rows: list[tuple[float, ...] | None] = [None] * len(x)
        pending: list[int] = []
        digests = [input_sha256(item[0]) for item in plan]
        for i, (_, role, j) in enumerate(plan):
            rec = self.transcript.lookup(digests[i], role) if self.transcript is not None else None
            if rec is None:
                pending.append(i)
                continue
            self.stats.reused[role] += 1
            if j >= 0:
                labels[j], rows[j] = rec.label, rec.scores
        if pending:
            seqs = self.transcript.begin([(digests[i], plan[i][1]) for i in pending]) if self.transcript else []
            done: set[int] = set()
            try:
                for k, outcome in self._stream(np.stack([plan[i][0] for i in pending])):
                    i = pending[k]
                    role, j = plan[i][1], plan[i][2]
                    if self.transcript is not None:
                        self.transcript.finish(seqs[k], status=outcome.status, label=outcome.label,
                                               scores=outcome.scores, answer=outcome.answer,
                                               answer_sha256=outcome.answer_sha256, error=outcome.error,
                                               http_status=outcome.http_status, attempts=outcome.attempts)
                    done.add(k)
                    self.stats.sent[role] += 1
                    self.stats.statuses[outcome.status] = self.stats.statuses.get(outcome.status, 0) + 1
                    self.stats.answers_with_scores += int(outcome.scores is not None)
                    if j >= 0 and outcome.ok:
                        labels[j], rows[j] = outcome.label, outcome.scores
            except Exception as exc:
                if self.transcript is not None:
                    for k, seq in enumerate(seqs):
                        if k not in done:
                            self.transcript.finish(seq, status="failed", attempts=0,
                                                   error=f"no answer recorded: the run stopped ({type(exc).__name__})")
                raise
        scores = np.asarray(rows, dtype=np.float64) if rows and all(r is not None for r in rows) else None
        return Answers(labels=labels, scores=scores)

    def _stream(self, x: np.ndarray) -> Iterator[tuple[int, Outcome]]:
        stream = getattr(self.inner, "stream", None)
        if callable(stream):
            yield from stream(x)
            return
        for i in range(len(x)):
            ans = self.inner.query(x[i:i + 1])
            label = int(np.asarray(ans.labels).reshape(-1)[0])
            scores = None if ans.scores is None else tuple(float(v) for v in np.asarray(ans.scores)[0])
            yield i, (Outcome(status="ok", label=label, scores=scores) if label >= 0
                      else Outcome(status="malformed", error="the suspect abstained"))
