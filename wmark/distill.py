"""Distillation: train a surrogate on a model's answers to some inputs (what a thief does, and what the owner
does to make the tie-break scheme's reference surrogates).

The victim is any :class:`wmark.suspects.Suspect` — a local model, a remote API, or an API behind the
owner's :class:`wmark.schemes.api_mark.MarkedAPI` — so the attack sees exactly what a client would.

Label modes (what the thief trains on):

* ``hard``: the answered top-1 label (cross-entropy);
* ``soft``: the answered probability vector (cross-entropy against it, i.e. distillation at T = 1);
* ``top1``: the top-1 label with its probability rounded to ``decimals`` places (what many APIs show);
  the target puts that mass on the label and spreads the rest evenly.

Abstentions (label −1) are dropped and counted; an API that refuses everything raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from wmark.contract import as_float_tensor, host_array
from wmark.errors import RuntimeFailure, UsageError
from wmark.models import build_model
from wmark.suspects.base import Suspect, refuse_marked
from wmark.text import TextInputs, is_text_array
from wmark.training import accuracy, make_loader, predict_logits, train_epochs

LabelMode = Literal["hard", "soft", "top1"]
LABEL_MODES = ("hard", "soft", "top1")
REFERENCE_RECIPES: tuple[tuple[str, int], ...] = (("hard", 3), ("hard", 6), ("hard", 10), ("soft", 4))
REFERENCE_QUERIES = 10_000
REFERENCE_REPEATS = 4


@dataclass
class Extraction:
    """A trained surrogate and what it cost.

    Attributes:
        model: The surrogate.
        queries: Inputs sent to the victim.
        answered: Inputs the victim answered (abstentions excluded).
        query_seconds: Time spent querying the victim.
        train_seconds: Time spent training.
        epochs: Epochs trained (fewer than asked when ``stop`` ended training early).
    """

    model: nn.Module
    queries: int
    answered: int
    query_seconds: float
    train_seconds: float
    epochs: int


def query_victim(victim: Suspect, x: np.ndarray, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """All of the victim's answers to ``x``: labels (−1 = abstention) and scores when exposed."""
    labels, scores = [], []
    for i in range(0, len(x), batch_size):
        ans = victim.query(x[i:i + batch_size])
        labels.append(np.asarray(ans.labels, dtype=np.int64).reshape(-1))
        scores.append(None if ans.scores is None else np.asarray(ans.scores, dtype=np.float32))
    lab = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
    if len(lab) != len(x):
        raise RuntimeFailure(f"The victim answered {len(lab)} labels for {len(x)} queries.")
    present = [s for s in scores if s is not None]
    sc = np.concatenate(present) if scores and len(present) == len(scores) else None
    return lab, sc


def extraction_targets(labels: np.ndarray, scores: np.ndarray | None, *, mode: LabelMode, num_classes: int,
                       decimals: int = 2) -> torch.Tensor:
    """Training targets for the surrogate: class indices (``hard``) or probability rows (``soft``/``top1``)."""
    if mode == "hard":
        return torch.as_tensor(labels, dtype=torch.int64)
    if scores is None:
        raise UsageError(f"Training on {mode} labels needs a victim that returns scores; use hard labels for a label-only API.")
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0).clip(0.0, None)
    if mode == "soft":
        probs = s / np.maximum(s.sum(axis=1, keepdims=True), 1e-12)
    elif mode == "top1":
        conf = np.round(s[np.arange(len(s)), labels], decimals).clip(1.0 / num_classes, 1.0)
        probs = np.repeat(((1.0 - conf) / (num_classes - 1))[:, None], num_classes, axis=1)
        probs[np.arange(len(s)), labels] = conf
    else:
        raise UsageError(f"Unknown label mode {mode!r}; use hard, soft or top1.")
    return torch.as_tensor(probs, dtype=torch.float32)


def extract(victim: Suspect, *, x: torch.Tensor | np.ndarray, arch: str, labels: LabelMode = "hard",
            queries: int | None = None, epochs: int = 6, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
            decimals: int = 2, progress: bool = False, stop: Callable[[nn.Module], bool] | None = None,
            text: TextInputs | None = None, device: torch.device | None = None) -> Extraction:
    """Train a surrogate of ``victim`` on its answers to (at most ``queries`` of) the thief's inputs ``x``.

    Args:
        victim: What the thief can query.
        x: The thief's unlabeled inputs (N×input shape); the first ``queries`` after a seeded shuffle are used.
        arch: Surrogate architecture (any ``--arch`` name; it may differ from the victim's).
        labels: ``hard``, ``soft`` or ``top1`` (see the module docstring).
        queries: Query budget (default: all of ``x``).
        epochs: Training epochs over the answered queries.
        lr: Adam learning rate.
        batch_size: Training batch size.
        seed: Seed of the query choice, initialisation and data order.
        decimals: Rounding of the confidence in ``top1`` mode.
        progress: Show a progress bar on stderr.
        stop: Called with the surrogate after each epoch; training ends when it returns True (a thief that
            stops once the surrogate is good enough, e.g. :func:`accuracy_reached`). ``epochs`` is then the cap.
        text: For text queries (``x`` holds strings), the thief's tokenization.
        device: Where the surrogate trains (default: CUDA when present).

    Raises:
        UsageError: On a bad mode or budget, or ``soft``/``top1`` against a label-only victim.
        RuntimeFailure: If the victim answers none of the queries.
    """
    if labels not in LABEL_MODES:
        raise UsageError(f"Unknown label mode {labels!r}; use hard, soft or top1.")
    if is_text_array(x) != (text is not None):
        raise UsageError("Text queries need the thief's tokenizer (text=), and only text queries take one.")
    if text is not None:
        strings = np.asarray(x, dtype=object).reshape(-1)
        xs = text.encode(list(strings), pad_to_max=True)["input_ids"]
    else:
        xs = as_float_tensor(x)
        if victim.input_shape is not None and tuple(xs.shape[1:]) != tuple(victim.input_shape):
            raise UsageError(f"The query data has inputs shaped {tuple(xs.shape[1:])} but the victim takes "
                             f"{tuple(victim.input_shape)}.")
    budget = len(xs) if queries is None else int(queries)
    if budget < 1:
        raise UsageError(f"The query budget must be at least 1, got {budget}.")
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed))[:budget]
    xq = xs[order]
    start = time.perf_counter()
    lab, scores = query_victim(victim, strings[order.numpy()] if text is not None else xq.numpy())
    query_seconds = time.perf_counter() - start
    ok = lab >= 0
    if not ok.any():
        raise RuntimeFailure("The victim abstained on every query; nothing to train a surrogate on.")
    num_classes = victim.num_classes or int(lab.max()) + 1
    targets = extraction_targets(lab[ok], None if scores is None else scores[ok], mode=labels,
                                 num_classes=num_classes, decimals=decimals)
    model = build_model(arch, num_classes=num_classes, input_shape=tuple(xs.shape[1:]), seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    trained = train_epochs(model, make_loader(xq[torch.as_tensor(ok)], targets, batch_size=batch_size, seed=seed),
                           epochs=epochs, optimizer=optimizer, device=device, progress=progress, desc="extract",
                           stop=stop)
    return Extraction(model=model, queries=len(xq), answered=int(ok.sum()), query_seconds=query_seconds,
                      train_seconds=time.perf_counter() - start, epochs=trained)


def check_accuracy_target(target: float) -> None:
    """Refuse an accuracy target outside [0, 1] (an accuracy is a fraction; NaN fails every comparison)."""
    if not (0 <= target <= 1):
        raise UsageError(f"The accuracy target is a fraction in [0, 1], got {target}.")


def accuracy_reached(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, target: float) -> Callable[[nn.Module], bool]:
    """A ``stop`` rule for :func:`extract`: the surrogate's accuracy on labelled ``(x, y)`` is at least ``target``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> _ = torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        >>> accuracy_reached(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 0.5)(model)
        True

    Raises:
        UsageError: If ``target`` is not in [0, 1]: a thief could never stop, and would train to its cap saying
            nothing.
    """
    check_accuracy_target(target)
    arr = host_array(x)
    # token ids stay integers; images are float32
    xs = torch.as_tensor(arr if arr.dtype.kind in "iu" else arr.astype(np.float32))
    ys = torch.as_tensor(host_array(y)).long()

    def reached(model: nn.Module) -> bool:
        return accuracy(model, xs, ys) >= target

    return reached


def train_reference_surrogates(*, served: Suspect, x: np.ndarray, archs: Sequence[str], seed: int = 0,
                               queries: int = REFERENCE_QUERIES, repeats: int = REFERENCE_REPEATS,
                               text: TextInputs | None = None,
                               device: torch.device | None = None) -> list[tuple[str, torch.nn.Module]]:
    """Distil the tie-break scheme's reference surrogates from the **unmarked** served model on the owner's inputs
    (key-independent).

    For each architecture, ``repeats`` surrogates per recipe in ``REFERENCE_RECIPES`` (hard labels for 3, 6
    and 10 epochs, soft labels for 4), each from its own seed: early- and late-stopped thieves of several
    kinds, so that the inputs they jointly leave open are open for a thief too (measurements:
    ``docs/research/tiebreak.md``).

    Args:
        served: The unmarked served model, exposing scores.
        x: The owner's inputs.
        archs: Architectures (any architecture name), e.g. the served one and an MLP.
        seed: Base seed of the queries and initialisations.
        queries: Inputs each surrogate is distilled from (at most ``len(x)``).
        repeats: Surrogates per architecture and recipe.
        text: For a text model, the key's tokenization (``x`` is then strings, ``archs`` text architectures,
            e.g. ``text-bow``).
        device: Where the surrogates train (default: CUDA when present).

    Returns:
        (architecture, model) per surrogate.

    Raises:
        UsageError: If ``repeats`` is below 1, or ``served`` is a marked API
            (:func:`~wmark.suspects.base.refuse_marked`).
    """
    if repeats < 1:
        raise UsageError(f"repeats must be at least 1, got {repeats}.")
    refuse_marked(served)
    nets = []
    for r in range(repeats):
        for i, arch in enumerate(archs):
            for j, (labels, epochs) in enumerate(REFERENCE_RECIPES):
                nets.append((arch, extract(served, x=x, arch=arch, labels=labels, queries=min(queries, len(x)),  # type: ignore[arg-type]
                                           epochs=epochs, seed=seed + 1000 * r + 101 + 10 * i + j,
                                           text=text, device=device).model.eval()))
    return nets


def reference_scores(references: Sequence[tuple[str, torch.nn.Module]], x: np.ndarray,
                     text: TextInputs | None = None) -> list[np.ndarray]:
    """Each reference surrogate's probabilities on ``x`` (float64); strings are tokenized by ``text``."""
    if not references:
        return []
    batch: Any = (text.encode(list(np.asarray(x, dtype=object).reshape(-1))) if text is not None
                  else as_float_tensor(x))
    return [torch.softmax(predict_logits(net, batch).double(), 1).numpy() for _, net in references]
