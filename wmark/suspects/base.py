"""The suspect interface shared by local models and remote APIs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from wmark.errors import UsageError


@dataclass(frozen=True)
class Answers:
    """What a suspect said about a batch of inputs.

    Attributes:
        labels: Top-1 label per input; ``-1`` marks an abstention (failed or malformed answer), which a
            verifier must never count as a match.
        scores: Per-class scores (N×C) when the suspect exposes them, else ``None``. Rows of abstentions
            are NaN.
    """

    labels: np.ndarray
    scores: np.ndarray | None = None

    @property
    def abstained(self) -> np.ndarray:
        return self.labels < 0


@runtime_checkable
class Suspect(Protocol):
    """Anything that can be asked for predictions.

    Attributes:
        description: A short human-readable identifier (a file path, a URL) for reports.
        num_classes: The number of classes it answers over, when known (``None`` otherwise).
        input_shape: The shape of one input, when known.
    """

    @property
    def description(self) -> str: ...

    @property
    def num_classes(self) -> int | None: ...

    @property
    def input_shape(self) -> tuple[int, ...] | None: ...

    def query(self, inputs: np.ndarray) -> Answers:
        """Answer a batch of float32 inputs shaped N×input_shape."""
        ...


def refuse_marked(served: object) -> None:
    """Refuse an API mark (an object whose ``answers_carry_a_mark`` is true) where the unmarked served model belongs.

    The tie-break tests choose inputs, pairs and reference surrogates by the served model's answers; the null is
    exact because those never depend on the key. The marked API's answers do, so passed there it would make the
    null depend on the key too.

    Raises:
        UsageError: If ``served`` is a marked API.
    """
    if getattr(served, "answers_carry_a_mark", False):
        raise UsageError("The served model given is the marked API, whose answers depend on the key (the test's "
                         "null would too); pass the unmarked served model, e.g. LocalSuspect(model).")
