"""Owner keys: a 256-bit secret, the public parameters it is bound to, and a public commitment.

Every random choice a watermark makes (trigger inputs, their labels, the query order, projection
matrices) is derived from the secret with HMAC-SHA256 under a purpose string and then expanded with
SHAKE-256. The derivation uses only the standard library, so the same key regenerates the same watermark
on any machine and any numpy/torch version, and nobody can choose triggers after seeing a model.

Example:
    >>> key = generate_key(owner="ACME Corp", num_classes=10, input_shape=(1, 28, 28))
    >>> len(key.commitment())
    64
    >>> key.labels("trigger/labels", 5).tolist() == key.labels("trigger/labels", 5).tolist()
    True
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wmark.errors import UsageError
from wmark.io import atomic_write, check_output

KEY_FORMAT = "wmark-key/1"
DEFAULT_TRIGGERS = 100


@dataclass(frozen=True)
class Key:
    """A watermarking key.

    Attributes:
        owner: Who claims the model, as it will appear in reports.
        secret: 32 random bytes. Never logged, never written into models or reports.
        num_classes: Number of output classes of the models this key marks.
        input_shape: Shape of one model input, without the batch dimension.
        schemes: Public per-scheme parameters, fixed at key generation so the commitment covers them.
        created: ISO-8601 UTC timestamp of key generation.
        modality: What one input is, when not an image tensor shaped ``input_shape``: for text keys
            ``{"kind": "text", "tokenizer": {"name", "vocab_sha256"}, "max_length"}`` (then ``input_shape`` is
            ``(max_length,)``, token ids). ``None`` for image keys, whose public parameters (and so their
            commitments) stay exactly those of keys written before modalities existed.
    """

    owner: str
    secret: bytes = field(repr=False)
    num_classes: int
    input_shape: tuple[int, ...]
    schemes: dict[str, dict[str, Any]]
    created: str
    modality: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """The input modality: ``image`` (tensors shaped ``input_shape``) or ``text``."""
        return "image" if self.modality is None else str(self.modality["kind"])

    def public_params(self) -> dict[str, Any]:
        """Everything about the key except the secret."""
        params = {
            "format": KEY_FORMAT,
            "owner": self.owner,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "schemes": self.schemes,
            "created": self.created,
        }
        if self.modality is not None:
            params["modality"] = self.modality
        return params

    def secret_hash(self) -> str:
        """Domain-separated SHA-256 of the secret (safe to publish: the secret has 256 bits of entropy)."""
        return hashlib.sha256(b"wmark/secret-hash\x00" + self.secret).hexdigest()

    def commitment(self) -> str:
        """Hex SHA-256 over the canonical public parameters and the secret's hash.

        Publish or timestamp this before releasing a model; revealing the key later lets anyone
        recompute it.
        """
        doc = {"public": self.public_params(), "secret_sha256": self.secret_hash()}
        return hashlib.sha256(_canonical(doc)).hexdigest()

    def fingerprint(self) -> str:
        """Short identifier (first 16 hex digits of the commitment) for logs and file metadata."""
        return self.commitment()[:16]

    def derive(self, purpose: str, nbytes: int) -> bytes:
        """Pseudo-random bytes for one purpose: SHAKE-256 over HMAC-SHA256(secret, purpose)."""
        seed = hmac.new(self.secret, purpose.encode(), hashlib.sha256).digest()
        return hashlib.shake_256(seed).digest(nbytes)

    def uniform(self, purpose: str, shape: tuple[int, ...] | int) -> np.ndarray:
        """Floats uniform on [0, 1) with 32 bits of resolution, derived from the key."""
        count = int(np.prod(shape))
        raw = np.frombuffer(self.derive(purpose, 4 * count), dtype="<u4").astype(np.float64)
        return (raw / 2.0**32).reshape(shape)

    def normal(self, purpose: str, shape: tuple[int, ...] | int) -> np.ndarray:
        """Standard normal floats (Box-Muller over :meth:`uniform`), derived from the key."""
        count = int(np.prod(shape))
        half = (count + 1) // 2
        u = self.uniform(purpose, 2 * half).reshape(2, half)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))
        z = np.concatenate([radius * np.cos(2 * math.pi * u[1]), radius * np.sin(2 * math.pi * u[1])])
        return z[:count].reshape(shape)

    def labels(self, purpose: str, count: int, num_classes: int | None = None) -> np.ndarray:
        """Labels exactly uniform on ``range(num_classes)`` by rejection sampling 32-bit words."""
        c = self.num_classes if num_classes is None else num_classes
        if not 2 <= c <= 2**32:
            raise ValueError(f"Labels are drawn over 2 to 2**32 classes, got {c}; give the models' number of classes.")
        limit = (2**32 // c) * c
        out: list[int] = []
        block = 0
        while len(out) < count:
            words = np.frombuffer(self.derive(f"{purpose}#{block}", 4 * 2 * count), dtype="<u4")
            out.extend(int(w) % c for w in words if w < limit)
            block += 1
        return np.asarray(out[:count], dtype=np.int64)

    def permutation(self, purpose: str, n: int) -> np.ndarray:
        """A uniformly random permutation of ``range(n)`` (sorting key-derived 64-bit words)."""
        words = np.frombuffer(self.derive(purpose, 8 * n), dtype="<u8")
        return np.argsort(words, kind="stable")

    def seed(self, purpose: str) -> int:
        """A 63-bit integer seed for libraries that need one (e.g. ``torch.Generator``)."""
        return int.from_bytes(self.derive(purpose, 8), "little") >> 1


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def default_schemes(num_triggers: int = DEFAULT_TRIGGERS, *, kind: str = "image") -> dict[str, dict[str, Any]]:
    """Public parameters of every scheme a new key supports (text keys get ``words`` triggers)."""
    trigger: dict[str, Any] = {"version": 1, "pattern": "blocks", "n": int(num_triggers)}
    if kind == "text":
        trigger = {"version": 1, "pattern": "words", "n": int(num_triggers), "words": 12}
    return {
        "trigger": trigger,
        "weights": {"version": 1, "bits": 256, "margin": 1.5, "strength": 1.0, "message": None},
    }


MAX_INPUT_DIMS = 4
"""Most dimensions of one input (channels, height, width, and one more for volumes or time)."""


def generate_key(
    *,
    owner: str,
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_triggers: int = DEFAULT_TRIGGERS,
    schemes: dict[str, dict[str, Any]] | None = None,
    modality: dict[str, Any] | None = None,
) -> Key:
    """Make a new key with a fresh 256-bit secret from the operating system.

    Args:
        owner: Who claims the model.
        num_classes: Classes of the models to mark (at least 2).
        input_shape: Shape of one input, without the batch dimension.
        num_triggers: Size of the trigger set.
        schemes: Override the public scheme parameters (defaults: :func:`default_schemes`).
        modality: A text modality from :func:`wmark.text.text_modality` (``input_shape`` is then
            ``(max_length,)``); ``None`` for image inputs shaped ``input_shape``.

    Raises:
        UsageError: On an empty owner, fewer than two classes, a bad shape or a malformed modality.
    """
    if not owner.strip():
        raise UsageError("The owner name is empty; give one, e.g. \"Your Organisation\".")
    if num_classes < 2:
        raise UsageError(f"A key needs at least 2 classes, got {num_classes}.")
    if not 1 <= len(input_shape) <= MAX_INPUT_DIMS or any(int(d) <= 0 for d in input_shape):
        raise UsageError(f"Input shape {','.join(str(d) for d in input_shape) or 'empty'} must be 1 to "
                         f"{MAX_INPUT_DIMS} positive sizes, e.g. 1,28,28.")
    if num_triggers < 1:
        raise UsageError(f"A key needs at least one trigger, got {num_triggers}.")
    if modality is not None:
        _check_modality(modality)
        input_shape = (int(modality["max_length"]),)
    return Key(
        owner=owner.strip(),
        secret=secrets.token_bytes(32),
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in input_shape),
        schemes=schemes if schemes is not None else default_schemes(
            num_triggers, kind="image" if modality is None else "text"),
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        modality=None if modality is None else json.loads(_canonical(modality)),
    )


def _check_modality(modality: Any) -> None:
    ok = (isinstance(modality, dict) and modality.get("kind") == "text"
          and isinstance(modality.get("max_length"), int) and modality["max_length"] >= 4
          and isinstance(modality.get("tokenizer"), dict)
          and isinstance(modality["tokenizer"].get("name"), str)
          and isinstance(modality["tokenizer"].get("vocab_sha256"), str))
    if not ok:
        raise UsageError("The key's modality must be a text description made by wmark.text.text_modality "
                         "(a tokenizer name and vocabulary digest, and a maximum length of at least 4).")


def save_key(key: Key, path: str | os.PathLike[str]) -> None:
    """Write a key as JSON readable only by its owner (mode 0600), atomically."""
    doc = dict(key.public_params(), secret=key.secret.hex(), commitment=key.commitment())
    with atomic_write(path, mode=0o600) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def check_outputs_spare_keys(*paths: str | os.PathLike[str]) -> None:
    """Check, before any work, that each output path can be written and does not hold a wmark key.

    A key's secret has no other copy, so no output may replace a key file. Commands (through
    :func:`wmark.cli_common.check_outputs`) and library functions that write next to their input (such as
    :func:`wmark.signing.sign_file`) call it before they start.

    Raises:
        UsageError: If a path holds a wmark key (a small JSON document of the key format), or
            :func:`wmark.io.check_output` refuses it.
    """
    for path in paths:
        _refuse_key_file(path)
        check_output(path)


def _refuse_key_file(path: str | os.PathLike[str]) -> None:
    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size > 1 << 20:
            return
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return  # not readable as a key: check_output says what else is wrong with the path
    if isinstance(doc, dict) and doc.get("format") == KEY_FORMAT:
        raise UsageError(f"{path} is a wmark key file; writing there would destroy its secret, so choose another "
                         "path.")


_KEY_FIELDS = frozenset({"format", "owner", "num_classes", "input_shape", "schemes", "created", "modality", "secret",
                         "commitment"})


def _field_types(doc: dict[str, Any]) -> dict[str, bool]:
    """Whether each field of a key document has the JSON type (and range) :func:`save_key` writes it with."""
    shape = doc.get("input_shape")
    return {
        "owner": isinstance(doc.get("owner"), str) and bool(doc["owner"].strip()),
        "secret": isinstance(doc.get("secret"), str),
        "input_shape": isinstance(shape, list) and 1 <= len(shape) <= MAX_INPUT_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape),
        "schemes": isinstance(doc.get("schemes"), dict),
        "created": isinstance(doc.get("created"), str),
        "commitment": isinstance(doc.get("commitment"), str),
    }


def load_key(path: str | os.PathLike[str]) -> Key:
    """Read a key written by :func:`save_key`.

    Raises:
        UsageError: If the file is missing, not a wmark key, truncated or tampered with (its stored
            commitment no longer matches its content).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UsageError(f"Key file {p} does not exist; make one with `wmark keygen --owner NAME --out {p}`.") from None
    except IsADirectoryError:
        raise UsageError(f"Key file {p} is a directory; give the key file itself.") from None
    except PermissionError:
        raise UsageError(f"Cannot read key file {p}: permission denied; run as its owner or fix the permissions "
                         "of the file and its directories.") from None
    except UnicodeDecodeError:
        raise UsageError(f"Key file {p} is not valid JSON (truncated or corrupt?).") from None
    except OSError as exc:
        raise UsageError(f"Cannot read key file {p} ({exc.strerror or type(exc).__name__}); check the file.") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"Key file {p} is not valid JSON (truncated or corrupt?).") from None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
        raise UsageError(f"{p} is not a wmark key file (expected format {KEY_FORMAT!r}).")
    classes = doc.get("num_classes")
    if "num_classes" in doc and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 2):
        raise UsageError(f"Key file {p} gives num_classes {json.dumps(classes)[:40]}; a key is for a whole number of "
                         "at least 2 classes.")
    unknown = sorted(set(doc) - _KEY_FIELDS)
    if unknown:
        raise UsageError(f"Key file {p} has fields a wmark key does not have ({', '.join(unknown)[:80]}): it was "
                         "edited; remove them.")
    malformed = [name for name, ok in _field_types(doc).items() if name in doc and not ok]
    if malformed:
        raise UsageError(f"Key file {p} has malformed values in {', '.join(malformed)}: it was edited or corrupted.")
    try:
        secret = bytes.fromhex(doc["secret"])
        key = Key(
            owner=doc["owner"],
            secret=secret,
            num_classes=doc["num_classes"],
            input_shape=tuple(doc["input_shape"]),
            schemes=doc["schemes"],
            created=doc["created"],
            modality=doc.get("modality"),
        )
        if key.modality is not None:
            _check_modality(key.modality)
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"Key file {p} is missing fields or has malformed values.") from None
    if len(secret) != 32:
        raise UsageError(f"Key file {p} holds a {len(secret)}-byte secret; wmark keys hold 32 bytes.")
    if doc.get("commitment") != key.commitment():
        raise UsageError(f"Key file {p} does not match its own commitment: it was edited or corrupted.")
    _check_private(p)
    return key


ALLOW_OPEN_KEY_ENV = "WMARK_ALLOW_OPEN_KEY"
"""Set to ``1`` to read a key file other users can access (read-only media that cannot be chmod-ed)."""


def _check_private(path: Path) -> None:
    """Refuse a key file that group or others may access, as OpenSSH refuses such private keys: the secret
    is what makes a verdict the owner's, and a readable copy lets anyone forge or dodge the marks."""
    if os.name != "posix" or os.environ.get(ALLOW_OPEN_KEY_ENV) == "1":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UsageError(f"Key file {path} is accessible by other users (mode {mode:04o}); restrict it with "
                         f"`chmod 600 {path}` (or set {ALLOW_OPEN_KEY_ENV}=1 for read-only media).")
