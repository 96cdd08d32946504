"""The extraction monitor on a text classifier: each query as a hashed bag of its tokens.

The signals of :mod:`wmark.monitor.signals` need one fixed-size vector per query. For a text query it is
:class:`HashedTokens`: the counts of its token ids hashed into ``buckets`` bins, scaled to unit length. This
rather than the served model's pooled penultimate features (what the tie-break mark reads), because it is

* exact: a text always tokenizes to the same ids, so a re-sent text gives the bit-identical vector, whereas
  penultimate features move with the padding of the batch a text arrives in and with the device's kernels;
* cheap and independent of the weights: the tokenizer the endpoint already runs, no second forward pass, and a
  profile that stays valid when the model is retrained;
* sensitive to what extraction does to text: a copy with one word swapped differs in two bins (a near
  duplicate), and a string of random vocabulary words lies outside the principal subspace of the owner's texts
  (out of distribution).

A repeat (left out of the near-duplicate and PRADA signals, as honest clients re-send texts) is the same text,
told by :func:`text_keys`, a digest of the text itself: the same words in another order make the same bag, and a
thief shuffling words must count as sending near duplicates, not repeats.

Its blind spot: it sees wording, not meaning, so a paraphrase is no near duplicate of its source. Unit length
keeps long texts from dominating the principal directions. The bin of a token is Knuth's multiplicative hash
of its id, fixed so that a profile keeps its meaning; the profile records the tokenizer's vocabulary digest,
since another vocabulary's ids would fill other bins. Honest streams for calibrating a text profile are JSON
Lines, one query per line in arrival order: ``{"stream": "shop-1", "text": "..."}`` (:func:`read_text_streams`).

Example:
    >>> from wmark.text import MINILM, load_tokenizer
    >>> hashed = HashedTokens(load_tokenizer(MINILM))  # doctest: +SKIP
    >>> hashed(["a text", "a text"]).shape  # doctest: +SKIP
    (2, 1024)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wmark.errors import UsageError

if TYPE_CHECKING:
    from wmark.monitor.monitor import MonitorProfile
    from wmark.text import TextInputs

TEXT_FEATURES = "hashed-tokens"
DEFAULT_BUCKETS = 1024
_KNUTH = 2654435761  # odd and near 2**32 / golden ratio: consecutive ids land far apart


@dataclass(frozen=True)
class HashedTokens:
    """Texts → unit-length hashed token counts (N×``buckets`` float32); see the module docstring for why.

    Attributes:
        tokenizer: The served model's Hugging Face tokenizer (special tokens are left out).
        buckets: Number of bins.

    Raises:
        UsageError: If ``buckets`` is not an integer of at least 2.
    """

    tokenizer: Any
    buckets: int = DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or self.buckets < 2:
            raise UsageError(f"The monitor's text features need an integer of at least 2 buckets, not {self.buckets!r}.")

    def __call__(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        items = [str(t) for t in np.asarray(texts, dtype=object).reshape(-1)]
        out = np.zeros((len(items), self.buckets), dtype=np.float32)
        if not items:
            return out
        ids = self.tokenizer(items, add_special_tokens=False, truncation=False)["input_ids"]
        rows = np.repeat(np.arange(len(ids)), [len(seq) for seq in ids])
        flat = np.fromiter((t for seq in ids for t in seq), dtype=np.int64, count=len(rows))
        np.add.at(out, (rows, (flat * _KNUTH) % 2**32 % self.buckets), 1.0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1.0)  # a text without tokens stays the zero vector

    def spec(self, tokenizer: Mapping[str, str]) -> dict[str, Any]:
        """What a profile records of these features (``tokenizer``: its ``{"name", "vocab_sha256"}``)."""
        return {"features": TEXT_FEATURES, "buckets": self.buckets,
                "tokenizer": {"name": str(tokenizer["name"]), "vocab_sha256": str(tokenizer["vocab_sha256"])}}


def text_keys(texts: Sequence[str] | np.ndarray) -> list[bytes]:
    """Each text's SHA-256 digest of its UTF-8: equal for the same text only, which is what a repeat is.

    Lone surrogates (JSON may spell them) are encoded as they stand, so every string has its key.
    """
    return [hashlib.sha256(str(t).encode("utf-8", "surrogatepass")).digest()
            for t in np.asarray(texts, dtype=object).reshape(-1)]


def check_text_spec(spec: Any, *, size: int, path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A profile's recorded text features, checked (``None`` for an image profile).

    Raises:
        UsageError: If the record is not :meth:`HashedTokens.spec` of a feature map of ``size`` inputs.
    """
    if spec is None:
        return None
    tok = spec.get("tokenizer") if isinstance(spec, dict) else None
    buckets = spec.get("buckets") if isinstance(spec, dict) else None
    if (not isinstance(spec, dict) or spec.get("features") != TEXT_FEATURES or not isinstance(tok, dict)
            or not all(isinstance(tok.get(k), str) for k in ("name", "vocab_sha256"))
            or isinstance(buckets, bool) or buckets != size):
        raise UsageError(f"Monitor profile {path} records text features wmark does not read; calibrate it again "
                         "with `wmark monitor calibrate`.")
    return spec


def monitor_featurizer(profile: MonitorProfile, text: TextInputs | None) -> HashedTokens | None:
    """How a served model's queries become the profile's feature vectors (``None``: images, as they are).

    Raises:
        UsageError: If the profile was fitted on the other modality, or on another tokenizer's vocabulary.
    """
    from wmark.text import vocab_sha256

    spec = profile.text
    if text is None:
        if spec is not None:
            raise UsageError("The monitor profile was calibrated on texts but the served model takes images; "
                             "calibrate one on this model's inputs.")
        return None
    if spec is None:
        raise UsageError("The monitor profile was calibrated on images but the served model is a text classifier; "
                         "calibrate one on its owner's texts (`wmark monitor calibrate --data fortunes@owner "
                         "--streams honest.jsonl`).")
    if vocab_sha256(text.tokenizer) != spec["tokenizer"]["vocab_sha256"]:
        raise UsageError(f"The monitor profile was calibrated with the tokenizer {spec['tokenizer']['name']}, not the "
                         "served model's; calibrate it on this model.")
    return HashedTokens(text.tokenizer, int(spec["buckets"]))


def read_text_streams(path: str | os.PathLike[str]) -> list[list[str]]:
    """Honest text streams from JSON Lines, ``{"stream": id, "text": "..."}`` per query in arrival order.

    Returns:
        One list of texts per stream id, in the order the ids first appear.

    Raises:
        UsageError: If the file is missing, not UTF-8, or a line is not such a record.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"Stream file {p} does not exist; give JSON Lines of {{\"stream\": id, \"text\": \"...\"}}.")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise UsageError(f"Cannot read {p} as UTF-8 text; give JSON Lines of {{\"stream\": id, \"text\": \"...\"}}.") \
            from None
    streams: dict[str, list[str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            rec = None
        stream = rec.get("stream") if isinstance(rec, dict) else None
        text = rec.get("text") if isinstance(rec, dict) else None
        if isinstance(stream, bool) or not isinstance(stream, str | int) or not isinstance(text, str):
            raise UsageError(f"Line {number} of {p} is not {{\"stream\": id, \"text\": \"...\"}} (an id string or "
                             "integer, and the query's text); fix it.")
        streams.setdefault(str(stream), []).append(text)
    return list(streams.values())
