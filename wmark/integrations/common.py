"""What the framework integrations share: trigger batches in the model's own input format, and trigger accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from wmark.contract import Batch, forward_logits, forward_names
from wmark.errors import UsageError
from wmark.schemes.trigger_set import TriggerSet, check_inputs


def input_key_for(model: nn.Module, triggers: TriggerSet, input_key: str) -> str | None:
    """The name to pass triggers under: ``input_key`` for text or a forward that names it, else none (a tensor)."""
    return input_key if triggers.is_text or input_key in forward_names(model) else None


def check_natural_batch(batch: Any, triggers: TriggerSet, *, input_key: str, label_key: str) -> None:
    """Refuse a user's training batch that the integration's trigger pass cannot follow, as ``attach`` does.

    A trainer owns the loop, so the integration sees the batch as the user's code gets it: an ``(inputs, labels)``
    pair, a dict (its ``label_key`` is not an input, so a refusal does not list it), or the inputs alone.

    The trigger pass builds its own batches (:func:`trigger_batch`), so a dict batch that names its inputs
    otherwise (``{"image": ...}``) trains as it is; only the inputs' kind is checked.

    Raises:
        UsageError: If the inputs are not of the triggers' kind (:func:`wmark.schemes.trigger_set.check_inputs`).
    """
    if isinstance(batch, Mapping):
        inputs: Any = {k: v for k, v in batch.items() if k != label_key}
    elif isinstance(batch, (tuple, list)) and batch:
        inputs = batch[0]
    else:
        inputs = batch
    check_inputs(inputs, triggers, batch_key=input_key, require_key=False)


def natural_batch_size(batch: Any, *, label_key: str) -> int:
    """Samples in a user's training batch, against which a trigger pass weighs its triggers.

    The labels' count (a tensor or a list) of an ``(inputs, labels)`` pair or of a dict holding ``label_key``;
    otherwise the length of the batch's first tensor (its inputs alone, or a dict that names its labels otherwise).

    Raises:
        UsageError: If the batch holds neither labels nor a tensor to count.
    """
    labels: Any = None
    if isinstance(batch, Mapping):
        labels = batch.get(label_key)
        tensors = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        labels = batch[1] if len(batch) >= 2 else None
        tensors = list(batch)
    else:
        tensors = [batch]
    if isinstance(labels, (list, tuple)) or isinstance(labels, torch.Tensor) and labels.ndim >= 1:
        return len(labels)
    for value in tensors:
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return len(value)
    raise UsageError("The training batch holds neither labels nor a tensor to count its samples by; give batches as "
                     "(inputs, labels) pairs or dicts holding the labels.")


def trigger_batch(triggers: TriggerSet, idx: list[int], *, input_key: str | None = None) -> Batch:
    """Triggers ``idx`` as a model batch: an image tensor, or (text) ``input_ids`` / ``attention_mask`` by name."""
    if not triggers.is_text:
        inputs = triggers.inputs[idx]
        return inputs if input_key is None else {input_key: inputs}
    tokens = triggers.tokens(idx)
    if input_key not in (None, "input_ids"):
        tokens = {input_key: tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    return tokens


@torch.no_grad()
def trigger_accuracy(model: nn.Module, triggers: TriggerSet, *, input_key: str = "pixel_values",
                     batch_size: int = 64) -> float:
    """Share of the triggers the model answers with their secret labels (a training diagnostic, not a test)."""
    name = input_key_for(model, triggers, input_key)
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for start in range(0, len(triggers), batch_size):
            idx = list(range(start, min(len(triggers), start + batch_size)))
            logits = forward_logits(model, trigger_batch(triggers, idx, input_key=name))
            hits += int((logits.argmax(1).cpu() == triggers.labels[idx]).sum())
    finally:
        model.train(was_training)
    return hits / max(len(triggers), 1)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (Accelerate's ``AcceleratedOptimizer``, Lightning's)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__.startswith("Accelerated"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer
