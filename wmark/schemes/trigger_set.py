"""Trigger-set watermark: key-derived inputs with key-derived, uniformly random labels.

Why the null is exact: each trigger's label is drawn uniformly from the C classes by the key's PRF,
independently of the trigger image and of everything a model that never saw the key was trained on.
Whatever such a model answers on a trigger, it equals the secret label with probability exactly 1/C,
and the labels are independent across triggers, so its number of matches over n triggers is
Binomial(n, 1/C) — no calibration, no assumption about the model. (A scheme that relabels every trigger
to one target class has no such null: a model's bias towards that class inflates matches.)

The triggers are structured noise: a coarse binary block pattern (a random 7×7 grid for 28×28 inputs)
at high contrast plus fine noise (pattern ``blocks``, the default), so they look like nothing in natural
data, differ from each other in about half of their blocks, and are memorised quickly. The older
``lowfreq-noise`` pattern (a smooth random field) is kept for keys that name it; in a side-by-side check
(Fashion-MNIST CNN, 8 triggers per batch, 2 epochs on 30k images, then an attacker's 5-epoch lr 1e-3
fine-tune on 10k images) both were fully memorised and ``blocks`` kept 49 % of the triggers vs 43 %.

Text keys (:mod:`wmark.text`) get ``words`` triggers: sequences of whole vocabulary words drawn by the key,
with labels drawn exactly as above, so the null is the same Binomial(n, 1/C). Their ``inputs`` are token ids
padded to the key's maximum length (with ``attention_mask``), and a verifier asks the ``texts``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from wmark.contract import INPUT_NAMES
from wmark.errors import UsageError
from wmark.keys import Key

SCHEME = "trigger"
MIXING_PER_BATCH = 8


@dataclass(frozen=True)
class TriggerSet:
    """The trigger inputs, their secret labels and the order in which a verifier queries them.

    Attributes:
        inputs: Images (float, N×C×H×W) or, for text keys, token ids padded to the key's maximum length.
        labels: The secret labels.
        order: The key-derived query order.
        num_classes: The key's number of classes.
        texts: The trigger texts (text keys only); what a verifier asks.
        attention_mask: 1 on real tokens, 0 on padding (text keys only).
        pad_token_id: The tokenizer's padding id (text keys only).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    order: np.ndarray
    num_classes: int
    texts: tuple[str, ...] | None = None
    attention_mask: torch.Tensor | None = None
    pad_token_id: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_text(self) -> bool:
        return self.texts is not None

    def queries(self, idx: Any) -> np.ndarray:
        """What a verifier sends for the triggers ``idx``: float32 images, or an array of strings for text."""
        if self.texts is not None:
            return np.asarray([self.texts[int(i)] for i in np.atleast_1d(idx)], dtype=object)
        return self.inputs[idx].numpy()

    def tokens(self, idx: Any) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of text triggers ``idx``, trimmed to their longest."""
        if self.attention_mask is None:
            raise UsageError("These are image triggers; they have no tokens.")
        mask = self.attention_mask[idx]
        width = int(mask.sum(1).max().item()) if len(mask) else 1
        return {"input_ids": self.inputs[idx][:, :width], "attention_mask": mask[:, :width]}


def trigger_params(key: Key) -> dict[str, Any]:
    """The key's trigger-set parameters; raises if the key predates the scheme."""
    params = key.schemes.get(SCHEME)
    if not params:
        raise UsageError("This key has no trigger-set parameters; make a new key with `wmark keygen`.")
    return params


def generate_triggers(key: Key, *, tokenizer: Any = None) -> TriggerSet:
    """Regenerate the key's trigger set (deterministic, identical on every machine and rank).

    Args:
        tokenizer: For a text key, its tokenizer when already loaded (checked against the key); by default the
            one the key names is loaded.
    """
    params = trigger_params(key)
    n = int(params["n"])
    if key.kind == "text":
        return _text_triggers(key, params, tokenizer)
    shape = tuple(key.input_shape)
    # A 7×7 grid for 28×28 inputs; small inputs keep at least 4×4 blocks so 2^16 patterns stay distinct.
    coarse_shape = tuple(max(min(s, 4), s // 4) for s in shape[-2:]) if len(shape) >= 2 else None
    fine = torch.from_numpy(key.uniform("trigger/fine", (n, *shape)).astype(np.float32))
    pattern = params.get("pattern", "blocks")
    if coarse_shape is not None and len(shape) == 3:
        coarse = torch.from_numpy(key.uniform("trigger/coarse", (n, shape[0], *coarse_shape)).astype(np.float32))
        if pattern == "blocks":
            blocks = F.interpolate((coarse < 0.5).float(), size=shape[-2:], mode="nearest")
            inputs = (0.8 * blocks + 0.2 * fine).clamp(0.0, 1.0)
        else:
            smooth = F.interpolate(coarse, size=shape[-2:], mode="bilinear", align_corners=False)
            inputs = (0.65 * smooth + 0.35 * fine).clamp(0.0, 1.0)
    else:
        inputs = fine
    labels = torch.from_numpy(key.labels("trigger/labels", n))
    order = key.permutation("trigger/order", n)
    return TriggerSet(inputs=inputs.contiguous(), labels=labels, order=order, num_classes=key.num_classes)


def _text_triggers(key: Key, params: dict[str, Any], tokenizer: Any) -> TriggerSet:
    from wmark.text import DEFAULT_TRIGGER_WORDS, TextInputs, trigger_texts

    text = TextInputs.from_key(key, tokenizer=tokenizer)
    assert text is not None  # a text key always has text inputs
    n = int(params["n"])
    words = min(int(params.get("words", DEFAULT_TRIGGER_WORDS)), text.max_length - 2)
    texts = trigger_texts(key=key, tokenizer=text.tokenizer, n=n, words=words)
    enc = text.encode(texts, pad_to_max=True)
    return TriggerSet(inputs=enc["input_ids"], labels=torch.from_numpy(key.labels("trigger/labels", n)),
                      order=key.permutation("trigger/order", n), num_classes=key.num_classes, texts=tuple(texts),
                      attention_mask=enc["attention_mask"], pad_token_id=text.pad_token_id)


def _pad_cat(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    """Concatenate two N×L token tensors of different widths, right-padding the narrower with ``value``."""
    width = max(a.shape[1], b.shape[1])
    a = F.pad(a, (0, width - a.shape[1]), value=value)
    b = F.pad(b.to(a.device, a.dtype), (0, width - b.shape[1]), value=value)
    return torch.cat([a, b])


def check_kinds(x: torch.Tensor, triggers: TriggerSet) -> None:
    """Refuse natural inputs of another kind than the triggers: floats for a text key, token ids for an image key.

    Mixing and the trigger pass of :meth:`wmark.embed.Watermarker.attach` call it on the natural batches, because the
    triggers reach the same model and would fail inside it with an error that names neither the key nor the fix.

    Raises:
        UsageError: If ``x`` is a float tensor and the triggers are text, or an integer tensor and they are images.
    """
    if triggers.is_text and x.is_floating_point():
        raise UsageError("The key is a text key but the batches hold float inputs; use a key made for this model's "
                         "inputs.")
    if not triggers.is_text and not x.is_floating_point():
        raise UsageError("The batches hold integer inputs (token ids?) but the key's triggers are images; make a "
                         "text key with the model's tokenizer.")


def check_inputs(inputs: Any, triggers: TriggerSet, *, batch_key: str, require_key: bool = True) -> None:
    """Refuse a natural batch's inputs that the triggers' own pass cannot follow, before that pass runs.

    The trigger pass of :meth:`wmark.embed.Watermarker.attach` and those of the trainer integrations
    (:mod:`wmark.integrations`) call it on the user's batches: the triggers reach the same model, and would fail
    inside it with an error that names neither the key nor the fix.

    Args:
        inputs: The batch's inputs without its labels: a tensor, or a dict of named tensors.
        batch_key: The inputs' key in a dict batch (the Watermarker's ``input_key``).
        require_key: Whether a dict batch must hold ``batch_key``: mixing puts the triggers there, but a trainer
            integration's pass builds its own trigger batches, so there a dict without it is only checked for kind.

    Raises:
        UsageError: If the inputs are not of the triggers' kind (:func:`check_kinds`; in a dict without ``batch_key``,
            a main input under another name, such as ``pixel_values`` for a text key), or a dict lacks a required
            ``batch_key``.
    """
    if isinstance(inputs, Mapping):
        if batch_key not in inputs:
            _check_other_inputs(inputs, triggers, lone=not require_key)
            if not require_key:
                return
            raise UsageError(f"The dict batch has no {batch_key!r} (it holds "
                             f"{', '.join(map(repr, inputs)) or 'nothing'}); name the inputs' key when attaching "
                             "(input_key=).")
        inputs = inputs[batch_key]
    if isinstance(inputs, torch.Tensor):
        check_kinds(inputs, triggers)


def _check_other_inputs(batch: Mapping[str, Any], triggers: TriggerSet, *, lone: bool = False) -> None:
    """In a dict batch without the inputs' key, refuse a main input of the other kind under its own name.

    A text key's batch holding ``pixel_values`` asks for another key, not for ``input_key=``: say that first.
    (``inputs_embeds`` are floats for a text model, so they tell nothing.) With ``lone``, a batch with no main
    input but a single tensor (``{"image": ...}``) has that tensor checked: it can only be the inputs.
    """
    main = [v for name, v in batch.items()
            if name in INPUT_NAMES and name != "inputs_embeds" and isinstance(v, torch.Tensor)]
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    for value in main or (tensors if lone and len(tensors) == 1 else []):
        check_kinds(value, triggers)


class LoaderProxy:
    """A data loader wrapper that keeps the wrapped loader's length and attributes (``self.loader``).

    Once ``released`` (:meth:`wmark.embed.Watermarker.detach`) it passes the loader's batches through untouched.
    """

    loader: Iterable
    released = False

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Training frameworks inspect loader attributes (sampler, dataset, batch_size); pass them through.
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class TriggerMixingLoader(LoaderProxy):
    """Wraps a data loader so every batch carries ``per_batch`` trigger samples as well.

    Batches may be ``(x, y)`` tuples/lists or dicts (``input_key`` / ``label_key``, as Hugging Face uses;
    ``input_key`` defaults to ``input_ids`` for text triggers, ``pixel_values`` for images). Text triggers join
    a batch of token ids with the batch and the triggers right-padded to a common width (attention masks and
    token type ids alike); float triggers never meet integer inputs.
    Triggers are cycled in a fixed key-derived order, so every DDP rank mixes in the same samples.
    """

    def __init__(self, loader: Iterable, triggers: TriggerSet, *, per_batch: int = 4,
                 input_key: str | None = None, label_key: str = "labels") -> None:
        if per_batch < 1:
            raise UsageError(f"per_batch must be at least 1, got {per_batch}.")
        self.loader = loader
        self.triggers = triggers
        self.per_batch = per_batch
        self.input_key = input_key or ("input_ids" if triggers.is_text else "pixel_values")
        self.label_key = label_key
        self._cursor = 0

    def _next_triggers(self) -> list[int]:
        n = len(self.triggers)
        idx = [(self._cursor + i) % n for i in range(self.per_batch)]
        self._cursor = (self._cursor + self.per_batch) % n
        return idx

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield batch if self.released else self._mix(batch, self._next_triggers())

    def _mix(self, batch: Any, idx: list[int]) -> Any:
        tx, ty = self.triggers.inputs[idx], self.triggers.labels[idx]
        if isinstance(batch, Mapping):
            return self._mix_dict(batch, idx)
        if isinstance(batch, (tuple, list)) and len(batch) > 2:
            # extra per-sample elements (weights, indices) cannot be extended to the triggers, and dropping them
            # would break the loop's unpacking
            raise UsageError(f"Batches of {len(batch)} elements cannot be mixed with triggers, only (inputs, labels) "
                             "pairs; embed with lookahead (the default) instead of trigger mixing.")
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch[0], batch[1]
            check_kinds(x, self.triggers)
            if self.triggers.is_text and x.ndim == 2:
                ids = self.triggers.tokens(idx)["input_ids"]
                mixed = (_pad_cat(x, ids, self.triggers.pad_token_id), torch.cat([y, ty.to(y.device, y.dtype)]))
                return type(batch)(mixed) if isinstance(batch, list) else mixed
            _check_shape(x, self.triggers)
            mixed = (torch.cat([x, tx.to(x.device, x.dtype)]), torch.cat([y, ty.to(y.device, y.dtype)]))
            return type(batch)(mixed) if isinstance(batch, list) else mixed
        raise UsageError("Batches must be (inputs, labels) pairs or dicts; wrap the dataset instead.")

    def _mix_dict(self, batch: Mapping[str, Any], idx: list[int]) -> dict[str, Any]:
        triggers = self.triggers
        input_key = self.input_key
        missing = [k for k in (input_key, self.label_key) if k not in batch]
        if missing:
            if input_key in missing:
                _check_other_inputs(batch, triggers)
            raise UsageError(f"The dict batch has no {' or '.join(map(repr, missing))} (it holds "
                             f"{', '.join(map(repr, batch))}); name the input and label keys when attaching.")
        x, y = batch[input_key], batch[self.label_key]
        check_kinds(x, triggers)
        handled = {input_key, self.label_key, "attention_mask", "token_type_ids"}
        extra = [k for k, v in batch.items() if k not in handled and isinstance(v, torch.Tensor) and v.ndim >= 1
                 and len(v) == len(y)]
        if extra:
            # a loss reading them would pair the triggers' rows with nothing, or with other samples' values
            raise UsageError(f"The dict batch holds per-sample {', '.join(map(repr, extra))}, which trigger mixing "
                             "cannot extend to the triggers; drop them from the batch or embed with lookahead (the "
                             "default).")
        out = dict(batch)
        out[self.label_key] = torch.cat([y, triggers.labels[idx].to(y.device, y.dtype)])
        if not triggers.is_text:
            _check_shape(x, triggers)
            out[input_key] = torch.cat([x, triggers.inputs[idx].to(x.device, x.dtype)])
            return out
        tokens = triggers.tokens(idx)
        out[input_key] = _pad_cat(x, tokens["input_ids"], triggers.pad_token_id)
        mask = batch.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = _pad_cat(mask, tokens["attention_mask"], 0)
        types = batch.get("token_type_ids")
        if types is not None:
            out["token_type_ids"] = _pad_cat(types, torch.zeros_like(tokens["input_ids"]), 0)
        return out


def _check_shape(x: torch.Tensor, triggers: TriggerSet) -> None:
    """Refuse a batch of images of another shape than the key's triggers, which cannot join it."""
    if tuple(x.shape[1:]) != tuple(triggers.inputs.shape[1:]):
        raise UsageError(f"Batches hold inputs of shape {tuple(x.shape[1:])} but the key's triggers are "
                         f"{tuple(triggers.inputs.shape[1:])}; make a key whose input shape matches the model's.")


class TriggerMixingDataset(Dataset):
    """A dataset with the trigger samples appended ``repeats`` times, for frameworks that own the loader.

    Use this with the Hugging Face Trainer or a Lightning DataModule: the sampler then shuffles triggers
    in with the ordinary samples (and DDP's DistributedSampler shards them like everything else).
    """

    def __init__(self, dataset: Dataset, triggers: TriggerSet, *, repeats: int = 10, input_key: str | None = None,
                 label_key: str = "labels") -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            # 0 appended no trigger at all, silently; a negative count failed later in len()
            raise UsageError(f"repeats must be an integer of at least 1, got {repeats!r}.")
        self.dataset = dataset
        self.triggers = triggers
        self.repeats = repeats
        self._base = len(dataset)  # type: ignore[arg-type]
        self.label_key = label_key
        # Items come out in the dataset's own format (HF datasets: dicts), so the framework's collator
        # handles trigger items like every other.
        self._example = dataset[0] if self._base else None
        default_key = "input_ids" if triggers.is_text else "pixel_values"
        self.input_key = input_key or default_key
        if isinstance(self._example, Mapping):
            missing = [k for k in (self.input_key, label_key) if k not in self._example]
            if missing:
                raise UsageError(f"The dataset's items have no {' or '.join(map(repr, missing))} (they hold "
                                 f"{', '.join(map(repr, self._example))}); name the input and label keys.")
        x = self._example.get(self.input_key) if isinstance(self._example, Mapping) else (
            self._example[0] if isinstance(self._example, (tuple, list)) and self._example else None)
        if isinstance(x, torch.Tensor):
            # as the mixing loader checks its batches: otherwise the collator fails on the first mixed batch
            check_kinds(x, triggers)
            if not triggers.is_text and tuple(x.shape) != tuple(triggers.inputs.shape[1:]):
                raise UsageError(f"The dataset's items hold inputs of shape {tuple(x.shape)} but the key's triggers "
                                 f"are {tuple(triggers.inputs.shape[1:])}; make a key whose input shape matches the "
                                 "model's.")

    def __len__(self) -> int:
        return self._base + self.repeats * len(self.triggers)

    def __getitem__(self, index: int) -> Any:
        if index < self._base:
            return self.dataset[index]
        j = (index - self._base) % len(self.triggers)
        example = self._example
        if not isinstance(example, Mapping):
            return self.triggers.inputs[j], self.triggers.labels[j]
        item: dict[str, Any] = {}
        label = self.triggers.labels[j]
        item[self.label_key] = label if isinstance(example[self.label_key], torch.Tensor) else int(label)
        if not self.triggers.is_text:
            item[self.input_key] = self.triggers.inputs[j]
            return item
        tokens = self.triggers.tokens([j])
        as_list = not isinstance(example[self.input_key], torch.Tensor)
        for name, value in (("input_ids", tokens["input_ids"][0]), ("attention_mask", tokens["attention_mask"][0]),
                            ("token_type_ids", torch.zeros_like(tokens["input_ids"][0]))):
            target = self.input_key if name == "input_ids" else name
            if name == "input_ids" or name in example:
                item[target] = value.tolist() if as_list else value
        return item
