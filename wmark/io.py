"""Files: atomic writes, and model files as safetensors with ``wmark.*`` metadata.

No pickles anywhere: tensors go through safetensors, keys and reports through JSON.

Example:
    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_tensors({"w": torch.ones(2)}, path, metadata={"wmark.scheme": "trigger"})
    >>> load_tensors(path)[1]["wmark.scheme"]
    'trigger'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from wmark.errors import UsageError

METADATA_PREFIX = "wmark."


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it into place only if the block succeeds.

    A crash or an exception leaves no partial file behind, and readers never see a half-written one.
    """
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise UsageError(f"Directory {target.parent} does not exist; create it first.")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.close(fd)
    os.chmod(tmp, mode)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """Make a safetensors metadata map: keys get the ``wmark.`` prefix, non-strings become JSON."""
    out: dict[str, str] = {"format": "pt"}
    for name, value in values.items():
        full = name if name.startswith(METADATA_PREFIX) else METADATA_PREFIX + name
        out[full] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> None:
    """Save tensors (made contiguous, on CPU) with ``wmark.*`` metadata, atomically."""
    clean = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(clean, tmp, metadata=encode_metadata(metadata or {}))


def save_model(model: torch.nn.Module, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None) -> None:
    """Save a module's state dict (parameters and buffers) as safetensors."""
    save_tensors(model.state_dict(), path, metadata=metadata)


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; return its tensors and its metadata (``{}`` when there is none).

    Raises:
        UsageError: If the file is missing or is not a readable safetensors file.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"Model file {p} does not exist.")
    try:
        tensors = load_file(str(p))
        with safe_open(str(p), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{p} is not a readable safetensors file ({_short(exc)}); re-export it with safetensors.") from None
    return tensors, dict(metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Only the metadata of a safetensors file, without loading its tensors."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"Model file {p} does not exist.")
    try:
        with safe_open(str(p), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{p} is not a readable safetensors file ({_short(exc)}).") from None


def wmark_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The ``wmark.*`` entries of a metadata map, prefix removed and JSON values decoded."""
    out: dict[str, Any] = {}
    for name, value in metadata.items():
        if name.startswith(METADATA_PREFIX):
            try:
                out[name[len(METADATA_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[name[len(METADATA_PREFIX):]] = value
    return out


def tensors_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 of a canonical form (sorted names, dtype, shape, bytes, sorted metadata).

    Whole-file hashes change on re-save because safetensors does not keep metadata order stable.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(dict(sorted((metadata or {}).items())), sort_keys=True).encode())
    return h.hexdigest()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]
