"""Text datasets: the Debian ``fortunes`` quotes as an 8-class text-classification task.

``fortunes`` reads ``/usr/share/games/fortunes/<category>`` (``apt-get install fortunes``; entries are
separated by lines holding ``%``), keeps the 8 categories with most entries, and splits the texts into three
fixed thirds by a SHA-256 of each text: ``owner``, ``attacker`` and ``test``. So an owner and a thief never
train on the same quote, and the split does not depend on the machine or the order of the files. Texts are
tokenized with the MiniLM tokenizer to ``MAX_LENGTH`` tokens (longer quotes are truncated for training; the
strings are kept as they are).

Example:
    >>> ds = load_fortunes("fortunes@owner")  # doctest: +SKIP
    >>> ds.num_classes, ds.input_shape  # doctest: +SKIP
    (8, (64,))
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from wmark.errors import UsageError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
NUM_CATEGORIES = 8
MAX_LENGTH = 64
PARTS = ("owner", "attacker", "test")


def _entries(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"Cannot read {path} ({exc}); reinstall with `apt-get install --reinstall fortunes`.") from None
    entries: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append(" ".join(" ".join(current).split()))
            current = []
        else:
            current.append(line)
    entries.append(" ".join(" ".join(current).split()))
    return [e for e in entries if e]


@functools.lru_cache(maxsize=2)
def fortunes_texts(directory: Path = FORTUNES_DIR) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """All texts of the 8 largest categories, their labels and the category names (sorted by name).

    A text that appears in more than one category is dropped (its label would be ambiguous).
    """
    if not directory.is_dir():
        raise UsageError(f"The fortunes directory {directory} does not exist; install it with "
                         "`sudo apt-get install fortunes` or pass fortunes:DIR.")
    files = [p for p in sorted(directory.iterdir()) if p.is_file() and not p.suffix]
    by_category = {p.name: _entries(p) for p in files}
    largest = sorted(sorted(by_category, key=lambda c: (-len(by_category[c]), c))[:NUM_CATEGORIES])
    if len(largest) < 2:
        raise UsageError(f"{directory} holds fewer than two fortune categories; reinstall fortunes.")
    seen: dict[str, set[int]] = {}
    for label, name in enumerate(largest):
        for text in by_category[name]:
            seen.setdefault(text, set()).add(label)
    # Ordered by a hash of the text: a fixed order that does not group a category or an alphabet range, so the
    # first N texts of a part are a fair sample of it.
    kept = sorted(((t, next(iter(labels))) for t, labels in seen.items() if len(labels) == 1),
                  key=lambda item: hashlib.sha256(b"order|" + item[0].encode()).digest())
    return tuple(t for t, _ in kept), tuple(label for _, label in kept), tuple(largest)


def part_of(text: str) -> str:
    """Which third a text belongs to, by the first 8 bytes of its SHA-256."""
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return PARTS[digest % 3]


def tokenizer_identity() -> dict[str, str]:
    """The tokenizer :func:`tokenize` uses, as a text key records one (its name and vocabulary digest)."""
    from wmark.text import MINILM, load_tokenizer, vocab_sha256

    return {"name": MINILM, "vocab_sha256": vocab_sha256(load_tokenizer(MINILM))}


def tokenize(texts: tuple[str, ...] | list[str], *, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """MiniLM token ids, truncated and right-padded (pad id 0) to ``max_length``."""
    from wmark.text import MINILM, load_tokenizer

    tok = load_tokenizer(MINILM)
    enc = tok(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return enc["input_ids"].to(torch.int64)
