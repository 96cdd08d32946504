"""What the tie-break mark's inputs are: float arrays for an image key, arrays of strings for a text key.

Every path of the scheme (the marked API, the rule, the query log, the tests) takes its inputs through
:func:`rule_inputs`, which refuses the other kind in one sentence, and asks the unmarked served model through
:func:`served_scores`. Committed texts are stored in a rule file as their UTF-8 bytes and offsets
(:func:`pack_texts`, :func:`unpack_texts`): plain tensors, no pickles, an exact round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from wmark.errors import UsageError
from wmark.suspects.base import Suspect, refuse_marked
from wmark.text import TextInputs, is_text_array


def rule_inputs(x: Any, *, text: bool, input_shape: Sequence[int]) -> np.ndarray:
    """The inputs as the scheme handles them: an object array of ``str`` (text) or float32 of ``input_shape``.

    Raises:
        UsageError: On strings for an image key, numbers for a text key, or images of another shape.
    """
    if text:
        if isinstance(x, (torch.Tensor, np.ndarray)) and not is_text_array(x):
            raise UsageError("This tie-break mark is for a text classifier; give it strings, not tensors.")
        items = [v.item() if isinstance(v, np.generic) else v for v in np.asarray(x, dtype=object).reshape(-1)]
        if not all(isinstance(v, str) for v in items):
            raise UsageError("This tie-break mark is for a text classifier; give it strings, not tensors.")
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out
    if is_text_array(x):
        raise UsageError("This tie-break mark is for an image classifier; give it float arrays, not strings.")
    arr = np.asarray(x, dtype=np.float32)
    if arr.shape[1:] != tuple(input_shape):
        raise UsageError(f"The tie-break mark takes inputs shaped {tuple(input_shape)}, got {arr.shape[1:]}.")
    return arr


def served_scores(backend: Suspect, x: np.ndarray) -> np.ndarray:
    """The unmarked served model's scores (float64, N×C) on inputs already checked by :func:`rule_inputs`.

    Raises:
        UsageError: If the served model hides its scores (the mark's pairs are chosen by them), or is a marked API
            (:func:`~wmark.suspects.base.refuse_marked`).
    """
    refuse_marked(backend)
    answers = backend.query(x)
    if answers.scores is None:
        raise UsageError("The served model must expose scores to the tie-break mark (its pairs are chosen by them); "
                         "wrap a LocalSuspect with expose_scores=True.")
    return np.array(answers.scores, dtype=np.float64)


def pack_texts(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings as one uint8 tensor of their concatenated UTF-8 bytes and int64 end offsets (one per string)."""
    encoded = [t.encode("utf-8") for t in texts]
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
    return torch.from_numpy(data), torch.from_numpy(ends)


def unpack_texts(data: torch.Tensor, ends: torch.Tensor) -> np.ndarray:
    """The strings :func:`pack_texts` stored, as an object array.

    Raises:
        UsageError: If the offsets do not fit the bytes or the bytes are not UTF-8 (a damaged file).
    """
    raw = data.numpy().astype(np.uint8).tobytes()
    stops = [int(e) for e in ends.numpy().reshape(-1)]
    if any(b < a for a, b in zip([0, *stops], stops)) or (stops and stops[-1] != len(raw)):
        raise UsageError("The stored texts' offsets do not fit their bytes; the file is damaged, rebuild it.")
    try:
        texts = [raw[a:b].decode("utf-8") for a, b in zip([0, *stops], stops)]
    except UnicodeDecodeError:
        raise UsageError("The stored texts are not UTF-8; the file is damaged, rebuild it.") from None
    out = np.empty(len(texts), dtype=object)
    out[:] = texts
    return out


def fitting_texts(texts: Sequence[str], text: TextInputs) -> list[int]:
    """The positions of the texts a text key's API can take: those within its maximum length, in order.

    A served text model refuses longer texts rather than truncating them.
    """
    # verbose=False: the tokenizer would warn about every text longer than the model's limit, which is dropped here
    ids = (text.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
           if texts else [])
    return [i for i, t in enumerate(ids) if len(t) <= text.max_length]


def owner_texts(texts: Sequence[str], text: TextInputs) -> np.ndarray:
    """The texts a text key's API can take (:func:`fitting_texts`, in order), as an object array.

    The owner's inputs for the rule are those a client could have sent.

    Raises:
        UsageError: If none fits.
    """
    kept = [texts[i] for i in fitting_texts(texts, text)]
    if not kept:
        raise UsageError(f"None of the {len(texts)} texts fits the key's maximum of {text.max_length} tokens; give "
                         "shorter texts.")
    out = np.empty(len(kept), dtype=object)
    out[:] = kept
    return out
