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
import errno
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

from wmark.errors import RuntimeFailure, UsageError

METADATA_PREFIX = "wmark."


def check_output(path: str | os.PathLike[str]) -> None:
    """Refuse an output path that cannot be written, before any work is done for it.

    Its directory must exist and take new files, and the path must not be a directory, so that a long
    training run or a paid verification is not lost to a mistyped ``--out`` or ``--report``.

    Raises:
        UsageError: Naming the path and what to do about it.
    """
    target = Path(path)
    parent = target.parent
    try:
        if not parent.is_dir():
            if parent.exists():
                raise UsageError(f"Cannot write {target}: {parent} is not a directory; choose another path.")
            raise UsageError(f"Directory {parent} does not exist; create it first.")
        if target.is_dir():
            raise UsageError(f"Cannot write {target}: it is a directory; give a file path.")
        # A real probe file, not os.access: root, read-only mounts and ACLs all answer access() wrongly.
        fd, probe = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=parent)
    except OSError as exc:  # is_dir() raises too when a directory on the way may not be searched
        raise _write_error(target, exc) from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_writes(*paths: str | os.PathLike[str], mode: int = 0o644) -> Iterator[list[str]]:
    """Yield temporary paths next to ``paths``; rename them all into place only if the block succeeds.

    The files get ``mode`` less the process's umask, as files opened for writing do.

    A crash or an exception leaves no partial file behind, and readers never see a half-written one. Every
    file is complete on disk before the first rename, and a failed rename takes back the renames before it,
    so files that belong together (a report and its JSON twin) appear all together or not at all.

    Raises:
        UsageError: If a path cannot be written (missing or read-only directory, a directory in its place).
        RuntimeFailure: If writing fails for another reason (a full disk, an I/O error).
    """
    targets = [Path(p) for p in paths]
    for target in targets:
        check_output(target)
    tmps: list[str] = []
    backups: list[str | None] = []
    done: list[tuple[Path, str | None]] = []
    try:
        try:
            for target in targets:
                fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent)
                os.close(fd)
                tmps.append(tmp)
                os.chmod(tmp, mode & ~_umask())
        except OSError as exc:
            raise _write_error(target, exc) from None
        try:
            yield list(tmps)
            for tmp in tmps:
                _fsync(tmp)
        except OSError as exc:
            raise _write_error(" and ".join(str(t) for t in targets), exc) from None
        # what each target held before: a failed rename puts those files back instead of leaving a mix
        for target in targets:
            backups.append(_backup(target))
        for target, tmp, backup in zip(targets, tmps, backups):
            try:
                os.replace(tmp, target)
            except OSError as exc:
                for placed, old in done:
                    if old is None:
                        placed.unlink(missing_ok=True)
                    else:
                        os.replace(old, placed)
                raise _write_error(target, exc) from None
            done.append((target, backup))
        if os.name == "posix":  # the renames themselves reach the disk with their directories
            for parent in dict.fromkeys(t.parent for t in targets):
                with contextlib.suppress(OSError):  # some file systems cannot sync a directory; the files are synced
                    _fsync(parent)
    finally:
        for leftover in [*tmps, *(b for b in backups if b is not None)]:
            if os.path.exists(leftover):
                os.unlink(leftover)


def _tmp_prefix(target: Path) -> str:
    """The start of a temporary file's name next to ``target``: its name, cut so that the temporary name still fits
    the 255 bytes a file name may have wherever ``target``'s own name does."""
    return f".{target.name[:32]}."


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (set to 077, the safe side, for the instant it takes to read it)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _backup(target: Path) -> str | None:
    """A hard link to ``target``'s current file (None if there is none, or links are not supported there)."""
    if not target.is_file():
        return None
    fd, backup = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".old", dir=target.parent)
    os.close(fd)
    os.unlink(backup)
    try:
        os.link(target, backup)
    except OSError:
        return None
    return backup


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it into place only if the block succeeds (see
    :func:`atomic_writes`)."""
    with atomic_writes(path, mode=mode) as tmps:
        yield tmps[0]


def _write_error(target: str | Path, exc: OSError) -> UsageError | RuntimeFailure:
    """One sentence for a failed write that names the file the user asked for, not a temporary one."""
    if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        why = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
        return UsageError(f"Cannot write {target}: {why}; choose a writable directory.")
    if isinstance(exc, IsADirectoryError):
        return UsageError(f"Cannot write {target}: it is a directory; give a file path.")
    return RuntimeFailure(f"Cannot write {target}: {exc.strerror or type(exc).__name__}; free space or choose "
                          "another directory.")


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """Make a safetensors metadata map: keys get the ``wmark.`` prefix, values become text that
    :func:`wmark_metadata` reads back as the same value and type.

    Non-strings become JSON. A string stays as it is (readable by any safetensors tool) unless it reads as JSON
    (``"2024"``, ``"true"``, ``"[1]"``), which would come back as a number, a bool or a list: such a string is
    written as a JSON string (``"\"2024\""``).

    A name that already has the prefix is metadata as stored, as :func:`load_tensors` and :func:`read_metadata`
    return it: its text is kept verbatim, so ``save_tensors(tensors, p, metadata=load_tensors(q)[1])`` copies a
    file's metadata unchanged (its ``format: pt`` marker is written anyway).
    """
    out: dict[str, str] = {"format": "pt"}
    for name, value in values.items():
        if name == "format" and value == "pt":  # the marker safetensors' PyTorch files carry, not a wmark value
            continue
        stored = name.startswith(METADATA_PREFIX)
        full = name if stored else METADATA_PREFIX + name
        plain = isinstance(value, str) and (stored or _decode(value) is _NOT_JSON)
        out[full] = value if plain else json.dumps(value, sort_keys=True)
    return out


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> None:
    """Save tensors (made contiguous, on CPU) with ``wmark.*`` metadata, atomically.

    Tensors that share memory (a head tied to its embedding, views of one fused weight) are each written in
    full under their own name: safetensors refuses shared memory, and the white-box verifier finds layers by
    name and shape, a tied head included.
    """
    clean: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        c = t.detach().to("cpu").contiguous()
        if c.untyped_storage().data_ptr() in storages:
            c = c.clone()
        storages.add(c.untyped_storage().data_ptr())
        clean[name] = c
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
    _require_model_file(p)
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
    _require_model_file(p)
    try:
        with safe_open(str(p), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{p} is not a readable safetensors file ({_short(exc)}).") from None


def wmark_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The ``wmark.*`` entries of a metadata map, prefix removed and values decoded (see :func:`encode_metadata`).

    Text that reads as JSON is decoded, other text is a string. Files written before strings that read as JSON
    were quoted hold them bare, indistinguishable from the numbers, bools and lists written the same way: they
    decode as those, as they always did.
    """
    out: dict[str, Any] = {}
    for name, value in metadata.items():
        if name.startswith(METADATA_PREFIX):
            decoded = _decode(value)
            out[name[len(METADATA_PREFIX):]] = value if decoded is _NOT_JSON else decoded
    return out


_NOT_JSON = object()


def _decode(text: str) -> Any:
    """``text`` decoded as JSON, or ``_NOT_JSON``: the one test both the writer and the reader apply."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # nested too deep is not JSON wmark wrote either
        return _NOT_JSON


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


def _require_model_file(p: Path) -> None:
    # is_file() raises, rather than answers False, when a directory on the way may not be searched
    try:
        found = p.is_file()
    except PermissionError:
        raise UsageError(f"Cannot read model file {p}: permission denied; fix the permissions of the file and its "
                         "directories.") from None
    if not found:
        raise UsageError(f"Model file {p} does not exist.")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]
